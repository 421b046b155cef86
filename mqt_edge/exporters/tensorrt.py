"""The "tensorrt" export format: FP16 engines built when the build host is the target device.

The engine build itself is device code (runtimes/engines.py, which `mqt-edge engine` also runs);
this module is the export table's row for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..runtimes.engines import build_engines, engine_shapes, gpu_name  # noqa: F401  (the format's parts)

if TYPE_CHECKING:
    from .job import ExportJob


def build(job: ExportJob) -> None:
    """The "tensorrt" format (export --tensorrt, when the build host is the target)."""
    with job.stage("tensorrt"):
        job.entries |= build_engines(job.tmp, job.tmp, job.graphs, job.max_tokens, job.opts.opt_tokens,
                                     job.opts.max_batch)
