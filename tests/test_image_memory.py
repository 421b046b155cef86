"""A big decode gives its memory back, and the server's check keeps its peak small (issue 25).

Each case runs in a fresh interpreter and decodes in a worker thread, as the server does (a thread's
malloc arena is where the freed blocks of a 64 MP decode used to stay: ~300 MB that never went back).
The image is a 64 MP JPEG (~250 MB as Pillow stores RGB, 4 bytes a pixel), decoded twice: the
first decode's 16 MB blocks are mapped one by one and unmapped on free, after which glibc raises its
mmap threshold, and the second decode's blocks stay in the arena (~175 MB, without the fix). At
16 MP nothing is kept even without the fix.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

CHILD = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
from mqt_edge.image import ImageSpec, preprocess, verify_image, CLIP_MEAN, CLIP_STD
def mb(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith(key))
spec = ImageSpec(336, (336, 336), CLIP_MEAN, CLIP_STD)
small, jpeg = (open(p, "rb").read() for p in sys.argv[1:3])
pool = ThreadPoolExecutor(1)
pool.submit(preprocess, small, spec).result()  # the thread, its arena and the imports exist before we measure
base = mb("VmRSS")
pool.submit(verify_image, jpeg).result()
check_peak = mb("VmHWM") - base
for _ in range(2):  # the first decode's blocks are mapped on their own; glibc then raises its threshold
    pool.submit(preprocess, jpeg, spec).result()
print(json.dumps({"check_peak": check_peak, "kept": mb("VmRSS") - base, "peak": mb("VmHWM") - base}))
"""


def picture(wh: tuple[int, int]) -> Image.Image:
    small = np.random.default_rng(0).integers(0, 256, (wh[1] // 64, wh[0] // 64, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(wh, Image.Resampling.BILINEAR)


def test_a_big_decode_is_given_back_and_the_check_stays_small(tmp_path: Path):
    files = [tmp_path / "small.png", tmp_path / "big.jpg"]
    picture((640, 480)).save(files[0])
    picture((9216, 6912)).save(files[1], quality=90)  # 63.7 MP, just under the 64 MP limit
    r = subprocess.run([sys.executable, "-c", CHILD, *map(str, files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["peak"] > 200, got  # the decode itself is real (~250 MB of pixels)...
    assert got["kept"] < 32, got  # ...and it is gone afterwards (without malloc_trim: ~175 MB kept)
    assert got["check_peak"] < 32, got  # the 1/8-scale check of a JPEG allocates ~4 MB, not ~250
