"""Parity checks run by every export: each artifact against the PyTorch reference.

Thresholds (also in docs/export.md):
- ONNX (vision.onnx -> mqt.onnx, fp32): max |tokens - reference| <= 1e-4 * max(1, max |reference|)
  and cosine similarity >= 0.99999 per token, for m in {1, a middle value, max}.
- GGUF, unquantised (the f32/f16 file llama.cpp converts from): the conversion itself.
  f32: max |Δlogit| / max |logit| <= 2e-3 and the same argmax at every decided position;
  f16: <= 1e-2 and the same argmax at >= 95% of decided positions. A position is decided when
  the reference's top-2 gap exceeds twice the largest logit difference (else it is a float tie).
- GGUF, quantised: top-1 agreement and KL(reference || gguf) per token, thresholds in
  gguf_llm.QUANTS. They describe trained models. A random-weight checkpoint (`mqt-edge synth`) is a
  chaotic deep network that amplifies quantisation noise, so there they are reported, not enforced;
  the unquantised check above still gates its conversion.
- INT8 vision (vision-int8.onnx -> mqt.onnx): a quantised graph, so a figure with its own
  thresholds, as q4_k_m is for the LLM: the worst per-token cosine of its visual tokens against the
  PyTorch reference (INT8_MIN_COSINE), and answer agreement: on sample prompts, the share of greedy
  answers (first ANSWER_TOKENS tokens, through the bundle's own GGUF) that are the same as with the
  fp32 vision graph (INT8_MIN_AGREEMENT). Enforced for trained models; reported for a random-weight
  checkpoint, for the reason above.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


ONNX_REL_TOL = 1e-4
ONNX_MIN_COSINE = 0.99999
INT8_MIN_COSINE = 0.99
INT8_MIN_AGREEMENT = 0.9
ANSWER_TOKENS = 6
SAMPLE_QUESTIONS = ("What color is the circle?", "How many shapes are there?", "Is there a blue square?")


def token_report(got: np.ndarray, ref: np.ndarray) -> dict:
    """max abs error and the worst per-token cosine similarity of (..., m, hidden) arrays."""
    g, r = got.reshape(-1, got.shape[-1]).astype(np.float64), ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    cos = (g * r).sum(-1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(r, axis=-1) + 1e-30)
    err = float(np.abs(g - r).max())
    scale = float(np.abs(r).max())
    return {
        "max_abs_err": err,
        "ref_max_abs": scale,
        "min_cosine": float(cos.min()),
        "pass": err <= ONNX_REL_TOL * max(1.0, scale) and float(cos.min()) >= ONNX_MIN_COSINE,
    }


def logits_report(got: np.ndarray, ref: np.ndarray) -> dict:
    """Relative max error, top-1 agreement and mean KL(ref || got) of (T, vocab) logits."""
    got, ref = got.astype(np.float64), ref.astype(np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lr, lg = log_softmax(ref), log_softmax(got)
    same = got.argmax(-1) == ref.argmax(-1)
    # A position is decided when the reference's top-2 gap exceeds twice the largest logit error:
    # below that, float rounding alone may swap the two (a tie, not a conversion error).
    top2 = np.sort(ref, -1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * np.abs(got - ref).max()
    return {
        "positions": int(ref.shape[0]),
        "rel_err": float(np.abs(got - ref).max() / np.abs(ref).max()),
        "top1": float(same.mean()),
        "decided_positions": int(decided.sum()),
        "top1_decided": float(same[decided].mean()) if decided.any() else 1.0,
        "kl": float((np.exp(lr) * (lr - lg)).sum(-1).mean()),
    }


def tokenizer_report(path: Path, pieces: tuple[str, str], before: list[int], after: list[int]) -> dict:
    """llama.cpp's tokenisation of the prompt pieces against the reference ids (the release's)."""
    from ..runtimes.llama import LlamaModel

    llm = LlamaModel(path)
    try:
        got_before, got_after = llm.tokenize(pieces[0], add_bos=True), llm.tokenize(pieces[1], add_bos=False)
    finally:
        llm.close()
    return {"pass": got_before == before and got_after == after, "tokens": len(before) + len(after)}


def gguf_logits(path: Path, ids: list[int], threads: int | None = None) -> np.ndarray:
    """llama.cpp's logits for every position of `ids` (CPU, no GPU offload)."""
    from ..runtimes.llama import plain_llama

    # f32 K/V and no flash attention: llama.cpp's default f16 K/V would add ~1e-3 of its own error
    llm = plain_llama(path, n_ctx=max(64, len(ids) + 8), n_batch=max(64, len(ids)), logits_all=True,
                n_gpu_layers=0, verbose=False, n_threads=threads, type_k=0, type_v=0, flash_attn=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def int8_token_report(got: np.ndarray, ref: np.ndarray) -> dict:
    """A quantised graph's visual tokens against the reference: relative errors and cosines."""
    g, r = got.reshape(-1, got.shape[-1]).astype(np.float64), ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    cos = (g * r).sum(-1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(r, axis=-1) + 1e-30)
    return {
        "rel_err": float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30)),
        "rms_rel_err": float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)),
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
    }


def greedy_ids(ctx, prefix: list[int], visual: np.ndarray, question: list[int], n: int, model) -> list[int]:
    """The first n greedy tokens after prefix + visual tokens (m, hidden) + question ids."""
    ctx.truncate(0)
    ctx.feed_tokens(prefix, logits=False)
    ctx.feed_embeddings(visual)
    ctx.feed_tokens(question)
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(ctx.logits()))
        if model.is_eog(token):
            break
        out.append(token)
        ctx.feed_tokens([token])
    return out


def answer_agreement(llm_path: Path, prefix: list[int], questions: list[list[int]],
                     fp32: dict[int, np.ndarray], int8: dict[int, np.ndarray], threads: int | None = None) -> dict:
    """Share of (image, m, question) prompts whose greedy answer is the same with either vision graph.

    fp32 / int8: m -> visual tokens (images, m, hidden) from the two graphs."""
    from ..runtimes.llama import LlamaModel

    llm = LlamaModel(llm_path)
    longest = max(fp32) + max(map(len, questions)) + len(prefix) + ANSWER_TOKENS + 8
    ctx = llm.context(longest, n_batch=max(64, longest), threads=threads)
    same = total = 0
    try:
        for m, tokens in fp32.items():
            for i in range(tokens.shape[0]):
                for q in questions:
                    a = greedy_ids(ctx, prefix, tokens[i], q, ANSWER_TOKENS, llm)
                    b = greedy_ids(ctx, prefix, int8[m][i], q, ANSWER_TOKENS, llm)
                    same, total = same + (a == b), total + 1
    finally:
        ctx.close()
        llm.close()
    return {"prompts": total, "agreement": same / total, "answer_tokens": ANSWER_TOKENS}
