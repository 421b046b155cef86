"""Bundles: the self-describing directory an export writes and a device runs.

    DIR/manifest.json   what is inside, with a sha256 per artifact (written last)
    DIR/vision.onnx     pixel_values (B, 3, H, W) -> image_features (B, P, C)
    DIR/mqt.onnx        image_features, query_ids (m,) -> visual_tokens (B, m, hidden)
    DIR/llm-<quant>.gguf

Torch-free: the runtime opens bundles. An export is built in a hidden staging directory and
renamed into place only once the manifest is written, so an interrupted export never leaves a
directory that `Bundle.open` accepts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import InputError, MQTEdgeError

FORMAT_VERSION = 1
REQUIRED = ("mqt_edge_version", "max_tokens", "artifacts", "preprocess", "prompt", "llm", "vision", "mqt")
MANIFEST = "manifest.json"
DEFAULT_BUNDLE = Path("mqt-edge-bundle")


class BundleError(MQTEdgeError):
    """A bundle is missing, corrupt, or of a format this version cannot read."""


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def artifact_entry(root: Path, rel: str) -> dict:
    """{path, sha256, bytes} of a file under root, including its ONNX external data if any."""
    path = root / rel
    entry = {"path": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    data = path.with_name(path.name + ".data")
    if data.is_file():
        entry["data"] = {"path": data.name, "sha256": sha256_file(data), "bytes": data.stat().st_size}
    return entry


@dataclass
class Bundle:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | os.PathLike = DEFAULT_BUNDLE, verify: bool = True) -> Bundle:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise BundleError(
                f"no bundle at {root} (no {MANIFEST})",
                "make one with: mqt-edge export MODEL --out " + str(root),
            )
        try:
            manifest = json.loads(path.read_text())
            version = int(manifest["format_version"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path} is corrupt ({exc})", "re-export the bundle") from None
        if version > FORMAT_VERSION:
            raise BundleError(
                f"{root} has bundle format {version}; this mqt-edge reads up to {FORMAT_VERSION}",
                "upgrade mqt-edge (pip install -U mqt-edge) or re-export with this version",
            )
        missing = [k for k in REQUIRED if k not in manifest] + [
            r for r in ("vision", "mqt", "llm") if r not in manifest.get("artifacts", {})]
        if missing:
            raise BundleError(f"{path} lacks {', '.join(missing)}", "re-export the bundle")
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check every artifact's size and sha256 against the manifest."""
        for role, entry in self.manifest.get("artifacts", {}).items():
            for item in (entry, entry.get("data")):
                if not item:
                    continue
                path = self.root / item["path"]
                if not path.is_file():
                    raise BundleError(f"bundle artifact missing: {path} ({role})", "re-export the bundle")
                if path.stat().st_size != item["bytes"] or sha256_file(path) != item["sha256"]:
                    raise BundleError(
                        f"bundle artifact {path} does not match its sha256 in {MANIFEST} ({role})",
                        "the file is corrupt or was changed; re-export or re-copy the bundle",
                    )

    def path(self, role: str) -> Path:
        try:
            return self.root / self.manifest["artifacts"][role]["path"]
        except KeyError:
            raise BundleError(f"the bundle at {self.root} has no '{role}' artifact", "re-export it") from None

    @property
    def max_tokens(self) -> int:
        return int(self.manifest["max_tokens"])


def check_output_dir(out: Path) -> None:
    """An export may write to a new path, an empty directory, or replace an existing bundle."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out} exists and is not a directory", "choose another --out")
    if out.resolve() == Path.cwd().resolve() or out.resolve().parent == out.resolve():
        raise InputError(f"--out {out} is the current or root directory", "name a new directory for the bundle")
    if any(out.iterdir()) and not is_bundle(out):
        raise InputError(
            f"{out} exists and is not an mqt-edge bundle",
            "choose another --out (an export only replaces an existing bundle)",
        )


def is_bundle(path: Path) -> bool:
    """A directory an export may replace: its manifest is one of ours (not any manifest.json)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return isinstance(manifest, dict) and "mqt_edge_version" in manifest and "format_version" in manifest
    except (OSError, ValueError):
        return False


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield a hidden directory beside `out`; on success it replaces `out`, on failure it vanishes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed export
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise RuntimeError("staging finished without a manifest")  # a bug, not a user error
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the user's bundle back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(root: Path, manifest: dict) -> None:
    """Written last, via a temporary name: its presence is what makes a directory a bundle."""
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, root / MANIFEST)
