"""SIGKILL an export at 10 points (5 in a fresh export, 5 in a re-export over a bundle holding user
files, 3 of them inside the file swap) and check each time that nothing unclean is left.

    python benchmarks/interrupted_export.py [--ckpt DIR]     # default: a fresh `synth --preset tiny`

Clean means: DIR is either not a bundle (`Bundle.open` refuses it) or a bundle whose every sha256
verifies; the user's files are intact; and the next export onto DIR succeeds, verifies, keeps the
user's files and leaves no staging directory or journal behind. Prints one line per point and N/10.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import os, signal, sys
from pathlib import Path
import mqt_edge.bundle as bundle
from mqt_edge.exporters import ExportOptions, export

ckpt, out, kind, arg = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
on_stage = lambda s: None
if kind == "stage":
    on_stage = lambda s: die() if s == arg else None
elif kind == "journal":  # right after the journal is written, before manifest.json goes
    write = bundle._write_json
    bundle._write_json = lambda p, d: (write(p, d), die())
elif kind in ("first-move", "before-manifest"):
    replace, moved = os.replace, []
    def hooked(src, dst):
        src, dst = Path(src), Path(dst)
        if dst.parent == out and not dst.name.startswith(".mqt-edge"):  # artifacts and manifest, not the journal
            if kind == "before-manifest" and dst.name == "manifest.json":
                die()
            replace(src, dst)
            moved.append(dst)
            if kind == "first-move" and len(moved) == 1:
                die()
            return
        replace(src, dst)
    bundle.os.replace = hooked
export(ExportOptions(model=ckpt, out=out, quant="f32", max_tokens=int(os.environ.get("MAX_TOKENS", "8"))),
       on_stage=on_stage)
"""

POINTS = [("fresh", "stage", "load"), ("fresh", "stage", "vision.onnx"), ("fresh", "stage", "parity: onnx"),
          ("fresh", "stage", "gguf (f32)"), ("fresh", "stage", "manifest"),
          ("re-export", "stage", "mqt.onnx"), ("re-export", "stage", "parity: gguf f32"),
          ("re-export", "journal", "-"), ("re-export", "first-move", "-"), ("re-export", "before-manifest", "-")]
USER = {"my_notes.txt": "notes", "eval/run1.json": "{}"}


def child(ckpt: Path, out: Path, kind: str, arg: str, max_tokens: int) -> int:
    env = {**__import__("os").environ, "MAX_TOKENS": str(max_tokens)}
    return subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(out), kind, arg], env=env,
                          capture_output=True, text=True).returncode


def state(out: Path) -> str:
    from mqt_edge.bundle import Bundle, BundleError

    try:
        b = Bundle.open(out)  # verifies every sha256
        return f"bundle(max_tokens={b.max_tokens})"
    except BundleError as exc:
        return "not a bundle" if "no bundle" in str(exc) else f"BROKEN: {exc}"


def leftovers(out: Path) -> list[str]:
    found = [p.name for p in out.parent.iterdir() if ".partial-" in p.name]
    return found + ([".mqt-edge-replacing.json"] if (out / ".mqt-edge-replacing.json").exists() else [])


def user_ok(out: Path) -> bool:
    return all((out / k).is_file() and (out / k).read_text() == v for k, v in USER.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        ckpt = args.ckpt
        if ckpt is None:
            from mqt_edge.model.synth import write_checkpoint

            ckpt = write_checkpoint("tiny", root / "tiny")
        clean = 0
        for i, (phase, kind, arg) in enumerate(POINTS, 1):
            out = root / ("fresh" if phase == "fresh" else "bp") / "b"
            out.parent.mkdir(exist_ok=True)
            if phase == "re-export" and not (out / "manifest.json").exists():
                assert child(ckpt, out, "none", "-", 8) == 0
            if phase == "re-export":
                for k, v in USER.items():
                    (out / k).parent.mkdir(exist_ok=True)
                    (out / k).write_text(v)
            rc = child(ckpt, out, kind, arg, 4 + i)  # a different max_tokens each time: old vs new visible
            after_kill = state(out)
            users = user_ok(out) if phase == "re-export" else True
            rc2 = child(ckpt, out, "none", "-", 4 + i)
            recovered = state(out)
            ok = (rc == -9 and not after_kill.startswith("BROKEN") and users and rc2 == 0
                  and recovered == f"bundle(max_tokens={4 + i})" and not leftovers(out)
                  and (user_ok(out) if phase == "re-export" else True))
            clean += ok
            print(json.dumps({"point": i, "phase": phase, "kill": f"{kind}:{arg}", "exit": rc, "after_kill": after_kill,
                              "user_files_kept": users, "recovery_exit": rc2, "after_recovery": recovered,
                              "leftovers": leftovers(out), "clean": ok}), flush=True)
            if phase == "fresh":
                import shutil

                shutil.rmtree(out.parent)
        print(f"{clean}/{len(POINTS)} clean")


if __name__ == "__main__":
    main()
