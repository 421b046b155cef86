"""The llava_v1 prompt and the release's tokenisation around <image>."""

import pytest

from mqt_edge.errors import InputError
from mqt_edge.prompt import LLAVA_V1, split_prompt

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)


def test_render_is_the_release_template():
    assert LLAVA_V1.render("What is this?") == f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT:"


def test_split_tokenises_each_piece_with_bos_only_first(tiny_model):
    sp = tiny_model.tokenizer.sp
    before, after = split_prompt("How many shapes?", sp.encode, 1)
    assert before == [1] + sp.encode(f"{SYSTEM} USER: ")
    assert after == sp.encode("\nHow many shapes? ASSISTANT:")
    # SentencePiece's dummy prefix: the second piece starts with "▁" then the byte token of "\n".
    assert [sp.id_to_piece(i) for i in after[:2]] == ["▁", "<0x0A>"]
    assert 1 not in after


@pytest.mark.parametrize("q", ["", "   ", "\n", "look at <image> please"])
def test_bad_questions_are_refused(q):
    with pytest.raises(InputError):
        LLAVA_V1.render(q)
