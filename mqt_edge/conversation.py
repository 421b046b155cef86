"""Conversations: turns about one image, kept in the KV cache so each new turn prefills only itself.

Multi-turn prompts follow the llava_v1 template as the release (and our training, `train.py`'s
`conversation_ids`) build them, piece by piece:

    <prefix ids> <m visual tokens> tok("\\n{q1} ASSISTANT:") tok(a1) </s> tok("USER: {q2} ASSISTANT:") ...

Each piece is tokenised on its own (SentencePiece dummy prefix), and `</s>` is the EOS id. A
conversation's KV cache holds exactly these ids up to the end of its last answer (the EOS is fed with
the next turn), whether it was built turn by turn or from scratch: after generating, `settle` replaces
whatever generated ids differ from tok(answer) (a stop sequence cut, the unfed last token at the
length limit), so a continued conversation prefills only the new turn and answers as a fresh one would.

`ConversationCache` keeps idle conversations for front ends that receive whole histories (the
server): the one whose turns share the longest prefix with a request's serves it. When the request
continues all of its turns, it is taken out and continued; when they part ways (two clients asking
different questions about one image), it stays as it is and the request forks it: a new sequence
shares the cells of the image and the common turns, so neither client loses its cache. Their
sequences are the scheduler's to park or drop (mqt_edge/scheduler.py); a dropped one leaves the
cache by itself.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from .checks import DEFAULT_CONFIDENCE, check_confidence
from .errors import InputError, MQTEdgeError
from .prompt import check_question
from .session import Answer, Generation, Session

Turn = tuple[str, str]  # (question, answer)


@dataclass
class Reply:
    """One turn's outcome, for front ends that stream and stop on their own terms."""

    text: str = ""
    finish: str = "stop"  # stop | length | cancelled
    prompt_tokens: int = 0  # positions before the answer
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those not computed for this turn
    turns_reused: int = 0
    answer: Answer | None = None
    refined_from: dict | None = None


