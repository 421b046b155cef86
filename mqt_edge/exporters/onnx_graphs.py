"""The "onnx" format: vision.onnx (onnx_vision.py), mqt.onnx (onnx_mqt.py), the optional ORT-fused
vision-ort.onnx, and their parity: each vision graph chained into mqt.onnx against PyTorch.
"""

from __future__ import annotations

from ..image import sample_images
from .job import ExportError, ExportJob


def build(job: ExportJob) -> None:
    from . import onnx_mqt, onnx_vision

    with job.stage("vision.onnx"):
        job.graphs["vision"] = onnx_vision.export_vision(job.model, job.tmp / "vision.onnx")
    with job.stage("mqt.onnx"):
        job.graphs["mqt"] = onnx_mqt.export_mqt(job.model.mqt, job.max_tokens, job.tmp / "mqt.onnx")
    job.artifacts |= {"vision": "vision.onnx", "mqt": "mqt.onnx"}
    if job.opts.optimize:
        with job.stage("optimize"):
            onnx_vision.optimize_vision(job.path("vision"), job.tmp / "vision-ort.onnx", job.model, job.opts.optimize)
        job.artifacts["vision_ort"] = "vision-ort.onnx"


def check(job: ExportJob) -> None:
    from . import parity

    with job.stage("parity: onnx"):
        job.report["onnx"] = r = _onnx_parity(job)
    if not r["pass"]:
        worst = max((v for role in ("vision", "vision_ort") if role in r
                     for v in r[role].values() if isinstance(v, dict)), key=lambda v: v["max_abs_err"])
        raise ExportError(
            f"parity failed for the ONNX graphs (max abs error {worst['max_abs_err']:.2e}, "
            f"min cosine {worst['min_cosine']:.6f}; thresholds {parity.ONNX_REL_TOL:g} x max(1, |ref|), "
            f"{parity.ONNX_MIN_COSINE})",
            "the export was discarded; report this with the checkpoint's origin",
        )


def cpu_session(path):
    """An onnxruntime CPU session that keeps its warnings to itself."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _onnx_parity(job: ExportJob) -> dict:
    """vision(.ort).onnx -> mqt.onnx against the PyTorch reference for m in {1, middle, max}."""
    import numpy as np
    import torch

    from . import parity

    model, M = job.model, job.max_tokens
    mqt = cpu_session(job.path("mqt"))
    images = sample_images(3)
    ms = sorted({1, max(1, M // 2 - 1), M})
    px = np.concatenate([model.pixel_values(im).numpy() for im in images])  # (3, 3, H, W)
    with torch.no_grad():
        ref_feats = model.image_features(torch.from_numpy(px))  # (3, P, C)
        ref_tokens = {m: model.mqt(ref_feats, m=m).numpy() for m in ms}  # (3, m, hidden)
    run = lambda f, ids: mqt.run(None, {"image_features": f, "query_ids": ids})[0]  # noqa: E731
    out = {"images": len(images), "tokens": ms}
    for role in [r for r in ("vision", "vision_ort") if r in job.artifacts]:
        feats = cpu_session(job.path(role)).run(None, {"pixel_values": px})[0]
        entry = {"features": parity.token_report(feats, ref_feats.numpy())}
        for m in ms:
            entry[f"m={m}"] = parity.token_report(run(feats, np.arange(m, dtype=np.int64)), ref_tokens[m])
        lo, hi = max(0, M // 4), M  # a window that does not start at 0: query_ids index, not count
        got = run(feats, np.arange(lo, hi, dtype=np.int64))
        entry[f"ids={lo}..{hi - 1}"] = parity.token_report(got, ref_tokens[M][:, lo:hi])
        entry["pass"] = all(v["pass"] for k, v in entry.items() if k != "features")
        out[role] = entry
    out["pass"] = all(out[r]["pass"] for r in ("vision", "vision_ort") if r in out)
    return out
