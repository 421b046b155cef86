"""The AMX guard: every GGUF load avoids llama.cpp's crashing AMX buffer on AMX CPUs (issue 13).

The decision is tested everywhere with a faked CPU and build; the regression test decodes for real
with this machine's natively built llama.cpp and runs only where the crash can happen."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mqt_edge.device import CpuInfo, cpu_info
from mqt_edge.errors import InputError
from mqt_edge.runtimes import llama as rt

AMX_FLAGS = frozenset({"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"})
AMX_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | REPACK = 1 |"
PLAIN_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | REPACK = 1 |"


def fake(monkeypatch, flags: frozenset[str], build: str | None) -> list[int]:
    """Pretend this CPU has `flags` and llama.cpp reports `build`; count the llama.cpp queries."""
    calls: list[int] = []

    def info() -> str:
        calls.append(1)
        if build is None:
            raise AssertionError("the guard asked llama.cpp on a CPU without AMX")
        return build

    monkeypatch.setattr(rt, "cpu_info", lambda: CpuInfo("fake", "x86_64", 2, flags))
    monkeypatch.setattr(rt, "system_info", info)
    monkeypatch.delenv(rt.EXTRA_BUFFERS_ENV, raising=False)
    return calls


def test_amx_cpu_with_amx_build_loads_without_extra_buffers(monkeypatch):
    fake(monkeypatch, AMX_FLAGS, AMX_BUILD)
    on, why = rt.amx_guard()
    assert on and "AMX" in why
    assert rt.model_params(0).use_extra_bufts is False


def test_amx_cpu_with_a_build_without_amx_keeps_extra_buffers(monkeypatch):
    fake(monkeypatch, AMX_FLAGS, PLAIN_BUILD)
    assert rt.amx_guard()[0] is False
    assert rt.model_params(0).use_extra_bufts is True


def test_cpu_without_amx_costs_no_llama_call(monkeypatch):
    calls = fake(monkeypatch, frozenset({"avx2", "fma"}), None)
    assert rt.amx_guard() == (False, "CPU without AMX")
    assert rt.model_params(3).use_extra_bufts is True and rt.model_params(3).n_gpu_layers == 3
    assert calls == []


@pytest.mark.parametrize("value, off", [("off", True), ("on", False), (" OFF ", True)])
def test_environment_overrides_the_decision(monkeypatch, value, off):
    fake(monkeypatch, AMX_FLAGS, AMX_BUILD)
    monkeypatch.setenv(rt.EXTRA_BUFFERS_ENV, value)
    assert rt.amx_guard()[0] is off
    assert rt.model_params(0).use_extra_bufts is (not off)


def test_a_bad_override_is_one_line(monkeypatch):
    fake(monkeypatch, AMX_FLAGS, AMX_BUILD)
    monkeypatch.setenv(rt.EXTRA_BUFFERS_ENV, "maybe")
    with pytest.raises(InputError, match="MQT_EDGE_EXTRA_BUFFERS='maybe' is not auto, on or off"):
        rt.amx_guard()


def test_high_level_llama_gets_the_guarded_defaults(monkeypatch):
    """Benchmarks and tests load through `plain_llama`: its params carry the guard, and the patch
    is undone afterwards."""
    import llama_cpp.llama_cpp as raw

    fake(monkeypatch, AMX_FLAGS, AMX_BUILD)
    before = raw.llama_model_default_params
    with rt.guarded_llama_defaults():
        assert raw.llama_model_default_params().use_extra_bufts is False
    assert raw.llama_model_default_params is before
    assert raw.llama_model_default_params().use_extra_bufts is True


def _crash_possible() -> str | None:
    if not cpu_info().has_amx:
        return f"this CPU ({cpu_info().model}) has no AMX, so llama.cpp's AMX path cannot run here"
    if not rt.build_has_amx():
        return "this llama.cpp build has no AMX_INT8 kernels (llama_print_system_info)"
    return None


@pytest.mark.skipif(_crash_possible() is not None, reason=str(_crash_possible()))
def test_native_amx_build_decodes_through_the_guard(tmp_path):
    """The regression test: without the guard the first llama_decode of a q4_k_m model dies with
    SIGSEGV in ggml_backend_amx_mul_mat on this machine. Run in a subprocess so a crash is a failure,
    not the end of the suite."""
    from mqt_edge.exporters import ExportOptions, export

    bundle = export(ExportOptions(model="mqt_edge/assets/default-model", out=tmp_path / "b", quant="q4_k_m")).bundle
    code = ("from mqt_edge import Pipeline\n"
            f"with Pipeline.load({str(bundle.root)!r}) as p:\n"
            "    print(p.ask('examples/shapes.png', 'What color is the circle?', m=16, max_new_tokens=4).answer)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.strip() == "red"
