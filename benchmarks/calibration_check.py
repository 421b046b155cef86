"""After `mqt-edge calibrate`, does the planner predict `run --json`'s TTFT within 15%?

    python benchmarks/calibration_check.py --bundle bundles/bench --out docs/calibration.md

Calibrates this device with the bundle (writing a profile to a temporary file), then runs
`mqt-edge run --json --tokens m` for m in {2, 16, 64, 256} (median of --runs) and compares each
measured TTFT with the planner's prediction from the calibrated profile.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mqt_edge.bundle import Bundle
from mqt_edge.image import sample_images
from mqt_edge.profiles import load_profile
from mqt_edge.profiles.planner import ModelFacts, Options, predict

QUESTION = "What is in this image?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        prof_path = d / "this-device.toml"
        subprocess.run([sys.executable, "-m", "mqt_edge", "calibrate", "--bundle", args.bundle, "--out",
                        str(prof_path), "--base", "cpu"], check=True)
        profile = load_profile(str(prof_path))
        image = d / "image.png"
        sample_images(1, seed=3)[0].save(image)
        facts = ModelFacts.from_bundle(Bundle.open(args.bundle, verify=False))
        rows = []
        for m in (2, 16, 64, 256):
            measured = []
            for _ in range(args.runs):
                r = subprocess.run([sys.executable, "-m", "mqt_edge", "run", str(image), QUESTION, "--bundle",
                                    args.bundle, "--tokens", str(m), "--max-new-tokens", "8", "--json"],
                                   capture_output=True, text=True, check=True)
                measured.append(json.loads(r.stdout)["timings_ms"]["ttft"])
            _, predicted, _ = predict(profile, facts, m, Options(max_new_tokens=8))
            got = statistics.median(measured)
            rows.append({"m": m, "measured_ttft_ms": round(got, 1), "predicted_ttft_ms": round(predicted, 1),
                         "error": round((predicted - got) / got, 4)})
        cal = profile.calibration
    report = {"calibration": vars(cal), "rows": rows, "max_abs_error": max(abs(r["error"]) for r in rows)}
    print(json.dumps(report, indent=1))
    if args.out:
        lines = ["# Calibration check", "",
                 f"`python benchmarks/calibration_check.py --bundle {args.bundle} --runs {args.runs}` "
                 "(2-core build machine, CPU only, bench preset bundle at q4_k_m)", "",
                 f"Calibrated: vision {cal.vision_ms:.0f} ms; MQT {cal.mqt_ms_fixed:.2f} + {cal.mqt_ms_per_token:.4f} ms/token; "
                 f"prefill {cal.prefill_ms_fixed:.0f} + {cal.prefill_ms_per_token:.2f} ms/position; "
                 f"decode {cal.decode_ms_per_token:.1f} ms/token; peak {cal.peak_mb:,.0f} MB.", "",
                 "| m | measured TTFT (run --json, median) | predicted TTFT | error |", "|---|---|---|---|"]
        lines += [f"| {r['m']} | {r['measured_ttft_ms']:.0f} ms | {r['predicted_ttft_ms']:.0f} ms | {r['error']:+.1%} |"
                  for r in rows]
        lines += ["", f"Largest error: {report['max_abs_error']:.1%} (target: within 15%)."]
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
