"""The same many-stream requests as batch_serve.py, against llama.cpp's own llama-server.

llama-server is built from the llama.cpp sources that llama-cpp-python 0.3.36 vendors (its sdist, or
`--src`), serves the LLaVA-1.5 peer that peer_llava.py builds (the bundle's LLM GGUF + an mmproj made
from the checkpoint's CLIP tower), with `-np N` slots and continuous batching (`-cb`), the same thread
count as ours. It is a benchmark peer, not a dependency of the package.

    python benchmarks/llama_server_peer.py --bundle /work/heavy/bench-int8 --levels 1,2,4,8 --rounds 2 \\
        --build-dir /work/heavy/llama-server-build --ours

Requests are batch_serve.py's (imported): a distinct image each, a 96-token answer at temperature 0,
1/2/4/8 at once, streaming; tokens come from `usage`. With `--ours`, this tree's batched server
(`mqt-edge serve --parallel max(levels)`) is measured in the same rounds, interleaved level by level.
The peer reads every image as LLaVA-1.5 does (576 visual tokens); ours sends m = 16.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_serve import ROOT, Process, Server, burst, free_port, pct  # noqa: E402

SDIST = "llama-cpp-python==0.3.36"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]


def vendored_source(workdir: Path) -> Path:
    """vendor/llama.cpp from the llama-cpp-python 0.3.36 sdist, fetched from PyPI and unpacked once.

    The sdist's URL and sha256 come from PyPI's simple index (PEP 691 JSON, what pip reads):
    `pip download --no-binary` would first
    install the package's build backend only to read metadata, minutes on a small machine.
    """
    src = workdir / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    workdir.mkdir(parents=True, exist_ok=True)
    name, version = SDIST.split("==")
    index = httpx.get(f"https://pypi.org/simple/{name}/", timeout=60,
                      headers={"Accept": "application/vnd.pypi.simple.v1+json"}).raise_for_status().json()
    want = f"{name.replace('-', '_')}-{version}.tar.gz"
    sd = next(f for f in index["files"] if f["filename"] == want)
    sdist = workdir / want
    if not sdist.exists():
        data = httpx.get(sd["url"], timeout=600, follow_redirects=True).raise_for_status().content
        if hashlib.sha256(data).hexdigest() != sd["hashes"]["sha256"]:
            raise SystemExit(f"{want}: sha256 differs from PyPI's; delete {workdir} and rerun")
        sdist.write_bytes(data)
    with tarfile.open(sdist) as tar, tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tar.extractall(tmp, filter="data")
        shutil.move(str(next(Path(tmp).glob("*/vendor/llama.cpp"))), src)
    return src


def build(src: Path, build_dir: Path, jobs: int) -> Path:
    """cmake configure + build the llama-server target; reuses an existing binary."""
    binary = build_dir / "bin" / "llama-server"
    if binary.exists():
        return binary
    missing = [t for t in ("cmake", "g++") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"{' and '.join(missing)} not found: install them (apt-get install cmake g++) and rerun")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *gen, *CMAKE_FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", f"-j{jobs}"], check=True)
    return binary


def peer_mmproj(bundle: Path, model: str | None, out_dir: Path) -> Path:
    """The LLaVA-1.5 mmproj (f16) from the checkpoint the bundle was exported from (or `--model`)."""
    out = out_dir / "mmproj-f16.gguf"
    if out.exists():
        return out
    ckpt = Path(model or json.loads((bundle / "manifest.json").read_text())["source"]["path"])
    if not (ckpt / "config.json").exists():
        raise SystemExit(f"checkpoint {ckpt} is gone: regenerate it (mqt-edge synth --preset bench --out DIR) "
                         "and pass --model DIR")
    from peer_llava import write_mmproj
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_mmproj(ckpt, out, "f16")


class LlamaServer(Process):
    """llama-server as a subprocess on 127.0.0.1 and a free port; ready when /health answers 200."""

    def __init__(self, binary: Path, gguf: Path, mmproj: Path, slots: int, ctx_per_slot: int, threads: int) -> None:
        self.port, self.label, self.burst = free_port(), f"llama-server -np {slots}", functools.partial(burst, mqt=False)
        self.cmd = [str(binary), "-m", str(gguf), "--mmproj", str(mmproj), "-np", str(slots), "-cb",
                    "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads),
                    "--no-jinja", "--chat-template", "vicuna", "--host", "127.0.0.1", "--port", str(self.port),
                    "--no-webui"]
        self.launch(self.cmd)


def measure(servers: dict, levels: list[int], rounds: int, m: int, new: int) -> dict:
    """Interleaved rounds: for each level, each server in turn gets its own fresh images."""
    results: dict = {}
    seed = 10_000  # away from batch_serve's seeds, so no image repeats a cached one there
    for srv in servers.values():  # one untimed request each: first-touch page faults and thread start-up
        asyncio.run(srv.burst(srv.url, [seed], m, new, concurrent=False))
        seed += 1
    try:
        for r in range(rounds):
            for n in levels:
                for name, srv in servers.items():
                    got = asyncio.run(srv.burst(srv.url, list(range(seed, seed + n)), m, new, concurrent=True))
                    seed += n
                    results.setdefault((name, n), []).append(got)
                    print(f"round {r} n={n} {name}: {got['tok_s']:.1f} tok/s, {got['answers_s']:.2f} answers/s, "
                          f"TTFT p50 {1000 * statistics.median(got['ttft']):.0f} ms, {got['tokens']} tokens", flush=True)
    except KeyboardInterrupt:  # Ctrl-C keeps what was measured: the table marks the rounds each row has
        print("interrupted: the table below covers the rounds measured so far", flush=True)
    return results


def table(results: dict, names: list[str], levels: list[int]) -> str:
    rows = ["| server | concurrent | rounds | tok/s total | answers/s | TTFT p50 ms | TTFT p95 ms | tok/s vs its own 1 |",
            "|---|---|---|---|---|---|---|---|"]
    for n in levels:
        for name in names:
            gs = results.get((name, n))
            if not gs or (name, levels[0]) not in results:
                continue
            tok = statistics.median(g["tok_s"] for g in gs)
            lone = statistics.median(g["tok_s"] for g in results[(name, levels[0])])
            ttft = [t for g in gs for t in g["ttft"]]
            rows.append(f"| {name} | {n} | {len(gs)} | {tok:.1f} | {statistics.median(g['answers_s'] for g in gs):.2f} | "
                        f"{1000 * pct(ttft, 0.5):.0f} | {1000 * pct(ttft, 0.95):.0f} | {tok / lone:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--model", help="the checkpoint for the mmproj (default: the bundle manifest's source.path)")
    ap.add_argument("--src", type=Path, help="a llama.cpp source tree (default: llama-cpp-python 0.3.36's sdist)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/llama-server-peer"), help="sdist and mmproj")
    ap.add_argument("--build-dir", type=Path, default=Path("/tmp/llama-server-peer/build"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx-per-slot", type=int, default=1024)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--ours", action="store_true", help="measure this tree's batched server in the same rounds")
    ap.add_argument("--out")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    binary = build(a.src or vendored_source(a.workdir), a.build_dir, a.jobs)
    mmproj = peer_mmproj(a.bundle, a.model, a.workdir)
    servers: dict = {}
    try:
        servers["llama-server"] = LlamaServer(binary, a.bundle / "llm-q4_k_m.gguf", mmproj, max(levels),
                                              a.ctx_per_slot, a.threads)
        print(" ".join(servers["llama-server"].cmd), flush=True)
        if a.ours:
            servers["mqt-edge serve"] = Server(ROOT, str(a.bundle), max(levels), a.threads, "batched")
            servers["mqt-edge serve"].burst = burst
        results = measure(servers, levels, a.rounds, a.m, a.new)
    finally:
        for srv in servers.values():
            srv.stop()
    out = table(results, list(servers), levels)
    print(out)
    if a.out:
        Path(a.out).write_text(out + "\n")


if __name__ == "__main__":
    main()
