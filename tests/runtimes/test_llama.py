"""runtimes/llama.py's shared context: sequences share cells, decode anywhere, save and restore exactly,
and refuse what llama.cpp would abort on."""

from __future__ import annotations

import numpy as np
import pytest

from mqt_edge.runtimes.llama import LlamaError, LlamaModel, SharedContext


@pytest.fixture(scope="module")
def llm(tiny_f32_bundle):
    model = LlamaModel(tiny_f32_bundle / "llm-f32.gguf") if (tiny_f32_bundle / "llm-f32.gguf").exists() else None
    if model is None:
        from mqt_edge.bundle import Bundle

        model = LlamaModel(Bundle.open(tiny_f32_bundle).path("llm"))
    yield model
    model.close()


PROMPT = [1, 15, 29, 42, 57, 63, 71]  # ids inside the tiny vocabulary


def _logits_after(ctx, seq, ids, start=0):
    out = None
    for i, t in enumerate(ids):
        out = ctx.decode_tokens([(seq, start + i, t, True)])[0]
    return out


def test_two_sequences_in_one_batch_match_each_alone(llm):
    a, b = PROMPT, PROMPT[::-1]
    with_one = SharedContext(llm, 256, 3, threads=1, kv_f32=True)
    la = _logits_after(with_one, 1, a)
    lb = _logits_after(with_one, 2, b)
    both = SharedContext(llm, 256, 3, threads=1, kv_f32=True)
    for i in range(len(a)):  # one decode call per position, carrying both sequences
        got = both.decode_tokens([(1, i, a[i], True), (2, i, b[i], True)])
    np.testing.assert_allclose(got[0], la, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], lb, rtol=1e-4, atol=1e-4)
    with_one.close()
    both.close()


def test_a_copied_prefix_answers_as_a_prefilled_one_and_restores_exactly(llm):
    ctx = SharedContext(llm, 256, 4, threads=1, kv_f32=True)
    ctx.decode_tokens([(0, i, t, False) for i, t in enumerate(PROMPT[:4])])
    ctx.seq_cp(0, 1, 0, 4)  # the prefix's cells, shared
    copied = _logits_after(ctx, 1, PROMPT[4:], start=4)
    fed = _logits_after(ctx, 2, PROMPT)
    np.testing.assert_allclose(copied, fed, rtol=1e-5, atol=1e-5)
    assert ctx.seq_pos_max(1) == len(PROMPT) - 1
    state = ctx.seq_save(1, len(PROMPT))
    ctx.seq_rm(1)
    assert ctx.seq_pos_max(1) == -1
    assert ctx.seq_restore(3, state)  # under another id
    again = _logits_after(ctx, 3, [42], start=len(PROMPT))
    ref = _logits_after(ctx, 2, [42], start=len(PROMPT))
    np.testing.assert_allclose(again, ref, rtol=1e-5, atol=1e-5)
    ctx.close()


def test_embeddings_of_the_wrong_width_and_oversized_batches_are_refused(llm):
    ctx = SharedContext(llm, 128, 2, n_batch=16, threads=1)
    with pytest.raises(LlamaError, match="wide"):
        ctx.decode_embeddings([(1, 0, np.zeros((2, llm.n_embd + 1), np.float32), False)])
    with pytest.raises(ValueError, match="batch holds"):
        ctx.decode_tokens([(1, i, 1, False) for i in range(17)])
    ctx.close()
    assert ctx.closed
