"""Reading MQT-LLaVA checkpoints: config, weight shards, tokenizer and the CLIP tower's location.

The release layout is a `LlavaLlamaForCausalLM` directory: `config.json` with the `mm_*` fields,
weights as safetensors or `.bin` (sharded with an index, or one file), the SentencePiece
`tokenizer.model`. The CLIP tower is normally not inside: `mm_vision_tower` names it.

Weights are read one tensor at a time (`WeightReader`), so loading never holds a second copy of
the model. `.bin` files are unpickled with `weights_only=True` only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import CheckpointError, require

VISION_PREFIX = "model.vision_tower.vision_tower."
MQT_PREFIX = "model.query_abstractor."
LLAVA_ARCHS = {"LlavaLlamaForCausalLM"}
LLAVA_MODEL_TYPES = {"llava_llama", "llava"}

# Files, in order of preference: (index file, single file).
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


@dataclass(frozen=True)
class LlavaConfig:
    """The fields of an MQT-LLaVA config.json that the toolkit uses; `raw` keeps the rest."""

    path: Path
    raw: dict
    vision_tower: str
    select_layer: int
    select_feature: str
    pad_to_square: bool
    mqt_num_heads: int | None  # optional override; default kv_dim // 64 as in the release

    @classmethod
    def read(cls, ckpt_dir: Path) -> LlavaConfig:
        path = ckpt_dir / "config.json"
        if not path.is_file():
            raise CheckpointError(
                f"{ckpt_dir} has no config.json",
                "point at an MQT-LLaVA checkpoint directory (or make one: mqt-edge synth --preset tiny --out DIR)",
            )
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{path} is not valid JSON ({exc})", "re-download or re-create the checkpoint"
            ) from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} is not a JSON object", "re-download the checkpoint")
        archs = set(raw.get("architectures") or [])
        if not (archs & LLAVA_ARCHS or raw.get("model_type") in LLAVA_MODEL_TYPES) or not raw.get(
            "mm_vision_tower"
        ):
            kind = raw.get("model_type") or ",".join(sorted(archs)) or "unknown"
            raise CheckpointError(
                f"{ckpt_dir} is not an MQT-LLaVA checkpoint (model type '{kind}', "
                f"{'no mm_vision_tower' if not raw.get('mm_vision_tower') else 'not LlavaLlamaForCausalLM'})",
                "point at an MQT-LLaVA checkpoint such as gordonhu/MQT-LLaVA-7b",
            )
        feature = raw.get("mm_vision_select_feature", "patch")
        if feature not in ("patch", "cls_patch"):
            raise CheckpointError(
                f"unsupported mm_vision_select_feature '{feature}' in {path}",
                "use 'patch' (the release) or 'cls_patch'",
            )
        aspect = raw.get("image_aspect_ratio", "square")
        if aspect not in ("pad", "square"):
            raise CheckpointError(
                f"unsupported image_aspect_ratio '{aspect}' in {path}", "use 'pad' (the release) or 'square'"
            )
        return cls(
            path=ckpt_dir,
            raw=raw,
            vision_tower=str(raw["mm_vision_tower"]),
            select_layer=int(raw.get("mm_vision_select_layer", -2)),
            select_feature=feature,
            pad_to_square=aspect == "pad",
            mqt_num_heads=raw.get("mm_query_num_heads"),
        )


class WeightReader:
    """Tensor-by-tensor access to a checkpoint's shards, without loading them all."""

    def __init__(self, ckpt_dir: Path) -> None:
        self.dir = ckpt_dir
        self.weight_map = self._find(ckpt_dir)  # key -> shard file name
        self._open: dict[str, object] = {}

    @staticmethod
    def _find(d: Path) -> dict[str, str]:
        for index, single in WEIGHT_LAYOUTS:
            if (d / index).is_file():
                try:
                    weight_map = json.loads((d / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise CheckpointError(
                        f"{d / index} is corrupt ({exc})", "re-download the checkpoint"
                    ) from None
                missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
                if missing:
                    raise CheckpointError(
                        f"{d} is missing {len(missing)} weight shard(s), e.g. {missing[0]}",
                        "finish the download (huggingface-cli download …) or re-copy the checkpoint",
                    )
                return dict(weight_map)
            if (d / single).is_file():
                return {k: single for k in WeightReader._keys_of(d / single)}
        raise CheckpointError(
            f"{d} has no weights (expected model.safetensors, pytorch_model.bin or a sharded index)",
            "finish the download or point at the checkpoint directory",
        )

    @staticmethod
    def _keys_of(path: Path) -> list[str]:
        return list(WeightReader._load_file(path).keys())

    @staticmethod
    def _load_file(path: Path):
        """A mapping-like handle on one shard: safetensors' lazy reader or a mmapped state dict."""
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                return _SafetensorsFile(safe_open(str(path), framework="pt"))
            torch = require("torch", "export")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # Files from the legacy (non-zip) serialiser cannot be memory-mapped.
                return torch.load(path, map_location="cpu", weights_only=True)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors, zipfile and the unpickler each raise their own
            raise CheckpointError(
                f"cannot read weights {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                "the file is corrupt or truncated; re-download it",
            ) from None

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.weight_map if k.startswith(prefix)]

    def get(self, key: str):
        name = self.weight_map[key]
        if name not in self._open:
            self._open[name] = self._load_file(self.dir / name)
        try:
            return self._open[name][key]
        except KeyError:
            raise CheckpointError(
                f"weight {key} is listed in the index but missing from {name}",
                "the shard is corrupt or from another version; re-download it",
            ) from None
        except Exception as exc:
            raise CheckpointError(
                f"cannot read {key} from {name}: {str(exc).splitlines()[0][:200]}",
                "the file is corrupt or truncated; re-download it",
            ) from None

    def items(
        self, prefix: str = "", only: set[str] | None = None, strip: bool = True
    ) -> Iterator[tuple[str, object]]:
        """(key, tensor) for keys under `prefix` (and in `only`), one shard open at a time."""
        keys = [k for k in self.with_prefix(prefix) if only is None or k in only]
        keys.sort(key=lambda k: (self.weight_map[k], k))
        current = None
        for key in keys:
            if self.weight_map[key] != current:
                self._open.clear()  # drop the previous shard's handle (and its mmap)
                current = self.weight_map[key]
            yield (key[len(prefix) :] if strip else key), self.get(key)

    def close(self) -> None:
        self._open.clear()


class _SafetensorsFile:
    def __init__(self, handle) -> None:
        self.handle = handle

    def keys(self):
        return self.handle.keys()

    def __getitem__(self, key: str):
        if key not in self.handle.keys():
            raise KeyError(key)
        return self.handle.get_tensor(key)


def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local checkpoint directory, downloading a hub id through huggingface_hub when online."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory", "pass the directory")
    text = str(path_or_hub_id)
    if _looks_like_hub_id(text):
        return _hub_download(text, "the model", "pass a local directory with the checkpoint instead")
    raise CheckpointError(
        f"no checkpoint at {path}",
        "pass an MQT-LLaVA directory or hub id, or make one: mqt-edge synth --preset tiny --out DIR",
    )


