"""`mqt-edge chat`: questions about an image, one after another, with the bundle loaded once.

This module only reads lines, parses commands and prints. The conversation itself is the API's
(`mqt_edge.conversation.Conversation`): `pipe.conversation(image, m)` encodes the image once and
keeps the prompt, the image and every turn in the KV cache, so each question prefills only its own
turn (`Answer.prefilled` says how many positions) and sees the earlier answers. A refinement grows
m exactly and starts the turns again at the new m. `_open` and `_answer` are the two calls that
touch it.

On a terminal: a prompt, line editing, colours, and Ctrl-C stops the answer being written. Piped
(stdin not a TTY, e.g. a script): no prompt and no ANSI codes, one plain line per answer and per
statistics line; a failing line is reported and the rest still run, and the exit code says
whether any failed.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from rich.console import Console
from rich.markup import escape

from .errors import InputError, MQTEdgeError
from .pipeline import DEFAULT_CONFIDENCE, Answer

HELP = """commands:
  /image PATH   a new image (starts a new conversation)
  /m N          visual tokens for the next question (/m auto: the planner's; a new conversation)
  /refine N     refine to m = N when the first token is unsure (/refine off: never)
  /reset        a new conversation on the same image
  /help         this list
  /quit         leave (Ctrl-D too)
anything else is a question about the image"""


@dataclass
class ChatSettings:
    image: str | None = None
    m: int | None = None  # None: the planner's (`auto_m`)
    refine: int | None = None
    confidence: float = DEFAULT_CONFIDENCE
    max_new_tokens: int = 128
    as_json: bool = False


@dataclass
class Chat:
    """The loop's state: what the next question is asked with, and the open conversation."""

    pipe: Any
    settings: ChatSettings
    auto_m: int  # the planner's m, chosen once at start
    err: Console
    tty: bool = False
    session: Any = None  # the conversation on the current image (opened at the next question)
    failures: int = 0

    # -- the API: the two calls that touch the conversation ----------------------------------------
    def _open(self) -> None:
        self.session = self.pipe.conversation(self.settings.image, m=self.m)

    def _answer(self, question: str, on_piece: Callable[[str], None] | None) -> Answer:
        return self.session.reply(question, refine_to=self.settings.refine, confidence=self.settings.confidence,
                                  on_piece=on_piece, max_new_tokens=self.settings.max_new_tokens).answer

    # -- commands ---------------------------------------------------------------------------------
    @property
    def m(self) -> int:
        return self.settings.m if self.settings.m is not None else self.auto_m

    def new_conversation(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = None

    def handle(self, line: str) -> bool:
        """One line of input; False when the user leaves. A user error prints one line."""
        line = line.strip()
        if not line:
            return True
        try:
            if line.startswith("/"):
                return self._command(line)
            self.ask(line)
        except MQTEdgeError as exc:
            self.failures += 1
            self.err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return True

    def _command(self, line: str) -> bool:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/bye"):
            return False
        if name == "/help":
            self.err.print(escape(HELP), soft_wrap=True)
        elif name == "/image":
            self.set_image(_unquote(arg))
        elif name == "/m":
            self.set_m(arg)
        elif name == "/refine":
            self.set_refine(arg)
        elif name == "/reset":
            self.new_conversation()
            self.note("new conversation")
        else:
            raise InputError(f"unknown command {name}", "commands: /image PATH, /m N, /refine N, /reset, /help, /quit")
        return True

    def set_image(self, path: str) -> None:
        if not path:
            raise InputError("/image needs a path", "e.g. /image examples/shapes.png")
        if not Path(path).is_file():
            raise InputError(f"no image at {path}", "give the path of an image file (png, jpeg, ...)")
        self.new_conversation()
        self.settings.image = path
        self.note(f"image {path}: new conversation")

    def set_m(self, arg: str) -> None:
        if not arg:
            self.note(f"m = {self.m}" + (" (the planner's)" if self.settings.m is None else ""))
            return
        m = None if arg == "auto" else self.pipe.check_tokens(_integer("/m", arg))
        if self.settings.refine is not None and (m or self.auto_m) >= self.settings.refine:
            raise InputError(f"m = {m or self.auto_m} is not below /refine {self.settings.refine}",
                             "choose a smaller m, or /refine off first")
        self.settings.m = m
        self.new_conversation()
        self.note(f"m = {self.m}: new conversation")

    def set_refine(self, arg: str) -> None:
        if arg in ("off", "0", "none"):
            self.settings.refine = None
            self.note("refinement off")
            return
        refine = self.pipe.check_tokens(_integer("/refine", arg))
        if refine <= self.m:
            raise InputError(f"/refine {refine} is not above m = {self.m}", f"refine to a larger m, up to "
                             f"{self.pipe.max_tokens}")
        self.settings.refine = refine
        self.note(f"refine to m = {refine} below first-token probability {self.settings.confidence}")

    # -- questions --------------------------------------------------------------------------------
    def ask(self, question: str) -> Answer | None:
        if self.settings.image is None:
            raise InputError("no image yet", "give one with /image PATH (or as the first argument)")
        if self.session is None:
            self._open()
        streaming = not self.settings.as_json
        try:
            answer = self._answer(question, _write if streaming else None)
        except KeyboardInterrupt:
            if not self.tty:
                raise
            self.new_conversation()  # stopped mid-step: the next question starts on a clean cache
            print()
            self.note("stopped; new conversation")
            return None
        if streaming:
            print(flush=True)
        else:
            print(json.dumps({"question": question} | answer.to_dict()), flush=True)
        self.err.print(_stats(answer, self.tty), soft_wrap=True, highlight=False)
        return answer

    def note(self, text: str) -> None:
        self.err.print(f"[dim]{escape(text)}[/]" if self.tty else escape(text), soft_wrap=True, highlight=False)


def run_chat(chat: Chat, lines: Iterable[str] | None = None) -> int:
    """Read lines until /quit or the end of input; the exit code (1 when a piped line failed)."""
    if lines is None:
        lines = _terminal_lines() if chat.tty else sys.stdin
    try:
        for line in lines:
            if not chat.handle(line):
                break
    finally:
        chat.new_conversation()
    return 1 if chat.failures and not chat.tty else 0


def _terminal_lines() -> Iterable[str]:
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    while True:
        try:
            yield input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt leaves, as Ctrl-D does
            print()
            return


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _stats(a: Answer, tty: bool) -> str:
    t = a.timings_ms
    parts = [f"m={a.m}", f"TTFT {t['ttft']:.0f} ms", f"prefilled {a.prefilled}"]
    if a.decode_tokens_per_s:
        parts.append(f"{a.decode_tokens_per_s:.1f} tok/s")
    if a.refined_from:
        r = a.refined_from
        parts.append(f"refined from m={r['m']} (p={r['first_token_prob']:.2f}, TTFT {r['timings_ms']['ttft']:.0f} ms)")
    line = "  ".join(parts)
    return f"[dim]{line}[/]" if tty else line


def _integer(name: str, arg: str) -> int:
    try:
        return int(arg)
    except ValueError:
        raise InputError(f"{name} {arg!r} is not an integer", f"e.g. {name} 16") from None


def _unquote(arg: str) -> str:
    """A path as typed: quotes (for spaces) removed, a trailing space ignored."""
    try:
        parts = shlex.split(arg)
    except ValueError:
        return arg
    return " ".join(parts) if parts else ""
