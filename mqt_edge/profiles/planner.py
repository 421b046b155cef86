"""The planner: predict memory and latency for each m on a device, and pick m.

Cost model (all terms documented in docs/planner.md):
  memory = LLM weights (at the quant) + vision and MQT weights (fp16 engine on TensorRT, fp32 on
           onnxruntime) + KV cache (context x layers x 2 x kv_heads x head_dim x 2 bytes)
           + compute buffers + vision activations/workspace + runtime overhead;
           with "sequential load" the vision encoder is freed before the LLM's peak, so memory is
           the larger of the two stages instead of their sum.
  latency = vision + MQT(m) + prefill(prompt + m) [= TTFT] + decode(n);
           each term a roofline max(FLOPs / compute, bytes / bandwidth) over an efficiency factor,
           or the profile's calibrated coefficients when it has them (`mqt-edge calibrate`).
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass, replace

from ..costs import (QUESTION_RESERVE, default_cache_budget, llm_param_count, mqt_flops, plan_cache, position_bytes,
                     vision_cost)
from ..errors import InputError, MQTEdgeError
from ..quants import CPU_REPACKED, QUANTS, check_vision_precision
from ..backends import backend_info
from . import Profile

CANDIDATES = (1, 2, 4, 8, 16, 36, 64, 144, 256)
QUANT_BITS = {name: q.bits for name, q in QUANTS.items()}  # one table: mqt_edge/quants.py
PROMPT_TOKENS = 40  # llava_v1 system prompt + "USER: " with a LLaMA tokenizer (BOS included)
QUESTION_TOKENS = 16
OVERHEAD_MB = {"jetson": 700.0, "gpu": 600.0, "cpu": 250.0}  # CUDA context + runtimes / Python + libraries
TRT_WORKSPACE_MB = 256.0
VISION_RELOAD_GBS = 2.0  # sequential load re-reads the vision weights for each new image
# onnxruntime's int8 vision graph (export --vision-quant int8) against its fp32 graph on a CPU, both
# compute-bound: the ratio measured on the bench preset's ViT-L/14-336 on an AVX2 CPU without VNNI
# (docs/export.md). CPUs with VNNI/AMX integer dot products gain more; `mqt-edge calibrate` with an
# int8 bundle measures the device's own figure.
INT8_VISION_SPEEDUP = 1.5


class PlanError(MQTEdgeError):
    """Nothing fits the device's limits."""


