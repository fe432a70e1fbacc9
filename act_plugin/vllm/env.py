"""Sensible defaults for running vLLM on a CPU-only machine (used by our CLIs and tests).

Only fills in variables the user has not set.
"""

from __future__ import annotations

import os


def apply_cpu_defaults(kv_cache_gib: int = 2) -> bool:
    """On a CPU-only vLLM: a small KV cache and OpenMP threads bound to this process's cores
    (vLLM's CPU worker otherwise runs torch on one thread; binding every core roughly doubles
    throughput on small machines). Only variables not already set. Returns whether vLLM runs
    on the CPU here."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False
    except Exception:  # pragma: no cover - exotic platforms
        return False
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if cores == list(range(cores[0], cores[-1] + 1)):
        bind = f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    else:
        bind = ",".join(map(str, cores))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    return True


def cpu_engine_kwargs(**overrides) -> dict:
    """Engine arguments that work for small models on this kind of machine."""
    kwargs = dict(dtype="float32", max_model_len=2048, gpu_memory_utilization=0.1, enforce_eager=True)
    kwargs.update(overrides)
    return kwargs
