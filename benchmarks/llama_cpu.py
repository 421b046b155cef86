"""llama.cpp on this CPU: which builds and buffer types crash, and which is fastest (issue 13).

    python benchmarks/llama_cpu.py gguf CKPT OUT_DIR [--quants f32,f16,q8_0,q4_k_m]
        write the checkpoint's LLM as GGUF at each quant (the exporter's own writer and quantiser)
    python benchmarks/llama_cpu.py matrix OUT_DIR/*.gguf
        decode each GGUF in a subprocess with extra buffer types on and off; print exit or signal
    python benchmarks/llama_cpu.py speed GGUF [--runs 5] [--threads 2] [--prompt 128] [--new 32]
        prefill and decode tok/s with extra buffers on and off, interleaved run by run (one process
        per run, so both see the same machine state); medians and the off/on ratio

Every load goes through mqt_edge.runtimes.llama (the AMX guard); MQT_EDGE_EXTRA_BUFFERS=on|off
forces the choice, which is what the matrix and the speed table vary.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
from mqt_edge.runtimes.llama import LlamaModel
path, n_prompt, n_new, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = LlamaModel(path)
ctx = llm.context(n_prompt + n_new + 8, n_batch=512, threads=threads)
ids = [llm.bos] + [int(t) for t in np.random.default_rng(0).integers(100, min(llm.n_vocab, 30000), n_prompt - 1)]
t0 = time.perf_counter(); ctx.feed_tokens(ids); tok = int(np.argmax(ctx.logits())); t1 = time.perf_counter()
for _ in range(n_new):
    ctx.feed_tokens([tok]); tok = int(np.argmax(ctx.logits()))
t2 = time.perf_counter()
print(json.dumps({"prefill_tps": n_prompt / (t1 - t0), "decode_tps": n_new / (t2 - t1),
                  "extra_buffers": llm.extra_buffers}))
ctx.close(); llm.close()
"""


def run_child(gguf: Path, extra: str, n_prompt: int, n_new: int, threads: int) -> dict:
    env = os.environ | {"MQT_EDGE_EXTRA_BUFFERS": extra}
    r = subprocess.run([sys.executable, "-c", CHILD, str(gguf), str(n_prompt), str(n_new), str(threads)],
                       capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        how = (f"signal {signal.Signals(-r.returncode).name}" if r.returncode < 0 else f"exit {r.returncode}")
        return {"crash": how, "stderr": r.stderr[-300:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def cmd_gguf(a) -> None:
    from mqt_edge.exporters.gguf_llm import get_quant, quantize, write_gguf
    from mqt_edge.model.checkpoint import LlavaConfig, resolve_model_dir

    ckpt = resolve_model_dir(a.ckpt)
    raw = LlavaConfig.read(ckpt).raw
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{ckpt.name}-f32.gguf"
    if not base.exists():
        write_gguf(ckpt, raw, base, "f32", ckpt.name)
    for q in a.quants.split(","):
        dst = out / f"{ckpt.name}-{q}.gguf"
        if q == "f16" and not dst.exists():
            write_gguf(ckpt, raw, dst, "f16", ckpt.name)
        elif q not in ("f32", "f16") and not dst.exists():
            quantize(base, dst, get_quant(q), None)
        print(dst)


def cmd_matrix(a) -> None:
    from mqt_edge.device import cpu_info
    from mqt_edge.runtimes.llama import system_info

    print(f"# CPU: {cpu_info().model}; features {' '.join(cpu_info().features)}")
    print(f"# llama.cpp: {system_info()}")
    print("| GGUF | extra buffers on | extra buffers off |")
    print("|---|---|---|")
    for g in map(Path, a.ggufs):
        cells = []
        for extra in ("on", "off"):
            r = run_child(g, extra, 16, 4, a.threads)
            cells.append(r["crash"] if "crash" in r else "decodes")
        print(f"| {g.name} | {cells[0]} | {cells[1]} |")


def cmd_speed(a) -> None:
    from mqt_edge.device import cpu_info
    from mqt_edge.runtimes.llama import system_info

    res: dict[str, list[dict]] = {"on": [], "off": []}
    for _ in range(a.runs):  # interleaved: on, off, on, off, ...
        for extra in res:
            res[extra].append(run_child(Path(a.gguf), extra, a.prompt, a.new, a.threads))
    print(f"# {time.strftime('%Y-%m-%d')} CPU: {cpu_info().model} ({' '.join(cpu_info().features)}), "
          f"{a.threads} threads, {a.runs} runs each, interleaved; prompt {a.prompt}, {a.new} new tokens")
    print(f"# llama.cpp: {system_info()}")
    print("| extra buffer types | prefill tok/s (median) | decode tok/s (median) |")
    print("|---|---|---|")
    med = {}
    for extra, runs in res.items():
        crashes = [r["crash"] for r in runs if "crash" in r]
        if crashes:
            print(f"| {extra} | {crashes[0]} | {crashes[0]} |")
            continue
        med[extra] = {k: statistics.median(r[k] for r in runs) for k in ("prefill_tps", "decode_tps")}
        print(f"| {extra} | {med[extra]['prefill_tps']:.1f} | {med[extra]['decode_tps']:.2f} |")
    if len(med) == 2:
        print(f"off/on: prefill {med['off']['prefill_tps'] / med['on']['prefill_tps']:.2f}x, "
              f"decode {med['off']['decode_tps'] / med['on']['decode_tps']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gguf")
    g.add_argument("ckpt")
    g.add_argument("out")
    g.add_argument("--quants", default="f32,f16,q8_0,q4_k_m")
    m = sub.add_parser("matrix")
    m.add_argument("ggufs", nargs="+")
    m.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("speed")
    s.add_argument("gguf")
    s.add_argument("--runs", type=int, default=5)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--prompt", type=int, default=128)
    s.add_argument("--new", type=int, default=32)
    a = ap.parse_args()
    {"gguf": cmd_gguf, "matrix": cmd_matrix, "speed": cmd_speed}[a.cmd](a)


if __name__ == "__main__":
    main()