@dataclass(frozen=True)
class ModelFacts:
    """What the planner needs to know about a model, from a bundle or a synth preset."""

    name: str
    quant: str
    llm_params: int
    llm_bytes: int
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int
    context_length: int
    vision_params: int
    vision_flops: int
    patches: int
    vision_width: int
    mqt_bytes: int
    mqt_flops_image: int
    mqt_flops_token: int
    max_tokens: int
    prompt_tokens: int = PROMPT_TOKENS
    accuracy: tuple = ()  # ((m, accuracy), ...) from `mqt-edge eval`, when the bundle has it
    vision_int8_bytes: int = 0  # vision-int8.onnx's size; 0: the bundle has no int8 vision graph
    llm_repacked_bytes: int | None = None  # the GGUF's bytes in CPU_REPACKED types; None: by the quant's share

    @classmethod
    def from_bundle(cls, bundle) -> ModelFacts:
        m = bundle.manifest
        llm, vis, mqt = m.llm, m.vision, m.mqt
        acc = tuple((row.m, row.accuracy) for row in m.accuracy or ())
        int8 = m.artifacts.get("vision_int8")
        return cls(
            name=str(bundle.root), quant=llm.quant, llm_params=llm.params, llm_bytes=llm.bytes,
            layers=llm.layers, hidden=llm.hidden, kv_heads=llm.kv_heads, head_dim=llm.head_dim,
            vocab=llm.vocab, context_length=llm.context_length, vision_params=vis.params,
            vision_flops=vis.flops, patches=vis.patches, vision_width=vis.feature_dim,
            mqt_bytes=m.artifacts["mqt"].bytes,
            mqt_flops_image=mqt.flops_per_image, mqt_flops_token=mqt.flops_per_token,
            max_tokens=m.max_tokens, prompt_tokens=m.prompt.prefix_tokens or PROMPT_TOKENS,
            accuracy=acc, vision_int8_bytes=int8.total_bytes if int8 else 0,
            llm_repacked_bytes=None if llm.tensor_bytes is None else sum(
                n for kind, n in llm.tensor_bytes.items() if kind in CPU_REPACKED),
        )

    @classmethod
    def from_preset(cls, preset: str, quant: str) -> ModelFacts:
        from ..presets import get_preset  # data only: planning a preset needs no torch

        if quant not in QUANT_BITS:
            raise InputError(f"unknown quant '{quant}'", f"choose one of: {', '.join(QUANT_BITS)}")
        p = get_preset(preset)
        c, L = p.clip, p.llm
        h, heads = L["hidden_size"], L["num_attention_heads"]
        kv = L["num_key_value_heads"]
        params = llm_param_count(h, L["intermediate_size"], L["num_hidden_layers"], p.vocab_size, heads, kv)
        vis = vision_cost(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"] - 1,
                          c["image_size"], c["patch_size"])
        D, P, M = c["hidden_size"], vis["patches"], p.num_queries
        heads_mqt = p.query_heads  # the constant (heads, M, P) attention weights of mqt.onnx
        mqt = mqt_flops(P, D, h)
        return cls(
            name=f"preset {preset}", quant=quant, llm_params=params,
            llm_bytes=int(params * QUANT_BITS[quant] / 8), layers=L["num_hidden_layers"], hidden=h,
            kv_heads=kv, head_dim=h // heads, vocab=p.vocab_size, context_length=L["max_position_embeddings"],
            vision_params=vis["params"], vision_flops=vis["flops"], patches=P, vision_width=D,
            mqt_bytes=4 * (heads_mqt * M * P + D * D + D * h + 2 * D + h),
            mqt_flops_image=mqt["flops_per_image"], mqt_flops_token=mqt["flops_per_token"], max_tokens=M,
        )




@dataclass(frozen=True)
class Options:
    vision_on_cpu: bool = False
    sequential_load: bool = False  # free the vision graph after encoding (run --sequential)
    gpu_layers: int | None = None  # None: all layers (the profile's llm_on_gpu); clamped to 0..layers
    max_new_tokens: int = 128
    vision_precision: str = "auto"  # run --vision-precision: auto (int8 on a CPU when the bundle has it) | fp32 | int8
    parallel: int = 1  # requests (streams) the pipeline's shared context is sized for (Pipeline.load parallel=)
    question_tokens: int = QUESTION_TOKENS  # the question's ids after the visual tokens, when the request's are known

    @classmethod
    def for_run(cls, vision_backend: str | None, n_gpu_layers: int | None, sequential: bool,
                facts: ModelFacts, vision_precision: str | None = None) -> Options:
        """The planner's view of a run's backends: vision on the CPU, LLM layers on the GPU,
        sequential load, the vision graph's precision (`run`, `plan` and the Pipeline API all ask
        the same way)."""
        layers = None if n_gpu_layers is None or n_gpu_layers >= facts.layers else n_gpu_layers
        return cls(vision_on_cpu=backend_info(vision_backend).on_gpu is False, sequential_load=sequential,
                   gpu_layers=layers, vision_precision=check_vision_precision(vision_precision or "auto"))

    def label(self, facts: ModelFacts) -> str:
        parts = []
        if self.vision_on_cpu:
            parts.append("vision on the CPU")
        if self.sequential_load:
            parts.append("sequential load (vision freed before the LLM's peak)")
        if self.gpu_layers is not None:
            parts.append(f"{self.gpu_layers} of {facts.layers} LLM layers on the GPU")
        if self.vision_precision != "auto":
            parts.append(f"{self.vision_precision} vision")
        if self.parallel > 1:
            parts.append(f"a context for {self.parallel} requests")
        return ", ".join(parts) or "default"


@dataclass(frozen=True)
class Candidate:
    m: int
    memory_mb: float
    ttft_ms: float
    total_ms: float
    fits: bool


def _roofline_ms(flops: float, nbytes: float, tflops: float, gbs: float, eff_c: float, eff_b: float) -> float:
    return 1000 * max(flops / (tflops * 1e12 * eff_c), nbytes / (gbs * 1e9 * eff_b))


