"""CPU defaults for vLLM (act_plugin.vllm.env): one helper, only unset variables."""

from __future__ import annotations

import pytest

from act_plugin.vllm import env


def test_omp_threads_bind():
    assert env.omp_threads_bind([3]) == "3"
    assert env.omp_threads_bind([5, 2, 3, 4]) == "2-5"
    assert env.omp_threads_bind([0, 2, 4]) == "0,2,4"


def test_apply_cpu_defaults_binds_this_process_cores(monkeypatch):
    monkeypatch.setattr(env, "on_cpu_platform", lambda: True)
    monkeypatch.setattr(env.os, "sched_getaffinity", lambda pid: {4, 5, 7}, raising=False)
    # setenv first so that monkeypatch restores the variables after apply_cpu_defaults sets
    # them (delenv of an absent variable records nothing, and cores 4,5,7 would leak into
    # every later engine start of the session)
    for name in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert env.apply_cpu_defaults(kv_cache_gib=3) is True
    assert env.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "4,5,7"
    assert env.os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_apply_cpu_defaults_keeps_user_settings_and_skips_gpus(monkeypatch):
    monkeypatch.setattr(env, "on_cpu_platform", lambda: True)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")
    env.apply_cpu_defaults()
    assert env.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0" and env.os.environ["VLLM_CPU_KVCACHE_SPACE"] == "8"
    monkeypatch.setattr(env, "on_cpu_platform", lambda: False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    assert env.apply_cpu_defaults() is False
    assert "VLLM_CPU_KVCACHE_SPACE" not in env.os.environ


@pytest.mark.parametrize("kwargs", [{}, {"dtype": "bfloat16"}])
def test_cpu_engine_kwargs(kwargs):
    got = env.cpu_engine_kwargs(**kwargs)
    assert got["enforce_eager"] is True and got["dtype"] == kwargs.get("dtype", "float32")
