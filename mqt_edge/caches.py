"""The encoded-image cache: vision features and visual tokens by image content, least recently used
first out, under a byte budget (a share of the scheduler's one budget).

A larger m covers a smaller one: the MQT's tokens are nested, so the first m rows of a cached m1 > m
are exactly the tokens for m, and growing a cached m computes only the queries it lacks.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


class ImageCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self._items: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: np.ndarray) -> str:
        """The content key: the preprocessed pixels, so the same picture from a file, bytes or PIL agrees."""
        arr = np.ascontiguousarray(pixels)
        return hashlib.sha256(arr.tobytes()).hexdigest() + str(arr.shape)

    def get(self, key: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(features, visual tokens for the largest m cached), or (None, None)."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None, None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: str, features: np.ndarray, visual: np.ndarray) -> None:
        size = features.nbytes + visual.nbytes
        if size > self.budget_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[0].nbytes + old[1].nbytes
            self._items[key] = (features, visual)
            self._bytes += size
            while self._bytes > self.budget_bytes:
                _, (f, v) = self._items.popitem(last=False)
                self._bytes -= f.nbytes + v.nbytes

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
