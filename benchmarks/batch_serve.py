"""Many streams over HTTP: total completion tok/s, answers/s and TTFT at 1, 2, 4 and 8 concurrent
requests, for this tree's batched server against another server (a baseline tree, or llama-server).

    python benchmarks/batch_serve.py --bundle /path/to/bench-int8 --baseline-tree /tmp/base \\
        --rounds 3 --out docs/batch_serve.md

Each request is a first turn about a distinct image (the bytes differ, so no cache hit), m = 16, a
96-token answer (`max_tokens`, temperature 0; the bench preset's random weights rarely stop early,
and tokens are counted from `usage` either way). "sequential" sends the same N requests one after
another to a one-slot server: the figure batching must beat. Servers are started as a user would
(the CLI, 127.0.0.1, a free port), measured in interleaved rounds, and stopped. The table reports
medians over rounds; TTFT percentiles pool every request of a configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent


def image_url(seed: int) -> str:
    """A distinct image per request: a circle whose colour and place follow the seed."""
    im = Image.new("RGB", (320, 240), (240, 240, 240))
    d = ImageDraw.Draw(im)
    x, y = 20 + (seed * 37) % 200, 20 + (seed * 53) % 120
    d.ellipse([x, y, x + 80, y + 80], fill=((seed * 90) % 256, (seed * 150) % 256, (seed * 210) % 256))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A server subprocess on 127.0.0.1: started, ready when /health answers 200, stopped."""

    def launch(self, cmd: list[str], **popen) -> None:
        # the log to a file: a pipe nobody reads fills up and blocks the server's next log line
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, **popen)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.label} exited: {self.log.read().decode(errors='replace')[-800:]}")
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"{self.label} did not become ready in 300 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Server(Process):
    """`mqt-edge serve` from a source tree (this one, or a baseline worktree) as a subprocess."""

    def __init__(self, tree: Path, bundle: str, parallel: int, threads: int | None, label: str,
                 extra: list[str] | None = None) -> None:
        self.port, self.label = free_port(), label
        cmd = [sys.executable, "-m", "mqt_edge", "serve", "--bundle", bundle, "--port", str(self.port),
               "--parallel", str(parallel), "--queue", "32", "--model-name", "bench"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.launch(cmd + (extra or []), cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)))

async def one(client: httpx.AsyncClient, url: str, seed: int, m: int, new: int,
              mqt: bool = True) -> tuple[float, int, float]:
    """(TTFT s, completion tokens, wall s) of one streaming request. mqt=False: a plain OpenAI body
    (no `model`, no `mqt` field), for llama-server."""
    body = {"max_tokens": new, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What color is the circle?"},
                                                      {"type": "image_url", "image_url": {"url": image_url(seed)}}]}]}
    if mqt:
        body |= {"model": "bench", "mqt": {"m": m}}
    t0, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and chunk.get("choices"):  # the first chunk with a choice: the first token
                ttft = time.perf_counter() - t0
    return ttft or 0.0, tokens, time.perf_counter() - t0


async def burst(url: str, seeds: list[int], m: int, new: int, concurrent: bool, mqt: bool = True) -> dict:
    async with httpx.AsyncClient() as client:
        t0 = time.perf_counter()
        if concurrent:
            got = await asyncio.gather(*(one(client, url, s, m, new, mqt) for s in seeds))
        else:
            got = [await one(client, url, s, m, new, mqt) for s in seeds]
        wall = time.perf_counter() - t0
    return {"tok_s": sum(g[1] for g in got) / wall, "answers_s": len(seeds) / wall, "ttft": [g[0] for g in got],
            "tokens": sum(g[1] for g in got)}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--baseline-tree", help="a checkout of the commit before batching (per-context slots)")
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--out")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    top = max(levels)
    servers = {"batched": Server(ROOT, a.bundle, top, None, "batched"),
               "sequential": Server(ROOT, a.bundle, 1, None, "one slot")}
    if a.baseline_tree:
        servers["slots (before)"] = Server(Path(a.baseline_tree), a.bundle, top, None, "per-context slots")
    results: dict = {}
    seed = 0
    try:
        for r in range(a.rounds):
            for n in levels:
                for name, srv in servers.items():
                    seeds = list(range(seed, seed + n))
                    seed += n
                    got = asyncio.run(burst(srv.url, seeds, a.m, a.new, concurrent=name != "sequential"))
                    results.setdefault((name, n), []).append(got)
                    print(f"round {r} n={n} {name}: {got['tok_s']:.1f} tok/s, {got['answers_s']:.2f} answers/s, "
                          f"TTFT p50 {1000 * statistics.median(got['ttft']):.0f} ms", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    rows = ["| server | concurrent | tok/s total | answers/s | TTFT p50 ms | TTFT p95 ms | vs sequential |",
            "|---|---|---|---|---|---|---|"]
    for n in levels:
        seq = statistics.median(g["tok_s"] for g in results[("sequential", n)])
        for name in servers:
            gs = results[(name, n)]
            tok = statistics.median(g["tok_s"] for g in gs)
            ttft = [t for g in gs for t in g["ttft"]]
            rows.append(f"| {name} | {n} | {tok:.1f} | {statistics.median(g['answers_s'] for g in gs):.2f} | "
                        f"{1000 * pct(ttft, 0.5):.0f} | {1000 * pct(ttft, 0.95):.0f} | {tok / seq:.2f}x |")
    table = "\n".join(rows)
    print(table)
    if a.out:
        Path(a.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
