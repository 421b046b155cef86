"""7B-shaped checks (about 14 GB of disk and 15 GB of RAM): `bash scripts/test.sh -m heavy`.

Set MQT_EDGE_7B_DIR to reuse an existing `mqt-edge synth --preset mqt-llava-7b` directory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt_7b(tmp_path_factory):
    given = os.environ.get("MQT_EDGE_7B_DIR")
    if given and Path(given, "config.json").is_file():
        return Path(given)
    out = Path(given) if given else tmp_path_factory.mktemp("heavy") / "mqt-llava-7b"
    code = ("import resource, sys; from mqt_edge.model.synth import write_checkpoint; "
            "write_checkpoint('mqt-llava-7b', sys.argv[1]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    # Writing streams shard by shard: far below the 14 GB the model weighs at fp16.
    assert int(r.stdout.strip()) < 6 * 2**30
    return out


def test_loading_7b_peaks_below_1_2x_its_fp16_size(ckpt_7b):
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "load_peak_rss.py"), str(ckpt_7b), "--touch"],
        capture_output=True, text=True, check=True,
    )
    report = json.loads(r.stdout.strip().splitlines()[-1])
    print(report)
    assert report["params"] > 6.9e9
    assert report["ratio"] <= 1.2, report
