"""The session cache: conversations' llama.cpp contexts, least recently used first out, under a byte budget.

An entry is one Session (an image's KV cache) plus the turns its cache holds after the image prefix.
A request takes an entry out (so no two requests ever share a context), and puts it back when it
has answered, under the conversation it now holds. A conversation matches an entry when the image's
content hash is the same; the entry whose turns share the longest prefix with the request's earlier
turns wins (its cache is cut back to that prefix), so a new question about a cached image still skips
the image, and a regenerated answer reuses the turns before it.

Every entry costs the same (every session is created with the same context size), so the budget is
a count of sessions: entries in use by a slot count against it too, and idle ones are evicted to
make room for a new one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Entry:
    session: object  # mqt_edge.pipeline.Session
    image: str  # sha256 of the image bytes
    turns: list[tuple[str, str]] = field(default_factory=list)  # (question, answer) held in the KV cache
    ends: list[int] = field(default_factory=list)  # KV position after the image prefix and after each turn

    def __post_init__(self) -> None:
        if not self.ends:
            self.ends = [self.session.n_prefix]

    @property
    def m(self) -> int:
        return self.session.m

    def common(self, turns: list[tuple[str, str]]) -> int:
        """How many of `turns` (from the first) this entry's cache holds."""
        n = 0
        while n < len(self.turns) and n < len(turns) and self.turns[n] == turns[n]:
            n += 1
        return n

    def reset(self) -> None:
        """After a refinement the cache holds the image prefix only."""
        self.turns, self.ends = [], [self.session.n_prefix]


class SessionCache:
    def __init__(self, capacity: int, session_bytes: int, on_evict: Callable[[], None] = lambda: None) -> None:
        if capacity < 1:
            raise ValueError("the session cache needs room for at least one session")
        self.capacity, self.session_bytes = capacity, session_bytes
        self._idle: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, oldest first
        self._busy = 0
        self._lock = threading.Lock()
        self._on_evict = on_evict

    def take(self, image: str, turns: list[tuple[str, str]], accept: Callable[[Entry], bool]) -> Entry | None:
        """The idle entry for this image that holds the most of `turns` (and that `accept`s), taken out."""
        with self._lock:
            best, best_n = None, -1
            for key, e in reversed(self._idle.items()):  # most recent first: it wins ties
                if e.image == image and accept(e):
                    n = e.common(turns)
                    if n > best_n:
                        best, best_n = key, n
            if best is None:
                return None
            self._busy += 1
            return self._idle.pop(best)

    def reserve(self) -> None:
        """Make room for one new session (evicting the least recently used idle ones) and count it busy."""
        evicted = []
        with self._lock:
            while self._idle and len(self._idle) + self._busy + 1 > self.capacity:
                evicted.append(self._idle.popitem(last=False)[1])
            self._busy += 1
        for e in evicted:
            self._close(e)

    def give_back(self, entry: Entry | None, keep: bool = True) -> None:
        """Return a taken or reserved slot; the entry stays cached unless keep is False."""
        with self._lock:
            self._busy -= 1
            if entry is not None and keep:
                self._idle[id(entry)] = entry
                entry = None
        if entry is not None:
            entry.session.close()

    def _close(self, e: Entry) -> None:
        e.session.close()
        self._on_evict()

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def busy(self) -> int:
        return self._busy

    def clear(self) -> None:
        with self._lock:
            entries, self._idle = list(self._idle.values()), OrderedDict()
        for e in entries:
            e.session.close()