def _n_ctx(f: ModelFacts, m: int, o: Options) -> int:
    return f.prompt_tokens + m + o.question_tokens + o.max_new_tokens


def _n_prefill(m: int, o: Options) -> int:
    """Positions a request prefills: its m visual tokens and the question (`o.question_tokens`: the
    request's own when the caller knows it, else a typical 16). The prompt head (system prompt +
    "USER: ") is prefilled once per context and copied into each sequence's KV
    (llama_memory_seq_cp), so it costs no prefill per request."""
    return m + o.question_tokens


def _file_pages_kept(profile: Profile) -> bool:
    """On a CPU, llama.cpp's repack (extra buffer types) copies the weights of some types into
    anonymous memory and the mmapped GGUF pages stay resident beside it, so those weights count
    twice in RSS (`_repacked_bytes`). MQT_EDGE_EXTRA_BUFFERS=off loads without repack (the name is
    runtimes/llama.py's; not imported, so planning needs no llama_cpp)."""
    return profile.kind == "cpu" and os.environ.get("MQT_EDGE_EXTRA_BUFFERS", "auto").lower() != "off"


def _repacked_bytes(f: ModelFacts) -> float:
    """The repacked copy: the GGUF's bytes in the types the CPU backend repacks (quants.CPU_REPACKED;
    the rest is used from the file's pages), from the bundle's manifest, else the quant's usual share.
    On the 7B of the release's shapes at q4_k_m: 3,013 of 3,892 MiB (q6_K is not repacked). On an
    ARM CPU, which repacks more types (q5_K, q6_K, q8_0 with i8mm or dotprod), all of them count."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return f.llm_bytes
    if f.llm_repacked_bytes is not None:
        return f.llm_repacked_bytes
    q = QUANTS.get(f.quant)
    return f.llm_bytes * (q.repacked if q else 1.0)


def _kv_bytes(f: ModelFacts, m: int, o: Options) -> int:
    """KV one request reads per decode step: its own positions, f16 K and V."""
    return _n_ctx(f, m, o) * f.layers * 2 * f.kv_heads * f.head_dim * 2


def _context_bytes(f: ModelFacts, o: Options) -> int:
    """KV the runtime allocates, and llama.cpp zeroes, at start: the shared context of the pipeline's
    default cache plan (Pipeline.configure_cache), two conversations at their longest (the prompt
    head, the largest m, QUESTION_RESERVE) per request it is sized for, whatever m a request uses."""
    pos = position_bytes(f.layers, f.kv_heads, f.head_dim, f.quant == "f32")
    conv = min(f.context_length, f.prompt_tokens + f.max_tokens + QUESTION_RESERVE)
    budget = default_cache_budget(pos, f.prompt_tokens, conv, o.parallel)
    return plan_cache(budget, pos, conv, o.parallel, f.prompt_tokens).context_bytes


def _vision_on_gpu(profile: Profile, o: Options) -> bool:
    """Vision as the profile's fp16 engines on the GPU (TensorRT); onnxruntime's fp32 graph otherwise."""
    return profile.kind != "cpu" and not o.vision_on_cpu and backend_info(profile.prefer.vision_backend).fp16


def _vision_int8(profile: Profile, f: ModelFacts, o: Options) -> bool:
    """Does the int8 vision graph run? As the onnxruntime runner picks it: when the bundle has it
    and it is asked for, or (auto) when vision runs on the CPU."""
    if not f.vision_int8_bytes or o.vision_precision == "fp32" or _vision_on_gpu(profile, o):
        return False
    return o.vision_precision == "int8" or profile.kind == "cpu" or o.vision_on_cpu


def _vision_bytes(profile: Profile, f: ModelFacts, o: Options) -> int:
    """CLIP weights as loaded: an fp16 TensorRT engine, the int8 graph, or the fp32 graph on onnxruntime."""
    if _vision_int8(profile, f, o):
        return f.vision_int8_bytes
    return f.vision_params * (2 if _vision_on_gpu(profile, o) else 4)


def memory_breakdown(profile: Profile, f: ModelFacts, m: int, o: Options) -> dict:
    """Bytes of each part that counts against the device's memory limit, and the total in MB."""
    MB = 2**20
    gpu = profile.kind != "cpu"
    vision_on_gpu = _vision_on_gpu(profile, o)
    gpu_frac = _gpu_frac(o, f)
    # Discrete GPU: the budget is VRAM; CPU-side parts (vision on CPU, CPU layers) live in host RAM.
    on_budget = 1.0 if (profile.memory.unified or not gpu) else gpu_frac
    vision_counted = not (gpu and not profile.memory.unified and o.vision_on_cpu)
    paged = _file_pages_kept(profile)  # on a CPU with repack: the whole file's pages, and the repacked copy
    parts = {
        "llm_weights": (_repacked_bytes(f) if paged else f.llm_bytes) * on_budget,
        "llm_file_pages": f.llm_bytes if paged else 0,
        "kv_cache": _context_bytes(f, o) * on_budget,
        "compute_buffers": 4 * 512 * (f.vocab + 8 * f.hidden),  # llama.cpp: logits + activations of a ubatch
        "vision_weights": (_vision_bytes(profile, f, o) + f.mqt_bytes) * vision_counted,  # MQT graph: fp32
        "vision_activations": (4 * (f.patches + 1) * f.vision_width * 8
                               + (TRT_WORKSPACE_MB * MB if vision_on_gpu else 0)) * vision_counted,
    }
    # The LLM's weights stay loaded; with sequential load the vision graph is freed after encoding,
    # before the LLM allocates its KV cache and compute buffers (its peak), so only the larger of the
    # two counts on top of the weights.
    vision_stage = parts["vision_weights"] + parts["vision_activations"]
    llm_peak = parts["kv_cache"] + parts["compute_buffers"]
    stages = max(llm_peak, vision_stage) if o.sequential_load else llm_peak + vision_stage
    body = parts["llm_weights"] + parts["llm_file_pages"] + stages
    parts = {k: round(v / MB, 1) for k, v in parts.items()}
    parts["runtime_overhead"] = OVERHEAD_MB[profile.kind]
    parts["total_mb"] = round(body / MB + OVERHEAD_MB[profile.kind], 1)
    return parts


