"""Runtime benchmark (not a test): TTFT and decode speed against m, a LLaVA-1.5-style baseline,
plain llama-cpp-python, and the PyTorch reference.

    mqt-edge synth --preset bench --out models/bench
    mqt-edge export models/bench --out bundles/bench --quant q4_k_m
    python benchmarks/runtime_bench.py --bundle bundles/bench --model models/bench --out docs/benchmarks.md

What each row measures (medians over --runs, one image, greedy, 32 new tokens, all cores):
- mqt-edge at m: `Pipeline.ask` end to end; TTFT = preprocess + vision + MQT + prefill + first token.
- LLaVA-1.5-style baseline: the same runtime and GGUF fed 576 visual tokens (the CLIP patch grid, as
  LLaVA-1.5 does) instead of m, plus the cost of LLaVA-1.5's 2-layer MLP projector at this model's
  width (numpy, fp32). The MQT and its weights are not used.
- plain llama-cpp-python: `Llama.create_completion` on the same GGUF and thread count; decode
  tokens/s from the time of 65 tokens minus the time of 1, over the same text prompt.
- PyTorch reference: `MQTLlava.generate` (fp32 on the CPU), the same image, question and 32 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from mqt_edge.image import sample_images
from mqt_edge.image import preprocess
from mqt_edge.pipeline import Pipeline

QUESTION = "Describe the image in detail."
TOKENS = (1, 2, 4, 8, 16, 36, 64, 144, 256)


def med(xs):
    return statistics.median(xs)


def bench_mqt(pipe, image, runs, new_tokens):
    rows = []
    for m in TOKENS:
        if m > pipe.max_tokens:
            continue
        answers = [pipe.ask(image, QUESTION, m=m, max_new_tokens=new_tokens) for _ in range(runs)]
        rows.append({
            "m": m,
            "ttft_ms": med([a.timings_ms["ttft"] for a in answers]),
            "vision_ms": med([a.timings_ms["vision"] for a in answers]),
            "prefill_ms": med([a.timings_ms["prefill"] for a in answers]),
            "decode_tok_s": med([a.decode_tokens_per_s or 0 for a in answers]),
            "generated": len(answers[0].token_ids),
            "total_ms": med([a.timings_ms["total"] for a in answers]),
        })
    return rows


def bench_reuse(pipe, image, runs, new_tokens):
    """Image reuse (second question on a session) and refinement (16 -> max) against fresh requests."""
    out = {}
    for m in (64, pipe.max_tokens):
        firsts, seconds = [], []
        for _ in range(runs):
            with pipe.look(image, m=m) as s:
                firsts.append(s.ask(QUESTION, max_new_tokens=new_tokens).timings_ms["ttft"])
                seconds.append(s.ask("What is in the corner?", max_new_tokens=new_tokens).timings_ms["ttft"])
        out[f"reuse_m{m}"] = {"first_ttft_ms": med(firsts), "second_ttft_ms": med(seconds)}
    refined, fresh = [], []
    for _ in range(runs):
        with pipe.look(image, m=16) as s:
            s.ask(QUESTION, max_new_tokens=1)
            s.refine(m=pipe.max_tokens)
            a = s.ask(QUESTION, max_new_tokens=1)
            refined.append((a.timings_ms["ttft"], a.prefilled))
        fresh.append(pipe.ask(image, QUESTION, m=pipe.max_tokens, max_new_tokens=1))
    out["refine_16_to_max"] = {"refined_ttft_ms": med([r[0] for r in refined]), "refined_prefilled": refined[0][1],
                               "fresh_ttft_ms": med([f.timings_ms["ttft"] for f in fresh]),
                               "fresh_prefilled": fresh[0].prefilled}
    return out


def bench_llava_baseline(pipe, image, runs, patches=576):
    """TTFT with LLaVA-1.5's token count: 576 visual tokens through the same llama.cpp runtime."""
    hidden = pipe.llm.n_embd
    C = pipe.bundle.manifest.vision.feature_dim
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((C, hidden), np.float32) * 0.02
    w2 = rng.standard_normal((hidden, hidden), np.float32) * 0.02
    q_ids = pipe.question_ids(QUESTION)
    ttfts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        px = preprocess(image, pipe.image_spec)
        feats = pipe.vision.features(px)[0]  # (P, C): LLaVA-1.5 keeps every patch
        feats = np.resize(feats, (patches, C))  # the bench tower has 576 patches already
        h = feats @ w1
        visual = (0.5 * h * (1 + np.tanh(0.7978845608 * (h + 0.044715 * h**3)))) @ w2  # mlp2x_gelu
        ctx = pipe.llm.context(len(pipe.prefix_ids) + patches + len(q_ids) + 8, threads=pipe.threads)
        ctx.feed_tokens(pipe.prefix_ids, logits=False)
        ctx.feed_embeddings(visual)
        ctx.feed_tokens(q_ids)
        int(np.argmax(ctx.logits()))
        ttfts.append(1000 * (time.perf_counter() - t0))
        ctx.close()
    return med(ttfts)


def bench_plain_llama(gguf: Path, runs: int, threads: int) -> float:
    from mqt_edge.runtimes.llama import plain_llama

    llm = plain_llama(gguf, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = "A chat between a curious human and an artificial intelligence assistant. USER: " + QUESTION + " ASSISTANT:"
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        llm.create_completion(prompt, max_tokens=1, temperature=0)
        one = time.perf_counter() - t
        llm.reset()
        t = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=65, temperature=0)
        many = time.perf_counter() - t
        llm.reset()
        n = out["usage"]["completion_tokens"]
        rates.append((n - 1) / (many - one))
    llm.close()
    return med(rates)


