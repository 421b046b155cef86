"""The llava_v1 conversation template and the release's tokenisation around `<image>`.

Torch-free: the runtime tokenises with llama.cpp, the reference with SentencePiece, and both go
through `split_prompt`, so the two agree by construction. The release tokenises the text before and
after `<image>` separately (BOS only on the first piece); SentencePiece's dummy prefix then makes
the second piece start with "▁" followed by the byte token for "\\n".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from .errors import InputError

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class PromptTemplate:
    name: str = "llava_v1"
    system: str = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    user: str = "USER"
    assistant: str = "ASSISTANT"
    sep: str = " "
    stop: str = "</s>"

    def render(self, question: str) -> str:
        """The full prompt with the `<image>` placeholder, as the release builds it."""
        question = check_question(question)
        return (
            f"{self.system}{self.sep}{self.user}: {IMAGE_PLACEHOLDER}\n{question}"
            f"{self.sep}{self.assistant}:"
        )

    def split(self, question: str) -> tuple[str, str]:
        """(text before the image, text after it)."""
        before, after = self.render(question).split(IMAGE_PLACEHOLDER)
        return before, after

    def to_dict(self) -> dict:
        return asdict(self)


LLAVA_V1 = PromptTemplate()


def check_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty", "ask a question about the image")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: a shell's undecodable bytes, or a bad str
        raise InputError(
            f"the question is not valid UTF-8 text (character {exc.start} is {question[exc.start]!r})",
            "pass the question as UTF-8 text (check the terminal's or file's encoding)",
        ) from None
    if IMAGE_PLACEHOLDER in question:
        raise InputError(
            f"the question contains the image placeholder {IMAGE_PLACEHOLDER!r}",
            "remove it: the image goes in automatically",
        )
    return question


def split_prompt(
    question: str,
    encode: Callable[[str], list[int]],
    bos_id: int,
    template: PromptTemplate = LLAVA_V1,
) -> tuple[list[int], list[int]]:
    """Token ids before and after the visual tokens.

    `encode(text)` must tokenise one piece without BOS, with SentencePiece's dummy prefix.
    """
    before, after = template.split(question)
    return [bos_id, *encode(before)], list(encode(after))