def _gpu_frac(o: Options, f: ModelFacts) -> float:
    return 1.0 if o.gpu_layers is None else min(max(o.gpu_layers, 0), f.layers) / f.layers


HOST_BANDWIDTH_GBS = 50.0  # a discrete GPU's host: CPU-side LLM layers stream weights from DDR


def _analytic(profile: Profile, f: ModelFacts, m: int, o: Options, prefill: int | None = None) -> dict[str, float]:
    """Roofline terms in ms: vision, mqt, prefill (of `prefill` positions in one batch; default one
    request's), decode (per token)."""
    mem, comp, eff = profile.memory, profile.compute, profile.efficiency
    gpu = profile.kind != "cpu"
    kv_bytes = _kv_bytes(f, m, o)
    vision_w = _vision_bytes(profile, f, o) + f.mqt_bytes
    cpu_tf = comp.cpu_gflops / 1000
    tf = comp.fp16_tflops if gpu else cpu_tf
    v_tf, v_eff = (cpu_tf, eff.cpu) if (o.vision_on_cpu or not gpu) else (tf, eff.compute)
    bw = mem.bandwidth_gbs
    v_flops = f.vision_flops / (INT8_VISION_SPEEDUP if _vision_int8(profile, f, o) else 1.0)
    out = {
        "vision": _roofline_ms(v_flops, vision_w, v_tf, bw, v_eff, eff.bandwidth),
        "mqt": _roofline_ms(f.mqt_flops_image + m * f.mqt_flops_token, f.mqt_bytes, v_tf, bw, v_eff, eff.bandwidth),
    }
    n_prefill = _n_prefill(m, o) if prefill is None else prefill
    on_gpu = gpu and profile.prefer.llm_on_gpu
    frac = _gpu_frac(o, f) if on_gpu else 0.0
    host_bw = bw if (mem.unified or not gpu) else HOST_BANDWIDTH_GBS
    for name, flops, nbytes in (("prefill", 2 * f.llm_params * n_prefill, f.llm_bytes),
                                ("decode", 2 * f.llm_params, f.llm_bytes + kv_bytes)):
        g = _roofline_ms(flops * frac, nbytes * frac, tf, bw, eff.compute, eff.bandwidth) if frac else 0.0
        c = _roofline_ms(flops * (1 - frac), nbytes * (1 - frac), cpu_tf, host_bw, eff.cpu, eff.bandwidth)
        out[name] = g + c
    return out


