"""Idle worker threads spin only briefly, then sleep, by default (defaults.py; docs/benchmarks.md,
"Threads on a busy CPU"): OMP_WAIT_POLICY=PASSIVE with GOMP_SPINCOUNT=1000 for llama.cpp's OpenMP
threads, no intra-op spinning for onnxruntime. MQT_EDGE_SPIN=on gives the libraries' own behaviour
back, and a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT stands."""

import os
import subprocess
import sys

import pytest

from mqt_edge.bundle import Bundle
from mqt_edge.runtimes.onnxruntime import OnnxRuntimeVision

CODE = ("import os; from mqt_edge.runtimes import llama; llama._lib(); "
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")


def _policy_after_loading_llama(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MQT_EDGE_SPIN")}
    r = subprocess.run([sys.executable, "-c", CODE], env=clean | env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_llama_cpp_threads_spin_briefly_then_sleep_unless_told():
    assert _policy_after_loading_llama() == "PASSIVE 1000"
    assert _policy_after_loading_llama(MQT_EDGE_SPIN="on") == "None None"  # libgomp's own default
    assert _policy_after_loading_llama(OMP_WAIT_POLICY="active") == "active None"  # the user's choice stands
    assert _policy_after_loading_llama(OMP_WAIT_POLICY="PASSIVE") == "PASSIVE None"  # sleeping at once
    assert _policy_after_loading_llama(GOMP_SPINCOUNT="50000") == "None 50000"


def _spinning_entry(sess) -> str | None:
    try:
        return sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # onnxruntime raises for a key never set
        return None


@pytest.mark.parametrize("spin, expected", [(None, "0"), ("on", None)])  # None: onnxruntime's default (spin)
def test_onnxruntime_threads_do_not_spin_unless_told(shipped_bundle, monkeypatch, spin, expected):
    if spin is None:
        monkeypatch.delenv("MQT_EDGE_SPIN", raising=False)
    else:
        monkeypatch.setenv("MQT_EDGE_SPIN", spin)
    runner = OnnxRuntimeVision(Bundle.open(shipped_bundle, verify=False), threads=2).activate()
    try:
        for sess in (runner.vision, runner.mqt):
            assert _spinning_entry(sess) == expected
    finally:
        runner.deactivate()