def bench_reference(model_dir: str, image, new_tokens: int, m: int) -> float:
    import torch

    from mqt_edge.model import MQTLlava

    model = MQTLlava.from_pretrained(model_dir, dtype=torch.float32)
    model.generate(image, QUESTION, m=m, max_new_tokens=2)  # warm-up
    t = time.perf_counter()
    out = model.generate(image, QUESTION, m=m, max_new_tokens=new_tokens)
    return 1000 * (time.perf_counter() - t), len(out.token_ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--model", help="the checkpoint the bundle came from (for the PyTorch row)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", help="write a markdown report here")
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    image = sample_images(1, seed=7)[0]
    with Pipeline.load(args.bundle, threads=threads) as pipe:
        pipe.ask(image, QUESTION, m=1, max_new_tokens=2)  # warm-up
        rows = bench_mqt(pipe, image, args.runs, args.new_tokens)
        baseline = bench_llava_baseline(pipe, image, args.runs)
        reuse = bench_reuse(pipe, image, args.runs, args.new_tokens)
        plain = bench_plain_llama(pipe.bundle.path("llm"), args.runs, threads)
        ours_decode = rows[0]["decode_tok_s"]  # m = 1: the context closest to the plain prompt
        m_full = pipe.max_tokens
        ours_256 = next(r for r in rows if r["m"] == m_full)
        manifest = pipe.bundle.manifest
    ref_ms = ref_n = None
    if args.model:
        ref_ms, ref_n = bench_reference(args.model, image, args.new_tokens, m_full)
    report = {
        "machine": f"{threads} CPU cores ({os.uname().machine})",
        "bundle": {"llm": manifest.llm.quant, "llm_bytes": manifest.llm.bytes, "params": manifest.llm.params,
                   "source": manifest.source_name},
        "rows": rows,
        "reuse": reuse,
        "llava_baseline_ttft_ms": baseline,
        "plain_llama_decode_tok_s": plain,
        "decode_ratio_vs_plain": ours_decode / plain,
        "reference_ms": ref_ms, "reference_tokens": ref_n,
        "ours_e2e_ms_at_max_m": ours_256["total_ms"], "ours_tokens_at_max_m": ours_256["generated"],
    }
    print(json.dumps(report, indent=1))
    if args.out:
        write_markdown(Path(args.out), report, args)


def write_markdown(path: Path, r: dict, args) -> None:
    lines = [
        "# Runtime benchmark",
        "",
        f"`python benchmarks/runtime_bench.py --bundle {args.bundle} --model {args.model} --runs {args.runs}`",
        "",
        f"Machine: {r['machine']}, no GPU. Bundle: {r['bundle']['source']} preset, LLM {r['bundle']['llm']} "
        f"({r['bundle']['llm_bytes'] / 2**20:,.0f} MiB, {r['bundle']['params'] / 1e9:.2f}B parameters), "
        "vision on onnxruntime (CPU). Medians over the runs; greedy; 32 new tokens.",
        "",
        "| m | TTFT (ms) | vision (ms) | prefill (ms) | decode (tok/s) | TTFT vs LLaVA-1.5-style (576 tokens) |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['m']} | {row['ttft_ms']:.0f} | {row['vision_ms']:.0f} | {row['prefill_ms']:.0f} | "
                     f"{row['decode_tok_s']:.1f} | {r['llava_baseline_ttft_ms'] / row['ttft_ms']:.2f}x faster |")
    lines += [
        "",
        f"- LLaVA-1.5-style baseline (576 visual tokens + its MLP projector, same runtime): TTFT "
        f"{r['llava_baseline_ttft_ms']:.0f} ms.",
        f"- Decode speed: ours {r['rows'][0]['decode_tok_s']:.1f} tok/s (m = 1) against plain "
        f"llama-cpp-python {r['plain_llama_decode_tok_s']:.1f} tok/s on the same GGUF: ratio "
        f"{r['decode_ratio_vs_plain']:.3f} (target >= 0.97).",
    ]
    for key, v in r["reuse"].items():
        if key.startswith("reuse_m"):
            lines.append(f"- Image reuse at m = {key[7:]}: first question TTFT {v['first_ttft_ms']:.0f} ms, second "
                         f"question on the same session {v['second_ttft_ms']:.0f} ms "
                         f"({v['first_ttft_ms'] / v['second_ttft_ms']:.1f}x faster).")
    v = r["reuse"]["refine_16_to_max"]
    lines.append(f"- Refinement 16 -> {r['rows'][-1]['m']}: TTFT of the refined answer {v['refined_ttft_ms']:.0f} ms "
                 f"({v['refined_prefilled']} positions prefilled: the new visual tokens + the question) against a fresh "
                 f"request {v['fresh_ttft_ms']:.0f} ms ({v['fresh_prefilled']} positions, image encoded again).")
    if r["reference_ms"]:
        lines.append(
            f"- End to end, {r['ours_tokens_at_max_m']}-token answer at m = {r['rows'][-1]['m']}: ours "
            f"{r['ours_e2e_ms_at_max_m']:.0f} ms against the PyTorch reference (fp32, CPU) "
            f"{r['reference_ms']:.0f} ms for {r['reference_tokens']} tokens: "
            f"{r['reference_ms'] / r['ours_e2e_ms_at_max_m']:.1f}x faster.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
