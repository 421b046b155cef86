"""Peak RSS and time of preprocessing one image, each in a fresh interpreter.

    python benchmarks/image_peak_rss.py            # 20000x1, 1x20000, 20000x3000 strips and a 640x480 frame

Each case writes a PNG, then a child process imports mqt_edge.image, preprocesses it for a 336-pixel
CLIP tower and reports VmHWM (its own peak resident set) and the wall time, or the one-line error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

CHILD = r"""
import json, sys, time
from mqt_edge.errors import MQTEdgeError
from mqt_edge.image import ImageSpec, preprocess, CLIP_MEAN, CLIP_STD
spec = ImageSpec(336, (336, 336), CLIP_MEAN, CLIP_STD)
def hwm_mb():  # this process's own peak (ru_maxrss would include the parent's, kept across exec)
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
base = hwm_mb()
t = time.perf_counter()
try:
    out = f"ok {preprocess(sys.argv[1], spec).shape}"
except MQTEdgeError as exc:
    out = f"refused: {exc}"
print(json.dumps({"seconds": round(time.perf_counter() - t, 3), "result": out,
                  "peak_mb": hwm_mb(), "after_import_mb": base}))
"""

CASES = [(640, 480), (20000, 1), (1, 20000), (20000, 3000)]


def measure(wh: tuple[int, int], tmp: Path) -> dict:
    path = tmp / f"{wh[0]}x{wh[1]}.png"
    Image.new("RGB", wh, (30, 140, 200)).save(path)
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True)
    if r.returncode:
        return {"size": wh, "file_bytes": path.stat().st_size, "crashed": r.returncode, "stderr": r.stderr[-300:]}
    return {"size": f"{wh[0]}x{wh[1]}", "file_bytes": path.stat().st_size, **json.loads(r.stdout)}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        for wh in CASES:
            print(json.dumps(measure(wh, Path(d))), flush=True)
