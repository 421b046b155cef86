"""Peak and after-RSS of one big image, each case in a fresh process: the library and the server.

    python benchmarks/image_memory.py                      # preprocess() on 1, 16 and 64 MP, PNG and JPEG
    python benchmarks/image_memory.py --bundle B           # also a fresh `mqt-edge serve` per image
    PYTHONPATH=/path/to/older/tree python benchmarks/image_memory.py --bundle B   # the same for older code

The images are 4:3 (a camera's shape), smooth content with shapes and edges, so that a PNG of 64 MP
stays a few MB. Library rows: a child process imports mqt_edge.image, preprocesses the file for a
336-pixel CLIP tower and reports its RSS after import, its peak (VmHWM) and its RSS after the call
(after gc). Server rows: `mqt-edge serve` on 127.0.0.1, one chat request with the image as a data URL,
then the server's RSS before the request, its peak and its RSS 2 s after the answer. Children run
with this process's PYTHONPATH, which picks the code under test.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_serve import Process, free_port  # noqa: E402

SIZES = {"1 MP": (1155, 866), "16 MP": (4619, 3464), "64 MP": (9237, 6928)}  # 4:3, 64 MP just under the limit

CHILD = r"""
import gc, json, sys, time
from mqt_edge.image import ImageSpec, preprocess, CLIP_MEAN, CLIP_STD
def status(key):  # this process's own figures (ru_maxrss would include the parent's, kept across exec)
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith(key))
spec = ImageSpec(336, (336, 336), CLIP_MEAN, CLIP_STD)
base = status("VmRSS")
t = time.perf_counter()
x = preprocess(sys.argv[1], spec)
seconds = time.perf_counter() - t
gc.collect()
print(json.dumps({"base_mb": base, "peak_mb": status("VmHWM"), "after_mb": status("VmRSS"),
                  "seconds": round(seconds, 2), "shape": list(x.shape)}))
"""


def make_image(wh: tuple[int, int], path: Path) -> int:
    """Shapes on a gradient, drawn at 1/8 scale and enlarged (a smooth photo-like picture, not noise)."""
    w, h = wh
    sw, sh = max(8, w // 8), max(8, h // 8)
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    arr = np.stack([40 + 150 * x / sw, 60 + 120 * y / sh, 200 - 100 * (x + y) / (sw + sh)], axis=-1)
    small = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(small)
    for i in range(12):
        cx, cy, r = (i * 37) % sw, (i * 53) % sh, 5 + (i * 11) % max(6, sh // 4)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=((i * 70) % 256, (i * 130) % 256, (i * 30) % 256))
    big = small.resize(wh, Image.Resampling.BILINEAR)
    if path.suffix == ".jpg":
        big.save(path, quality=90)
    else:
        big.save(path, compress_level=6)
    return path.stat().st_size


def library_case(path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=600)
    if r.returncode:
        return {"error": r.stderr.strip().splitlines()[-1]}
    return json.loads(r.stdout)


def _proc_mb(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) // 1024 for line in text.splitlines() if line.startswith(key))


def server_case(path: Path, bundle: str) -> dict:
    import httpx

    srv = Process()
    srv.port, srv.label = free_port(), "mqt-edge serve"
    try:
        srv.launch([sys.executable, "-m", "mqt_edge", "serve", "--bundle", bundle, "--port", str(srv.port),
                    "--max-body-mb", "64", "--model-name", "m", "--max-new-tokens", "4"])
    except RuntimeError as exc:  # exited or never healthy: a row that says so
        return {"error": str(exc)}
    try:
        kind = "jpeg" if path.suffix == ".jpg" else "png"
        image_url = f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()
        body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What color is the circle?"},
            {"type": "image_url", "image_url": {"url": image_url}}]}]}
        pid = srv.proc.pid
        base = _proc_mb(pid, "VmRSS")
        t = time.perf_counter()
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=300)
        seconds = time.perf_counter() - t
        time.sleep(2)
        return {"status": r.status_code, "base_mb": base, "peak_mb": _proc_mb(pid, "VmHWM"),
                "after_mb": _proc_mb(pid, "VmRSS"), "seconds": round(seconds, 2)}
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="also measure a fresh `mqt-edge serve` of this bundle per image")
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: " + ", ".join(SIZES))
    args = ap.parse_args()
    print(json.dumps({"pythonpath": os.environ.get("PYTHONPATH", "")}), flush=True)
    with tempfile.TemporaryDirectory() as d:
        for name in args.sizes.split(","):
            for ext in (".png", ".jpg"):
                path = Path(d) / f"{name.replace(' ', '')}{ext}"
                size = make_image(SIZES[name], path)
                row = {"image": f"{name} {ext[1:].upper()}", "file_mb": round(size / 2**20, 1),
                       "library": library_case(path)}
                if args.bundle:
                    row["server"] = server_case(path, args.bundle)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
