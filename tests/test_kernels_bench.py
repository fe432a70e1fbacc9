"""The kernel benchmarks run on tiny settings so they cannot rot. Figures are printed
(``pytest -s`` shows them), never asserted: speed is judged by running the benchmarks on a
quiet machine, not by tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


@pytest.mark.slow
def test_kernel_micro_benchmark_runs():
    pytest.importorskip("vllm")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels_micro.py"), "--quick", "--repeats", "1"],
                         env=_env(), capture_output=True, text=True, timeout=600)
    print(res.stdout)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "decode 4 x 64" in res.stdout and "prefill 2 x 64" in res.stdout


@pytest.mark.slow
def test_first_token_cpu_benchmark_runs():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "first_token_cpu.py"), "--quick", "--repeats", "1"],
                         env=_env(), capture_output=True, text=True, timeout=600)
    print(res.stdout)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "decode 4 x 64" in res.stdout and "prefill 2 x 64" in res.stdout


@pytest.mark.engine
@pytest.mark.slow
def test_engine_overhead_benchmark_runs(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine_overhead.py"), "--tiny", "--json", str(out)],
                         env=_env(), capture_output=True, text=True, timeout=1100)
    print(res.stdout)
    assert res.returncode == 0, res.stderr[-5000:]
    figures = json.loads(out.read_text())
    assert set(figures["ratios"]) >= {"prefill", "decode", "calib_share_prefill", "calib_share_decode"}
    # the worker accounted the calibration of both kinds of step in the timed runs
    assert figures["results"]["act"]["calib_prefill_s"] > 0 and figures["results"]["act"]["calib_decode_s"] > 0
    # decode steps of calibrated requests only: the calibrated layers were computed whole by
    # the fused kernel in the real engine (26 layers x 3 decode steps at least)
    assert figures["results"]["act"]["whole_layer_decode_calls"] >= 26 * 3
    curve = figures["results"]["curve"]
    assert [(r["kind"], r["seqs"], r["prompt_len"]) for r in curve] == [
        ("decode", 1, 32), ("decode", 4, 32), ("prefill", 1, 32), ("prefill", 1, 96)]
    assert all(r["kernel"] == "cpu" for r in curve)  # the fused kernel ran in the engine's worker
    assert any(r["scratch_peak_bytes"] > 0 for r in curve)
    assert all(0 < r["calib_ms"] < r["act_ms"] for r in curve)  # accounted, and part of the step
