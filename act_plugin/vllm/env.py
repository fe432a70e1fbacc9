"""Sensible defaults for running vLLM on a CPU-only machine (used by our CLIs and tests).

Only fills in variables the user has not set.
"""

from __future__ import annotations

import os
from typing import Any


def on_cpu_platform() -> bool:
    """Whether vLLM runs on its CPU platform here (vLLM's own platform detection; without
    vLLM installed: whether torch sees no CUDA device)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        import torch

        return not torch.cuda.is_available()
    return bool(current_platform.is_cpu())


def omp_threads_bind(cores: list[int]) -> str:
    """vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` value for these cores: a range where they are
    contiguous (``"2-5"``), else a list (``"0,2,4"``)."""
    cores = sorted(cores)
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    return ",".join(map(str, cores))


def apply_cpu_defaults(kv_cache_gib: int = 2) -> bool:
    """On a CPU-only vLLM: a small KV cache and OpenMP threads bound to the cores this process
    may run on. Returns whether the CPU platform was found (nothing is set otherwise)."""
    if not on_cpu_platform():
        return False
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    # vLLM's CPU worker runs torch on one thread unless told which cores to bind; binding
    # every core this process may use roughly doubles throughput on small machines (the
    # affinity mask, not 0..n-1: under taskset or a container's cpuset they differ).
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", omp_threads_bind(cores))
    return True


def cpu_engine_kwargs(**overrides: Any) -> dict[str, Any]:
    """Engine arguments that work for small models on this kind of machine."""
    kwargs = dict(dtype="float32", max_model_len=2048, gpu_memory_utilization=0.1, enforce_eager=True)
    kwargs.update(overrides)
    return kwargs
