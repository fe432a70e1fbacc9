"""The lean install: serving with the engine plugin needs none of the `[eval]` extra.

Checked in a fresh interpreter: importing the serving path (the maths, the config, the HF
reference path, the kernels, the vLLM plugin) must not import lm-eval or matplotlib, and the
parts that import neither transformers nor vLLM must not import scipy either (both import
scipy themselves when it is installed).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PURE = ["act_plugin", "act_plugin.config", "act_plugin.core", "act_plugin.calibration", "act_plugin.capabilities",
        "act_plugin.atomic_files", "act_plugin.kernels", "act_plugin.vllm.config_source"]
WITH_VLLM = ["act_plugin.vllm", "act_plugin.vllm.config_hook", "act_plugin.vllm.control", "act_plugin.vllm.router",
             "act_plugin.vllm.plan", "act_plugin.vllm.startup_check", "act_plugin.vllm.worker",
             "act_plugin.vllm.backends.cpu_attn", "act_plugin.vllm.cli"]
EVAL_ONLY = ("lm_eval", "matplotlib", "scipy")


def _imported_after(modules: list[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(json.dumps([m for m in {EVAL_ONLY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_maths_and_config_need_no_eval_extra():
    assert _imported_after(PURE) == []


def test_hf_path_and_engine_plugin_need_no_eval_extra():
    pytest.importorskip("vllm")
    assert set(_imported_after(["act_plugin.hf", *WITH_VLLM])) <= {"scipy"}  # scipy: transformers' and vLLM's