def predict(profile: Profile, f: ModelFacts, m: int, o: Options) -> tuple[float, float, float]:
    """(memory_mb, ttft_ms, total_ms) for m visual tokens."""
    memory_mb = memory_breakdown(profile, f, m, o)["total_mb"]
    t = terms(profile, f, m, o)
    ttft = t["vision"] + t["mqt"] + t["prefill"]
    total = ttft + t["decode"] * max(o.max_new_tokens - 1, 0)
    return memory_mb, ttft, total


def terms(profile: Profile, f: ModelFacts, m: int, o: Options, prefill: int | None = None) -> dict[str, float]:
    """Milliseconds of one request's stages at m: vision (with a sequential reload), mqt, prefill
    (of `prefill` positions in one batch; default the request's m + question), and decode per
    token of one sequence; calibrated when the profile has measurements."""
    n_prefill = _n_prefill(m, o) if prefill is None else prefill
    t = _analytic(profile, f, m, o, n_prefill)
    cal = profile.calibration
    if cal is not None:
        # Measured terms, scaled to this model; the options scale them as the roofline would.
        # (the vision graph's precision as calibrated: an fp32 measurement predicts an int8 run)
        base = _analytic(profile, f, m, Options(max_new_tokens=o.max_new_tokens,
                                                vision_precision=cal.vision_precision), n_prefill)
        ratio = lambda k: t[k] / base[k] if base[k] > 0 else 1.0  # noqa: E731
        scale_v = f.vision_flops / cal.vision_flops
        t = {
            "vision": cal.vision_ms * scale_v * ratio("vision"),
            "mqt": (cal.mqt_ms_fixed + cal.mqt_ms_per_token * m) * scale_v * ratio("mqt"),
            "prefill": _calibrated_prefill_ms(cal, n_prefill, f.llm_params / cal.llm_params) * ratio("prefill"),
            "decode": cal.decode_ms_per_token * f.llm_bytes / cal.llm_bytes * ratio("decode"),
        }
    if o.sequential_load:  # the vision graph is loaded again for each new image
        t["vision"] += 1000 * _vision_bytes(profile, f, o) / (VISION_RELOAD_GBS * 1e9)
    return t


def _calibrated_prefill_ms(cal, positions: int, params_ratio: float) -> float:
    """One batch of `positions` rows, from the calibration: through its measured points when it has
    them, else its fitted line. The points matter because the cost per position falls as the batch
    grows (the matmuls reuse each weight over more rows): on the bench preset's q4_k_m on a 2-core
    CPU, 13 positions took 430 ms and 267 took 5.4 s, and a straight line through all of them put
    570 ms into its fixed term, over-predicting small m by 20%. Scaled to another model by its
    parameters; beyond the last point, the last segment's slope."""
    pts = sorted(dict(cal.prefill_points).items())
    if not pts:
        return cal.prefill_ms_fixed + cal.prefill_ms_per_token * positions * params_ratio
    curve = [(0, 0.0)] + pts
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if positions <= x1:
            break
    return params_ratio * (y0 + (positions - x0) * (y1 - y0) / (x1 - x0))


@dataclass
class Plan:
    profile: str
    model: str
    options: str
    limits: dict
    candidates: list[Candidate]
    memory_breakdown_mb: dict  # of the chosen m (or m = 1 when nothing fits)
    chosen_m: int | None
    reason: str
    suggestions: list[dict]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["candidates"] = [asdict(c) for c in self.candidates]
        return d


