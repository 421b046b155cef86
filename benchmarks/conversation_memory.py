"""What an idle conversation costs the server process, against what /health reports.

    python benchmarks/conversation_memory.py --bundle B [--conversations 40] [--cache-mb 4]

Starts `mqt-edge serve` (127.0.0.1, a free port), sends one first turn per conversation about a
distinct image (so every conversation stays cached, idle), and reads the server's RSS from /proc and
/health's `cache` after a warm-up and after the last one. The context's KV cells are allocated (and
zeroed) at start-up, so an idle conversation held there costs no new memory; one parked on the host
costs its saved state, and each distinct image its cached features and tokens. The figure to compare:
RSS growth per conversation against the growth of what /health reports held (host + image bytes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from batch_serve import ROOT, Server, image_url  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def ask(url: str, seed: int) -> None:
    body = {"model": "bench", "max_tokens": 8, "temperature": 0, "mqt": {"m": 16},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What color is the circle?"},
                                                      {"type": "image_url", "image_url": {"url": image_url(seed)}}]}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--conversations", type=int, default=40)
    ap.add_argument("--cache-mb", type=float)
    a = ap.parse_args()
    extra = ["--cache-mb", str(a.cache_mb)] if a.cache_mb else []
    srv = Server(ROOT, a.bundle, 1, None, "server", extra)
    try:
        for s in range(5):  # warm-up: allocator pools, onnxruntime arenas, first-request paths
            ask(srv.url, 10_000 + s)
        time.sleep(0.5)
        rss0, h0 = rss_mb(srv.proc.pid), httpx.get(f"{srv.url}/health").json()["cache"]
        for s in range(a.conversations):
            ask(srv.url, s)
        time.sleep(0.5)
        rss1, h1 = rss_mb(srv.proc.pid), httpx.get(f"{srv.url}/health").json()["cache"]
    finally:
        srv.stop()
    n = a.conversations
    held = lambda h: h["host_bytes"] + h["image_bytes"]  # noqa: E731
    grew = (rss1 - rss0) / n
    reported = (held(h1) - held(h0)) / n / 2**20
    print(f"conversations {n}: in context {h1['in_context']}, on host {h1['on_host']}, dropped {h1['dropped']}")
    print(f"RSS {rss0:.1f} -> {rss1:.1f} MB: {grew * 1024:.1f} KiB per conversation")
    print(f"/health held {held(h0) / 2**20:.2f} -> {held(h1) / 2**20:.2f} MB: {reported * 1024:.1f} KiB per conversation"
          f" (conversation budget at its longest: {h1['conversation_bytes'] / 2**20:.2f} MB)")
    print(f"ratio RSS growth / reported: {grew / reported:.2f}" if reported else "nothing reported held")


if __name__ == "__main__":
    main()
