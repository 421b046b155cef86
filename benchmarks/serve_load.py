"""Load test of `mqt-edge serve` on loopback: N requests from C concurrent streaming clients.

    python benchmarks/serve_load.py --bundle mqt-edge-bundle --requests 1000 --clients 8 --parallel 2 \\
        --out docs/benchmarks.md

Starts the server as a subprocess (the CLI, as a user would) on a free 127.0.0.1 port, then sends
streaming Chat Completions with httpx: a mix of first turns about a few images (bytes differ, so the
session cache sees distinct images) and second turns that continue a conversation. TTFT is measured
at the client, to the first content chunk. The server's RSS (from /proc) is read after request 100
and after the last one; the run fails on any error or an RSS drift of 5% or more.
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
import time
from pathlib import Path

import httpx
from PIL import Image, PngImagePlugin

EXAMPLE = Path(__file__).parent.parent / "examples" / "shapes.png"
QUESTIONS = ["What color is the circle?", "What color is the square?", "How many shapes are there?",
             "Is there a red circle?", "What shape is the blue object?"]


def image_url(tag: int) -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text("tag", str(tag))
    buf = io.BytesIO()
    Image.open(EXAMPLE).save(buf, format="PNG", pnginfo=info)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def body(i: int, urls: list[str], answers: dict, m: int) -> dict:
    url_i, q = i % len(urls), QUESTIONS[i % len(QUESTIONS)]
    first = {"role": "user", "content": [{"type": "text", "text": QUESTIONS[0]},
                                         {"type": "image_url", "image_url": {"url": urls[url_i]}}]}
    if i % 3 == 2 and url_i in answers:  # a second turn: continues a cached conversation
        messages = [first, {"role": "assistant", "content": answers[url_i]}, {"role": "user", "content": q}]
    else:
        messages = [first]
    return {"model": "bench", "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "mqt": {"m": m}}


async def one(http: httpx.AsyncClient, url: str, req: dict) -> dict:
    t0 = time.perf_counter()
    ttft, text, usage = None, "", None
    async with http.stream("POST", url, json=req) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            for c in chunk["choices"]:
                if c["delta"].get("content"):
                    ttft = ttft or time.perf_counter() - t0
                    text += c["delta"]["content"]
            usage = chunk.get("usage") or usage
    return {"ttft": ttft or time.perf_counter() - t0, "total": time.perf_counter() - t0, "text": text.strip(),
            "cached": usage["prompt_tokens_details"]["cached_tokens"] if usage else 0}


async def drive(base: str, n: int, clients: int, urls: list[str], m: int, pid: int) -> dict:
    results: list[dict] = [None] * n
    answers: dict[int, str] = {}
    rss: dict[int, float] = {}
    counter = iter(range(n))
    done = 0

    async def client() -> None:
        nonlocal done
        async with httpx.AsyncClient(timeout=120) as http:
            for i in counter:
                res = await one(http, base + "/v1/chat/completions", body(i, urls, answers, m))
                results[i] = res
                if "text" in res and i % 3 == 0:
                    answers.setdefault(i % len(urls), res["text"])
                done += 1
                if done in (100, n):
                    rss[done] = rss_mb(pid)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "ttft" in r]
    ttfts = sorted(r["ttft"] for r in ok)
    q = lambda p: 1000 * ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))]  # noqa: E731
    return {"requests": n, "clients": clients, "errors": n - len(ok), "wall_s": round(wall, 1),
            "throughput_rps": round(len(ok) / wall, 2), "ttft_p50_ms": round(q(0.50), 1),
            "ttft_p95_ms": round(q(0.95), 1), "total_p50_ms": round(1000 * statistics.median(r["total"] for r in ok), 1),
            "cached_share": round(sum(r["cached"] > 0 for r in ok) / max(1, len(ok)), 3),
            "rss_mb_at_100": round(rss[100], 1), "rss_mb_at_end": round(rss[n], 1),
            "rss_drift_pct": round(100 * (rss[n] - rss[100]) / rss[100], 2),
            "first_errors": [r["error"] for r in results if "error" in r][:3]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--images", type=int, default=6, help="distinct images (by bytes)")
    ap.add_argument("--tokens", type=int, default=64, help="m of every request")
    ap.add_argument("--out", help="append a Markdown section to this file")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mqt_edge", "serve", "--bundle", a.bundle, "--port", str(port), "--parallel",
           str(a.parallel), "--queue", str(4 * a.clients), "--model-name", "bench"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start: " + (server.stderr.read() if server.poll() else "timeout"))
            time.sleep(0.3)
        urls = [image_url(k) for k in range(a.images)]
        res = asyncio.run(drive(base, a.requests, a.clients, urls, a.tokens, server.pid))
    finally:
        server.terminate()
        server.wait(timeout=30)
    res |= {"parallel": a.parallel, "m": a.tokens, "cpus": os.cpu_count()}
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "a") as f:
            f.write(section(res, a))
    if res["errors"] or abs(res["rss_drift_pct"]) >= 5:
        raise SystemExit("FAIL: errors or RSS drift >= 5%")


def section(r: dict, a) -> str:
    return (f"\n## Server load (`benchmarks/serve_load.py`)\n\n"
            f"`python benchmarks/serve_load.py --bundle B --requests {a.requests} --clients {a.clients} "
            f"--parallel {a.parallel} --tokens {a.tokens}`: the shipped model (q4_k_m), {r['cpus']} shared CPU cores, "
            f"streaming requests on loopback, one third of them second turns.\n\n"
            f"| requests | clients | slots | errors | throughput | TTFT p50 | TTFT p95 | total p50 "
            f"| requests with cached tokens | RSS @100 -> @{r['requests']} |\n"
            f"|---|---|---|---|---|---|---|---|---|---|\n"
            f"| {r['requests']} | {r['clients']} | {r['parallel']} | {r['errors']} | {r['throughput_rps']} req/s | "
            f"{r['ttft_p50_ms']} ms | {r['ttft_p95_ms']} ms | {r['total_p50_ms']} ms | {100 * r['cached_share']:.0f}% | "
            f"{r['rss_mb_at_100']} -> {r['rss_mb_at_end']} MB ({r['rss_drift_pct']:+.2f}%) |\n")


if __name__ == "__main__":
    main()