def plan(profile: Profile, facts: ModelFacts, ttft_ms: float | None = None, memory_mb: float | None = None,
         max_new_tokens: int = 128, options: Options | None = None, accuracy_drop: float = 0.02) -> Plan:
    """Predict every candidate m and choose one; when nothing fits, say what would."""
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {max_new_tokens}", "ask for at least one new token")
    limits = {"memory_mb": float(memory_mb if memory_mb is not None else profile.limits.memory_mb),
              "ttft_ms": float(ttft_ms if ttft_ms is not None else profile.limits.ttft_ms)}
    if not all(math.isfinite(v) and v > 0 for v in limits.values()):
        raise InputError(f"limits must be positive numbers (memory {limits['memory_mb']} MB, TTFT "
                         f"{limits['ttft_ms']} ms)", "pass --ttft-ms and --memory-mb above 0")
    o = replace(options or Options(), max_new_tokens=max_new_tokens)
    cands = _candidates(profile, facts, o, limits)
    chosen, reason = _choose(cands, facts, limits, accuracy_drop)
    suggestions = [] if chosen is not None else _what_would_fit(profile, facts, o, limits)
    breakdown = memory_breakdown(profile, facts, chosen or cands[0].m, o)
    return Plan(profile.name + (f" ({profile.mode})" if profile.mode else ""), facts.name, o.label(facts), limits,
                cands, breakdown, chosen, reason, suggestions)


def _candidates(profile, facts, o, limits) -> list[Candidate]:
    out = []
    for m in sorted({c for c in CANDIDATES if c <= facts.max_tokens} | {facts.max_tokens}):
        mem, ttft, total = predict(profile, facts, m, o)
        fits = mem <= limits["memory_mb"] and ttft <= limits["ttft_ms"] and _n_ctx(facts, m, o) <= facts.context_length
        out.append(Candidate(m, round(mem, 1), round(ttft, 2), round(total, 2), fits))
    return out


def _choose(cands, facts, limits, accuracy_drop) -> tuple[int | None, str]:
    fitting = [c for c in cands if c.fits]
    if not fitting:
        worst = min(cands, key=lambda c: c.m)
        why = []
        if worst.memory_mb > limits["memory_mb"]:
            why.append(f"memory {worst.memory_mb:,.1f} MB > {limits['memory_mb']:,.1f} MB")
        if worst.ttft_ms > limits["ttft_ms"]:
            why.append(f"TTFT {worst.ttft_ms:,.1f} ms > {limits['ttft_ms']:,.1f} ms")
        return None, f"nothing fits, even m={worst.m}: " + ("; ".join(why) or "context too long")
    if facts.accuracy:
        acc = dict(facts.accuracy)
        scored = [c for c in fitting if c.m in acc]
        if scored:
            best = max(acc.values())  # the best the model reaches at any m, fitting or not
            good = [c for c in scored if acc[c.m] >= best - accuracy_drop]
            pick = min(good, key=lambda c: c.m)
            return pick.m, (f"smallest m within {accuracy_drop:.0%} of the best measured accuracy "
                                 f"({acc[pick.m]:.1%} vs {best:.1%}) that fits")
    pick = max(fitting, key=lambda c: c.m)
    # one decimal: the digits that decide a fit (5,800.3 > 5,800.0 must not print as 5,800 vs 5,800)
    return pick.m, (f"largest m that fits: memory {pick.memory_mb:,.1f} <= {limits['memory_mb']:,.1f} MB, "
                         f"TTFT {pick.ttft_ms:,.1f} <= {limits['ttft_ms']:,.1f} ms")