class StopScan:
    """Finds stop sequences across pieces; holds back text that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.held, self.hold = stops, "", max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: str) -> tuple[str, bool]:
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return text[:cut], True
        keep = len(text) - self.hold if self.hold else len(text)
        self.held = text[max(keep, 0):]
        return text[: max(keep, 0)], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Conversation:
    """A session plus the turns its KV cache holds after the image prefix."""

    def __init__(self, session: Session, key: str | None = None) -> None:
        self.session, self.key = session, key
        self.turns: list[Turn] = []
        self.ends: list[int] = [session.n_prefix]  # KV position after the image prefix and after each turn
        self._made: tuple[int, int, str] = (0, 0, "")  # (base, turns reused, question) of the last start

    @property
    def m(self) -> int:
        return self.session.m

    def common(self, turns: list[Turn]) -> int:
        """How many of `turns` (from the first) this conversation's cache holds."""
        n = 0
        while n < len(self.turns) and n < len(turns) and self.turns[n] == turns[n]:
            n += 1
        return n

    def fork(self, n: int) -> Conversation:
        """A new conversation holding this one's image and first `n` turns, sharing their cells; this
        one keeps all of its turns."""
        if self.ends[0] != self.session.n_prefix:  # refined since: only the image prefix is valid
            self.reset()
        n = min(n, len(self.turns))
        child = Conversation(self.session.fork(self.ends[n]), self.key)
        child.turns, child.ends = self.turns[:n], self.ends[: n + 1]
        return child

    def reset(self) -> None:
        """Forget the turns (the cache keeps the image prefix only), e.g. after a refinement."""
        self.turns, self.ends = [], [self.session.n_prefix]

    def refine(self, m: int) -> None:
        """Grow m exactly; the turns go (they were answered about fewer tokens)."""
        self.session.refine(m)
        self.reset()

    # -- the template's continuation -------------------------------------------------------------
    def turn_ids(self, turns: list[Turn], question: str, first: bool) -> tuple[list[int], list[int]]:
        """Token ids of `turns` then `question` as llava_v1 continues after the image (first=True) or
        after an earlier answer, and the offsets within them where each of `turns` ends."""
        pipe = self.session.pipe
        tpl, eos, ids, ends = pipe.template, pipe.llm.eos, [], []
        for k, q in enumerate([t[0] for t in turns] + [question]):
            check_question(q)
            if first and k == 0:
                ids += pipe.question_ids(q)  # "\n{q} ASSISTANT:", exactly the one-shot prompt
            else:
                ids += [eos] + pipe.llm.tokenize(f"{tpl.user}: {q}{tpl.sep}{tpl.assistant}:", add_bos=False)
            if k < len(turns):
                ids += self._answer_ids(turns[k][1])
                ends.append(len(ids))
        return ids, ends

    def _answer_ids(self, text: str) -> list[int]:
        return self.session.pipe.llm.tokenize(text, add_bos=False) if text else []

    def start(self, question: str, history: list[Turn] | None = None, max_new_tokens: int | None = None,
              default_new: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Generation:
        """A generation for `question` after `history` (default: the turns held), prefilling only what
        the cache lacks. max_new_tokens None: what the context has left, up to `default_new`."""
        s = self.session
        if self.ends[0] != s.n_prefix:  # refined since: the cache holds the image prefix only
            self.reset()
        history = self.turns if history is None else history
        n = self.common(history)
        ids, ends = self.turn_ids(history[n:], question, first=n == 0)
        keep = self.ends[n]
        room = s.n_ctx - keep - len(ids)
        # max_tokens is a ceiling (OpenAI's definition): clamped to the room left, and a reply that
        # reaches it ends with finish "length", as llama-server does (docs/serve.md)
        new = min(default_new if max_new_tokens is None else max_new_tokens, room)
        if new < 1 or room < 1:
            raise InputError(f"the conversation ({keep + len(ids)} positions) and its answer exceed the context "
                             f"of {s.n_ctx}", "start a new conversation, or restart the server with more "
                             "--conversation-tokens")
        gen = s.generate_ids(ids, keep=keep, max_new_tokens=new, temperature=temperature, top_p=top_p, seed=seed)
        self.turns, self.ends = self.turns[:n] + history[n:], self.ends[: n + 1] + [keep + e for e in ends]
        self._made = (keep + len(ids), n, question)
        return gen

    def settle(self, gen: Generation, text: str, cancelled: bool = False) -> None:
        """After a generation: make the cache after its prompt hold exactly tok(text), and record the
        turn (an abandoned answer keeps the conversation before it)."""
        base, _, question = self._made
        if cancelled:  # the cache past the last turn is cut by the next start
            return
        s = self.session
        fed = gen.token_ids[: max(0, s.n_past - base)]
        want = self._answer_ids(text)
        if base + len(want) >= s.n_ctx:  # re-tokenised, an answer that filled the context may not fit:
            return  # the conversation keeps the turns before it (its next start cuts the cache there)
        same = 0
        while same < len(fed) and same < len(want) and fed[same] == want[same]:
            same += 1
        if same < len(fed) or want[same:]:
            s.cut(base + same, want[same:])
        self.turns, self.ends = self.turns + [(question, text)], self.ends + [s.n_past]

    # -- whole turns ------------------------------------------------------------------------------
    def reply(self, question: str, history: list[Turn] | None = None, *, refine_to: int | None = None,
              confidence: float = DEFAULT_CONFIDENCE, max_new_tokens: int | None = None, default_new: int = 128,
              temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop: tuple[str, ...] = (),
              on_piece: Callable[[str], None] | None = None,
              cancelled: threading.Event | None = None) -> Reply:
        """Answer `question` after `history` with the refinement policy, stop sequences and a cancel
        flag; the cache is settled to the returned text. `on_piece` receives "" once the first token
        is picked (a stream's first chunk, its TTFT), then the text as it is decoded."""
        confidence = check_confidence(confidence)

        def begin() -> Generation:
            return self.start(question, history, max_new_tokens, default_new, temperature, top_p, seed)

        if refine_to is not None and refine_to > self.m:
            gen = self.session.refine_step(begin, refine_to, confidence)
        else:
            gen = begin()
        base, reused, _ = self._made
        out = _read(gen, stop, on_piece, cancelled)
        self.settle(gen, out.text, cancelled=out.finish == "cancelled")
        a = gen.answer
        out.prompt_tokens, out.cached_tokens = base, base - a.prefilled
        out.turns_reused, out.answer, out.refined_from = reused, a, gen.refined_from
        return out

    def ask(self, question: str, **kw) -> Answer:
        """The next turn's answer (the conversation keeps it)."""
        return self.reply(question, **kw).answer

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read(gen: Generation, stop: tuple[str, ...], on_piece, cancelled) -> Reply:
    out, scan = Reply(), StopScan(stop)
    if on_piece is not None:
        on_piece("")  # the first token is picked: a streaming caller can start its response (its TTFT)
    pieces = iter(gen)
    try:
        for piece in pieces:
            if cancelled is not None and cancelled.is_set():
                out.finish = "cancelled"
                break
            text, stopped = scan.feed(piece) if stop else (piece, False)
            if text:
                out.text += text
                if on_piece is not None:
                    on_piece(text)
            if stopped:
                break
        else:
            tail = scan.flush()
            if tail:
                out.text += tail
                if on_piece is not None:
                    on_piece(tail)
            if len(gen.token_ids) >= gen.max_new_tokens:
                out.finish = "length"
    finally:
        pieces.close()  # the generation's cleanup runs here, on this thread: the session is free again
    out.completion_tokens = len(gen.token_ids)
    out.text = out.text.strip() if out.finish != "cancelled" else out.text
    return out


class ConversationCache:
    """Idle conversations by image key, most recent first; the scheduler parks or drops their sequences."""

    def __init__(self) -> None:
        self._idle: OrderedDict[int, Conversation] = OrderedDict()  # id(conv) -> conv, oldest first
        self._lock = threading.Condition()
        self._forking: dict[int, int] = {}  # id(conv) -> forks copying its cells right now
        self.evictions = self.forks = 0

    def take(self, key: str, turns: list[Turn], accept: Callable[[Conversation], bool]) -> Conversation | None:
        """A conversation about `key` (one that `accept`s) holding the most of `turns`: the idle one
        itself, taken out, when `turns` continue all of its own; otherwise a fork of it holding the
        common turns, and it stays idle, untouched. None when there is none (or the fork failed)."""
        with self._lock:
            while True:
                best, n = self._best(key, turns, accept)
                if best is None:
                    return None
                if n < len(best.turns):
                    break
                if not self._forking.get(id(best)):
                    del self._idle[id(best)]
                    best.session.seq.droppable = False  # a caller holds it again
                    return best
                self._lock.wait()  # a fork is copying its cells: continue it once they are shared
            self._forking[id(best)] = self._forking.get(id(best), 0) + 1
        try:
            child = best.fork(n)
        except MQTEdgeError:  # dropped or closed meanwhile, or no room: the caller starts afresh
            return None
        finally:
            with self._lock:
                self._forking[id(best)] -= 1
                if not self._forking[id(best)]:
                    del self._forking[id(best)]
                self._lock.notify_all()
        with self._lock:
            self.forks += 1
        return child

    def _best(self, key: str, turns: list[Turn], accept: Callable[[Conversation], bool]) -> tuple:
        best, best_n = None, -1
        for c in reversed(self._idle.values()):  # most recent first: it wins ties
            if c.key == key and accept(c) and not c.session.closed:
                n = c.common(turns)
                if n > best_n or (n == best_n and n == len(c.turns) < len(best.turns)):
                    best, best_n = c, n  # at equal turns, one to continue whole beats one to fork
        return best, best_n

    def put(self, conv: Conversation) -> None:
        """Keep `conv` for a later turn; its sequence may be parked on the host or dropped."""
        seq = conv.session.seq
        seq.on_drop = lambda: self._dropped(conv)
        with self._lock:
            self._idle[id(conv)] = conv
        seq.droppable = True  # the cache's now: the scheduler may drop it when the host budget is spent

    def _dropped(self, conv: Conversation) -> None:
        with self._lock:
            if self._idle.pop(id(conv), None) is not None:
                self.evictions += 1

    @property
    def idle(self) -> int:
        return len(self._idle)

    def clear(self) -> None:
        with self._lock:
            convs, self._idle = list(self._idle.values()), OrderedDict()
        for c in convs:
            c.close()

