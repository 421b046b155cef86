"""Does Ray Serve send a conversation's second turn back to the replica that cached its first?

    python benchmarks/ray_affinity.py --bundle B                       # Ray's default router, then ours
    python benchmarks/ray_affinity.py --bundle B --routers affinity --conversations 40

One local Ray instance, `--replicas` model replicas, the openai client with no extra headers. Every
conversation asks about one of `--images` distinct images (the example image with a different PNG text
chunk each); all first turns are sent, then all second turns in a shuffled order, `--clients` at a time.
A second turn is a hit when usage.prompt_tokens_details.cached_tokens covers its image and the whole
first turn (at least the first turn's prompt plus its answer, less the one token the cache may not
hold yet). Per router: how many second turns went to the replica of their first, the hit share, the share of conversations each replica served (by its second
turn's x-mqt-replica header) and the mean TTFT (streamed, first content chunk) of hits and of misses.
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, PngImagePlugin

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
FIRST = ["What color is the circle?", "What color is the square?", "How many shapes are there?",
         "Is there a red circle?"]
SECOND = "And what shape is blue?"


def image_url(tag: str) -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text("tag", tag)
    buf = io.BytesIO()
    Image.open(EXAMPLE).save(buf, format="PNG", pnginfo=info)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, url: str | None = None) -> dict:
    parts = [{"type": "text", "text": text}] + ([{"type": "image_url", "image_url": {"url": url}}] if url else [])
    return {"role": "user", "content": parts}


def turn(client, model: str, messages: list, max_tokens: int) -> dict:
    """One streamed turn: its text, usage, TTFT and the replica that answered."""
    t0 = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    replica, text, ttft, usage = raw.headers.get("x-mqt-replica"), [], None, None
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    details = usage.prompt_tokens_details
    return {"text": "".join(text), "prompt": usage.prompt_tokens, "completion": usage.completion_tokens,
            "cached": details.cached_tokens if details else 0, "ttft_s": ttft, "replica": replica}


def conversations(base_url: str, model: str, n: int, images: int, clients: int, max_tokens: int, seed: int) -> list:
    """n two-turn conversations; returns (first, second) turn records."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    urls = [image_url(f"img-{k}") for k in range(images)]
    plan = [(urls[i % images], FIRST[(i // images) % len(FIRST)]) for i in range(n)]
    with ThreadPoolExecutor(clients) as pool:
        firsts = list(pool.map(lambda p: turn(client, model, [user(p[1], p[0])], max_tokens), plan))
        order = list(range(n))
        random.Random(seed).shuffle(order)

        def second(i: int) -> dict:
            (url, q), a = plan[i], firsts[i]
            history = [user(q, url), {"role": "assistant", "content": a["text"]}, user(SECOND)]
            return turn(client, model, history, max_tokens)

        seconds = dict(zip(order, pool.map(second, order)))
    return [(firsts[i], seconds[i]) for i in range(n)]


def is_hit(first: dict, second: dict) -> bool:
    return second["cached"] >= first["prompt"] + first["completion"] - 1


def summary(name: str, convs: list) -> dict:
    hits = [is_hit(a, b) for a, b in convs]
    per = {}
    for _, b in convs:
        per[b["replica"]] = per.get(b["replica"], 0) + 1
    ttft = lambda keep: [b["ttft_s"] * 1e3 for (a, b), h in zip(convs, hits) if h == keep and b["ttft_s"]]  # noqa: E731
    mean = lambda xs: f"{statistics.mean(xs):.0f}" if xs else "-"  # noqa: E731
    shares = sorted((c / len(convs) for c in per.values()), reverse=True)
    same = sum(a["replica"] == b["replica"] for a, b in convs)
    return {"router": name, "hits": f"{sum(hits)}/{len(hits)}", "hit_share": sum(hits) / len(hits),
            "same_replica": f"{same}/{len(convs)}",
            "replica_shares": " / ".join(f"{s:.0%}" for s in shares), "max_share": shares[0],
            "ttft_hit_ms": mean(ttft(True)), "ttft_miss_ms": mean(ttft(False)),
            "cached_second": [b["cached"] for _, b in convs][:6]}


def run(args) -> list[dict]:
    import httpx
    import ray
    from ray import serve

    from mqt_edge.serve import ServeConfig
    from mqt_edge.serve.ray import deployment

    cfg = ServeConfig(bundle=str(args.bundle), model_name="mqt-ray", parallel=args.parallel)
    base, rows = f"http://127.0.0.1:{args.port}", []
    ray.init(num_cpus=args.replicas * args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        for name in args.routers:
            serve.run(deployment(cfg, args.replicas, args.cpus, affinity=name == "affinity"),
                      name="mqt-edge", route_prefix="/")
            ready, deadline = set(), time.monotonic() + 120
            while len(ready) < args.replicas and time.monotonic() < deadline:
                r = httpx.get(base + "/health", timeout=10)
                ready |= {r.json()["pid"]} if r.status_code == 200 else set()
                time.sleep(0.1)
            rows.append(summary(name, conversations(base, "mqt-ray", args.conversations, args.images, args.clients,
                                                    args.max_tokens, args.seed)))
            print(rows[-1], flush=True)
            serve.delete("mqt-edge")  # the next router starts from empty caches
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--routers", nargs="+", default=["default", "affinity"], choices=["default", "affinity"])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--cpus", type=float, default=1.0, help="CPUs per replica (its llama.cpp threads)")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--conversations", type=int, default=20)
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--seed", type=int, default=0)
    rows = run(ap.parse_args())
    print("\n| router | second turn on the first's replica | second turns that hit | conversations per replica "
          "| TTFT hit (ms) | TTFT miss (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['router']} | {r['same_replica']} | {r['hits']} ({r['hit_share']:.0%}) | {r['replica_shares']} | {r['ttft_hit_ms']} "
              f"| {r['ttft_miss_ms']} |")


if __name__ == "__main__":
    main()
