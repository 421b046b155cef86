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
from ..presets import QUERY_HEADS_KEY

VISION_PREFIX = "model.vision_tower.vision_tower."
MQT_PREFIX = "model.query_abstractor."
LLAVA_ARCHS = {"LlavaLlamaForCausalLM"}
LLAVA_MODEL_TYPES = {"llava_llama", "llava"}

# Files, in order of preference: (index file, single file).
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def read_json(path: Path, fix: str = "re-download or re-create the checkpoint") -> object:
    """A JSON file, or one line naming what is wrong with it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing", fix) from None
    except PermissionError:
        raise CheckpointError(f"{path} is not readable (permission denied)", "fix its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})", fix) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc.strerror})", fix) from None


def _typed(raw: dict, key: str, kind: type, default, path: Path):
    value = raw.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise CheckpointError(
            f"{path}: '{key}' is {value!r}, expected {kind.__name__}", "fix config.json or re-download the checkpoint"
        )
    return value


@dataclass(frozen=True)
class LlavaConfig:
    """The fields of an MQT-LLaVA config.json that the toolkit uses; `raw` keeps the rest."""

    path: Path
    raw: dict
    vision_tower: str
    select_layer: int
    pad_to_square: bool
    mqt_num_heads: int | None  # mm_query_num_heads as recorded; presets.query_heads decides without it
    eos_ids: tuple[int, ...]

    @classmethod
    def read(cls, ckpt_dir: Path) -> LlavaConfig:
        path = ckpt_dir / "config.json"
        if not path.is_file():
            raise CheckpointError(
                f"{ckpt_dir} has no config.json",
                "point at an MQT-LLaVA checkpoint directory (or make one: mqt-edge synth --preset tiny --out DIR)",
            )
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} is not a JSON object", "re-download the checkpoint")
        archs = raw.get("architectures") or []
        archs = set(archs) if isinstance(archs, list) and all(isinstance(a, str) for a in archs) else set()
        model_type = raw.get("model_type") if isinstance(raw.get("model_type"), str) else None
        tower = raw.get("mm_vision_tower")
        if not (archs & LLAVA_ARCHS or model_type in LLAVA_MODEL_TYPES) or not isinstance(tower, str) or not tower:
            kind = model_type if isinstance(model_type, str) else ",".join(sorted(archs)) or "unknown"
            raise CheckpointError(
                f"{ckpt_dir} is not an MQT-LLaVA checkpoint (model type '{kind}', "
                f"{'no mm_vision_tower' if not tower else 'not LlavaLlamaForCausalLM'})",
                "point at an MQT-LLaVA checkpoint such as gordonhu/MQT-LLaVA-7b",
            )
        feature = raw.get("mm_vision_select_feature", "patch")
        if feature != "patch":
            # The MQT's keys cover the patch grid only; the release runs only with "patch".
            raise CheckpointError(
                f"unsupported mm_vision_select_feature {feature!r} in {path}", "MQT-LLaVA uses 'patch'"
            )
        aspect = raw.get("image_aspect_ratio", "square")
        if aspect not in ("pad", "square"):
            raise CheckpointError(
                f"unsupported image_aspect_ratio {aspect!r} in {path}", "use 'pad' (the release) or 'square'"
            )
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            _typed(raw, key, int, None, path)
        _typed(raw, "max_position_embeddings", int, 4096, path)
        heads = _typed(raw, QUERY_HEADS_KEY, int, None, path)
        if heads is not None and heads < 1:
            raise CheckpointError(f"{path}: '{QUERY_HEADS_KEY}' is {heads}",
                                  "give the query transformer's head count (the release's is 16) or remove the field")
        eos = raw.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        if not eos_ids or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_ids):
            raise CheckpointError(f"{path}: eos_token_id is {eos!r}", "fix config.json (LLaMA uses 2)")
        return cls(
            path=ckpt_dir,
            raw=raw,
            vision_tower=tower,
            select_layer=_typed(raw, "mm_vision_select_layer", int, -2, path),
            pad_to_square=aspect == "pad",
            mqt_num_heads=heads,
            eos_ids=eos_ids,
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
                index_json = read_json(d / index)
                weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
                if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
                ):
                    raise CheckpointError(
                        f"{d / index} has no valid weight_map", "re-download the checkpoint"
                    )
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
        except PermissionError:
            raise CheckpointError(f"{path} is not readable (permission denied)", "fix its permissions") from None
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
        if key not in self.weight_map:
            raise CheckpointError(
                f"{self.dir} has no weight {key}", "the checkpoint is incomplete or of another model"
            )
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

    def shape(self, key: str) -> tuple[int, ...]:
        """A weight's shape without reading its data (safetensors) or with a lazy mmap (.bin)."""
        if key not in self.weight_map:
            return self.get(key).shape  # raises the one-line error
        name = self.weight_map[key]
        if name not in self._open:
            self._open[name] = self._load_file(self.dir / name)
        handle = self._open[name]
        if isinstance(handle, _SafetensorsFile):
            return tuple(handle.handle.get_slice(key).get_shape())
        return tuple(self.get(key).shape)

    def items(self, prefix: str = "", only: set[str] | None = None) -> Iterator[tuple[str, object]]:
        """(key, tensor) for keys under `prefix` (and in `only`), one shard open at a time."""
        keys = [k for k in self.with_prefix(prefix) if only is None or k in only]
        keys.sort(key=lambda k: (self.weight_map[k], k))
        current = None
        for key in keys:
            if self.weight_map[key] != current:
                self._open.clear()  # drop the previous shard's handle (and its mmap)
                current = self.weight_map[key]
            yield key[len(prefix) :], self.get(key)

    def close(self) -> None:
        self._open.clear()


class _SafetensorsFile:
    def __init__(self, handle) -> None:
        self.handle = handle
        self._keys = set(handle.keys())

    def keys(self):
        return self._keys

    def __getitem__(self, key: str):
        if key not in self._keys:
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
    # A relative name means the checkpoint's own folder first (never a look-alike in the cwd).
    for candidate in (ckpt_dir / spec, Path(spec).expanduser()):
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
