"""FP16 TensorRT engines built from a bundle's ONNX graphs, on the device that will run them.

Engines are specific to the GPU and the TensorRT version, so they are built on the target
(`mqt-edge engine --bundle DIR`, or `export --tensorrt` when the build host is the target) and the
manifest records both. Device side: it reads the ONNX graphs a bundle already has, so `mqt-edge
engine` needs neither torch nor the exporters. TensorRT is imported lazily (`load_tensorrt`).

Optimisation profiles: vision.onnx over the batch (1..max_batch); mqt.onnx over the batch and the
number of query ids m (1..max_tokens, tuned for `opt_tokens`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from .. import device
from ..atomic import atomic_dir
from ..bundle import Bundle, write_manifest
from .tensorrt import load_tensorrt  # the runtime's loader: TensorRT import and GPU check

if TYPE_CHECKING:
    from ..bundle import Graph


def gpu_name() -> str:
    """The GPU's name for the manifest (device.py's probes: NVML or nvidia-smi, else the Jetson module)."""
    found = device.gpus()
    return found[0].name if found else (device.jetson_model() or "unknown")


def build_engine(onnx_path: Path, engine_path: Path, shapes: dict[str, tuple], workspace_gb: float = 2.0) -> None:
    """Parse an ONNX file and serialise an FP16 engine with one optimisation profile.

    shapes: input name -> (min_shape, opt_shape, max_shape).
    """
    trt, logger, builder = load_tensorrt()
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name}")
    engine_path.write_bytes(bytes(blob))


def engine_shapes(graphs: Mapping[str, Graph], max_tokens: int, opt_tokens: int, max_batch: int) -> dict[str, dict[str, tuple]]:
    """The optimisation profiles of both graphs, from the shapes the manifest records (its `graphs`)."""
    v = graphs["vision"].inputs["pixel_values"]
    _, P, C = graphs["mqt"].inputs["image_features"]
    M = int(max_tokens)
    opt = max(1, min(opt_tokens, M))
    return {
        "vision": {"pixel_values": ((1, *v[1:]), (1, *v[1:]), (max_batch, *v[1:]))},
        "mqt": {
            "image_features": ((1, P, C), (1, P, C), (max_batch, P, C)),
            "query_ids": ((1,), (opt,), (M,)),
        },
    }


def tensorrt_version() -> str:
    import tensorrt as trt

    return trt.__version__


def build_engines(src: Path, dst: Path, graphs: Mapping[str, Graph], max_tokens: int, opt_tokens: int, max_batch: int) -> dict:
    """vision.engine and mqt.engine in dst, built from src's ONNX files; their manifest entries."""
    from ..bundle import artifact_entry

    shapes = engine_shapes(graphs, max_tokens, opt_tokens, max_batch)
    entries = {}
    for role in ("vision", "mqt"):
        build_engine(src / f"{role}.onnx", dst / f"{role}.engine", shapes[role])
        entries[f"{role}_trt"] = replace(artifact_entry(dst, f"{role}.engine"), tensorrt=tensorrt_version(),
                                         gpu=gpu_name(), opt_tokens=opt_tokens, max_batch=max_batch)
    return entries


def build_engines_in_bundle(bundle_dir: Path, opt_tokens: int = 64, max_batch: int = 4) -> Bundle:
    """`mqt-edge engine`: add TensorRT engines to an existing bundle, on the target device; the
    same engine build as export's "tensorrt" format, reading the ONNX graphs in place."""
    load_tensorrt()  # one line saying what to install, or that no GPU is visible, before any work
    bundle = Bundle.open(bundle_dir)
    # Staged in this process's own hidden directory inside the bundle (a dead build's is removed on the
    # next run), so two builds never share one; the engines join the bundle only once both are built.
    with atomic_dir(bundle_dir / "engines", install=_keep_in_place) as tmp:
        entries = build_engines(bundle_dir, tmp, bundle.manifest.graphs, bundle.max_tokens, opt_tokens, max_batch)
        for entry in entries.values():
            os.replace(tmp / entry.path, bundle_dir / entry.path)
        write_manifest(bundle_dir, replace(bundle.manifest, artifacts={**bundle.manifest.artifacts, **entries}))
    return Bundle.open(bundle_dir)


def _keep_in_place(tmp: Path, out: Path) -> None:
    """The engines were moved into the bundle inside the block: nothing is left to install."""