def resolve_vision_dir(spec: str, ckpt_dir: Path, configs_only: bool = False) -> Path:
    """Find the CLIP tower named by `mm_vision_tower` (or an override): a directory or a hub id.

    configs_only: the weights are inside the checkpoint, so fetch only the JSON files from a hub.
    """
    for candidate in (Path(spec).expanduser(), ckpt_dir / spec):
        if candidate.is_dir():
            return candidate
    if _looks_like_hub_id(spec):
        return _hub_download(
            spec,
            "the CLIP vision tower",
            f"download {spec} elsewhere and pass its directory with --vision-tower (vision_tower=…)",
            allow_patterns=["*.json"] if configs_only else ["*.json", "*.safetensors", "pytorch_model.bin"],
        )
    raise CheckpointError(
        f"vision tower not found: {spec}",
        "pass the CLIP directory with --vision-tower (vision_tower=…)",
    )


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _hub_download(repo_id: str, what: str, fix: str, allow_patterns: list[str] | None = None) -> Path:
    hub = require("huggingface_hub", "export")
    try:
        return Path(hub.snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as exc:  # offline, unknown repo, gated repo, interrupted download …
        reason = type(exc).__name__
        raise CheckpointError(
            f"cannot get {what} '{repo_id}' from the Hugging Face hub ({reason}; offline?)", fix
        ) from None
