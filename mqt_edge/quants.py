"""The LLM weight formats a bundle can carry: one table, read by the exporter (what to write, the
parity thresholds that gate it and the rule that applies them: `Quant.judge`) and by the planner
(how many bytes the weights take).

Ground layer: pure data, no imports beyond the standard library, so `plan` runs on a device install.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

MIN_DECIDED = 0.5  # share of positions an unquantised file's top-1 check must rest on

# ggml types llama.cpp's CPU backend repacks into an anonymous copy for multi-row products on x86 with
# AVX2 (ggml/src/ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type, in the llama.cpp that
# llama-cpp-python 0.3.36 vendors). Other types (q6_K, q5_K, q8_0, f16) are used from the mmapped file.
# ARM CPUs with i8mm or dotprod repack q5_K, q6_K and q8_0 too: there the planner counts every weight
# twice (profiles/planner.py, _repacked_bytes).
CPU_REPACKED = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})


@dataclass(frozen=True)
class Quant:
    name: str
    ftype: str  # llama.cpp's LLAMA_FTYPE_*
    bits: float  # average bits per weight, for size estimates (q4_k_m: 668 MB for the 1.10B bench LLM)
    repacked: float = 0.0  # share of the file's bytes in CPU_REPACKED types, for a model whose GGUF is not at hand
    # parity thresholds against transformers' fp32 logits (see docs/export.md)
    max_rel_err: float | None = None
    min_top1: float = 1.0
    max_kl: float | None = None

    @property
    def quantised(self) -> bool:
        """Quantised files are judged by KL and top-1; f32/f16 by relative error, as a conversion."""
        return self.max_kl is not None

    def judge(self, r: dict, enforced: bool = True) -> dict:
        """Add the verdict and thresholds to a logits report (exporters/parity.py:logits_report) of
        this file against the reference; `enforced=False` reports a quantised file without gating."""
        if not self.quantised:
            # Only decided positions count for top-1 (below the float noise either argmax is right);
            # at least half must be decided, or the check would be vacuous.
            r["pass"] = (r["rel_err"] <= self.max_rel_err and r["top1_decided"] >= self.min_top1
                         and r["decided_positions"] >= MIN_DECIDED * r["positions"])
            r["thresholds"] = {"max_rel_err": self.max_rel_err, "min_top1": self.min_top1, "min_decided": MIN_DECIDED}
            return r
        r["thresholds"] = {"max_kl": self.max_kl, "min_top1": self.min_top1}
        r["pass"] = (r["kl"] <= self.max_kl and r["top1"] >= self.min_top1) or not enforced
        if not enforced:
            r["enforced"] = False
            r["note"] = ("random-weight checkpoint: quantised-quality thresholds describe trained "
                         "models; the unquantised check gates the conversion")
        return r


QUANTS: dict[str, Quant] = {
    q.name: q
    for q in (
        Quant("f32", "LLAMA_FTYPE_ALL_F32", 32.0, max_rel_err=2e-3, min_top1=1.0),
        Quant("f16", "LLAMA_FTYPE_MOSTLY_F16", 16.0, max_rel_err=1e-2, min_top1=0.95),
        Quant("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", 8.5, min_top1=0.9, max_kl=0.01),
        Quant("q5_k_m", "LLAMA_FTYPE_MOSTLY_Q5_K_M", 5.7, min_top1=0.8, max_kl=0.05),
        # repacked: q4_K's share of q4_k_m's bytes was 0.771 on the bench LLM and 0.774 on the 7B
        Quant("q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.85, 0.77, min_top1=0.7, max_kl=0.1),
        # q4_0 (output.weight stays q6_K, as llama-quantize leaves it): on x86 CPUs llama.cpp repacks
        # every q4_0 matrix for multi-row products, so several streams batch better than with q4_k_m,
        # whose q6_K share is not repacked (docs/export.md, "Choosing the LLM's quant")
        # (repacked: 0.915 on the bench LLM)
        Quant("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", 4.63, 0.91, min_top1=0.7, max_kl=0.1),
    )
}


def get_quant(name: str) -> Quant:
    if name not in QUANTS:
        raise InputError(f"unknown quant '{name}'", f"choose one of: {', '.join(QUANTS)}")
    return QUANTS[name]


# Vision graph precisions a bundle may run (`run --vision-precision`); auto: int8 on the CPU when
# the bundle has it (docs/export.md).
VISION_PRECISIONS = ("auto", "fp32", "int8")


def check_vision_precision(name: str) -> str:
    if name not in VISION_PRECISIONS:
        raise InputError(f"unknown vision precision '{name}'", f"choose one of: {', '.join(VISION_PRECISIONS)}")
    return name