def _what_would_fit(profile, facts, o, limits) -> list[dict]:
    """Changes (as `run` flags) that make at least one m fit, cheapest first."""
    trials: list[tuple[str, ModelFacts, Options]] = []
    gpu = profile.kind != "cpu"
    if gpu and not profile.memory.unified and not o.vision_on_cpu:
        # On a Jetson the memory is shared: fp32 vision on the CPU would use more of it, not less.
        trials.append(("--vision-backend onnxruntime/cpu (vision on the CPU)", facts, replace(o, vision_on_cpu=True)))
    if not o.sequential_load:
        trials.append(("--sequential (free the vision encoder before the LLM's peak)", facts,
                       replace(o, sequential_load=True)))
    if gpu and not profile.memory.unified and not o.vision_on_cpu and not o.sequential_load:
        trials.append(("--vision-backend onnxruntime/cpu --sequential", facts,
                       replace(o, vision_on_cpu=True, sequential_load=True)))
    order = list(QUANT_BITS)
    for q in order[order.index(facts.quant) + 1:] if facts.quant in order else []:
        smaller = replace(facts, quant=q, llm_bytes=int(facts.llm_bytes * QUANT_BITS[q] / QUANT_BITS[facts.quant]))
        trials.append((f"re-export with --quant {q}", smaller, o))
    for n in (64, 32):
        if n < o.max_new_tokens:
            trials.append((f"--max-new-tokens {n} (a shorter context)", facts, replace(o, max_new_tokens=n)))
    if gpu and not profile.memory.unified:
        for layers in (facts.layers * 3 // 4, facts.layers // 2):
            if o.gpu_layers is None or layers < o.gpu_layers:
                trials.append((f"--n-gpu-layers {layers}", facts, replace(o, gpu_layers=layers)))
    out = []
    base = _candidates(profile, facts, o, limits)
    for label, fx, opt in trials:
        fitting = [c for c in _candidates(profile, fx, opt, limits) if c.fits]
        if fitting:
            best = max(fitting, key=lambda c: c.m)
            out.append({"change": label, "m": best.m, "memory_mb": best.memory_mb, "ttft_ms": best.ttft_ms})
    if not out:  # no option helps: say which limits would
        lo = min(base, key=lambda c: c.m)
        need = []
        if lo.memory_mb > limits["memory_mb"]:
            need.append(f"--memory-mb {math.ceil(lo.memory_mb)} (or a device with more memory)")
        if lo.ttft_ms > limits["ttft_ms"]:
            need.append(f"--ttft-ms {math.ceil(lo.ttft_ms)}")
        out.append({"change": " and ".join(need) or "a longer context", "m": lo.m,
                    "memory_mb": lo.memory_mb, "ttft_ms": lo.ttft_ms})
    return out


def cache_budget_bytes(pipe, m: int, max_new_tokens: int, memory_mb: float | None = None,
                       cache_mb: float | None = None) -> int:
    """The byte budget of a pipeline's caches (KV cells of the shared context and parked
    conversations): `cache_mb` when given, else the memory limit (`memory_mb` or the profile's) less
    everything but the KV cache: weights, vision, compute buffers and runtime overhead. The one
    function the server and the planner size the cache with."""
    if cache_mb is not None:
        return int(cache_mb * 2**20)
    from dataclasses import replace

    prof, facts = pipe.device_profile(), ModelFacts.from_bundle(pipe.bundle)
    opts = replace(Options.for_run(pipe.vision_backend, pipe.n_gpu_layers, pipe.sequential, facts),
                   max_new_tokens=max_new_tokens)
    parts = memory_breakdown(prof, facts, m, opts)
    limit = memory_mb if memory_mb is not None else prof.limits.memory_mb
    return int((limit - parts["total_mb"]) * 2**20 + parts["kv_cache"])
# Batched decode on a CPU: total tokens/s at n sequences over that at 1, as measured with
# llama-batched-bench on a 1.1B q4_k_m (57.2/68.9/84.5/99.1 tok/s at 1/2/4/8 sequences; docs/planner.md).
# `mqt-edge calibrate` replaces it with the device's own curve (Calibration.batch_tok_s).
DEFAULT_BATCH_SPEEDUP = ((1, 1.0), (2, 1.20), (4, 1.48), (8, 1.73))


def batch_speedup(profile: Profile, n: int) -> float:
    """Total decode tokens/s of n sequences in one llama_decode per step, over one sequence's:
    piecewise linear in log2(n), flat beyond the last point measured."""
    cal = profile.calibration
    pts = tuple(cal.batch_tok_s) if cal is not None and cal.batch_tok_s else ()
    curve = tuple((k, v / pts[0][1]) for k, v in pts) if pts else DEFAULT_BATCH_SPEEDUP
    if n <= curve[0][0]:
        return curve[0][1]
    for (n0, s0), (n1, s1) in zip(curve, curve[1:]):
        if n <= n1:
            w = (math.log2(n) - math.log2(n0)) / (math.log2(n1) - math.log2(n0))
            return s0 + w * (s1 - s0)
    return curve[-1][1]


@dataclass(frozen=True)
class StreamCandidate:
    m: int
    cycle_ms: float  # one answer for every stream: N x (vision + MQT) + one prefill of N frames + batched decode
    rate_hz: float  # answers per second per stream that this m sustains
    latency_ms: float  # a frame's wait, at worst: the whole cycle
    memory_mb: float
    meets: bool


@dataclass
class StreamPlan:
    profile: str
    model: str
    streams: int
    rate_hz: float | None
    latency_ms: float | None
    answer_tokens: int
    candidates: list[StreamCandidate]
    chosen_m: int | None
    reason: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["candidates"] = [asdict(c) for c in self.candidates]
        return d


def stream_cycle_ms(profile: Profile, f: ModelFacts, m: int, streams: int, answer_tokens: int,
                    o: Options | None = None) -> float:
    """Milliseconds to answer every stream once at m: each frame's vision, MQT and prefill, one frame
    after another; then the answers' tokens after the first, one llama_decode per step carrying one
    token of each stream. Nothing overlaps: on a CPU vision and the LLM's steps take turns for the
    cores (cores.py), and after an image vision waits for that request's prefill before the next
    image, so each frame prefills on its own, not in one batch with the others (measured on the
    bench preset: 2 prefill steps per answer, and a model that batched the frames' prefills
    over-predicted the rate by 10 to 21%)."""
    o = o or Options()
    t = terms(profile, f, m, o)
    step_ms = t["decode"] * streams / batch_speedup(profile, streams)
    return streams * (t["vision"] + t["mqt"] + t["prefill"]) + max(answer_tokens - 1, 0) * step_ms


def plan_streams(profile: Profile, facts: ModelFacts, streams: int, rate_hz: float | None = None,
                 latency_ms: float | None = None, answer_tokens: int = 16, options: Options | None = None,
                 memory_mb: float | None = None) -> StreamPlan:
    """The largest m, the same for every stream, at which `streams` streams each get `rate_hz`
    answers per second (and/or an answer within `latency_ms` of its frame) by the cost model."""
    if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
        raise InputError(f"streams {streams!r}", "give a whole number of streams, 1 or more")
    for name, v in (("rate", rate_hz), ("latency", latency_ms)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InputError(f"{name} {v!r}", f"give a {name} above 0")
    if rate_hz is None and latency_ms is None:
        raise InputError("no target for the streams", "give a rate per stream (Hz), a latency limit, or both")
    if answer_tokens < 1:
        raise InputError(f"answer tokens {answer_tokens}", "plan for at least one answer token")
    o = replace(options or Options(), max_new_tokens=answer_tokens)
    mem_limit = float(memory_mb if memory_mb is not None else profile.limits.memory_mb)
    cands = [_stream_candidate(profile, facts, m, streams, o, rate_hz, latency_ms, mem_limit)
             for m in sorted({c for c in CANDIDATES if c <= facts.max_tokens} | {facts.max_tokens})]
    meeting = [c for c in cands if c.meets]
    if meeting:
        pick = max(meeting, key=lambda c: c.m)
        reason = (f"largest m at which {streams} stream(s) each get {pick.rate_hz:,.2f} answers/s "
                  f"(cycle {pick.cycle_ms:,.1f} ms, memory {pick.memory_mb:,.1f} <= {mem_limit:,.1f} MB)")
    else:
        pick, lo = None, cands[0]
        reason = (f"nothing meets the target, even m={lo.m}: {lo.rate_hz:,.2f} answers/s per stream, "
                  f"cycle {lo.cycle_ms:,.1f} ms, memory {lo.memory_mb:,.1f} MB")
    return StreamPlan(profile.name + (f" ({profile.mode})" if profile.mode else ""), facts.name, streams,
                      rate_hz, latency_ms, answer_tokens, cands, pick.m if pick else None, reason)


def _stream_candidate(profile, facts, m, streams, o, rate_hz, latency_ms, mem_limit) -> StreamCandidate:
    cycle = stream_cycle_ms(profile, facts, m, streams, o.max_new_tokens, o)
    rate = 1000.0 / cycle
    # the pipeline's one context is sized for every stream (Pipeline.load parallel=streams)
    mem = memory_breakdown(profile, facts, m, replace(o, parallel=streams))["total_mb"]
    meets = ((rate_hz is None or rate >= rate_hz) and (latency_ms is None or cycle <= latency_ms)
             and mem <= mem_limit and _n_ctx(facts, m, o) <= facts.context_length)
    return StreamCandidate(m, round(cycle, 2), round(rate, 4), round(cycle, 2), round(mem, 1), meets)
