"""Where data-parallel engine replicas run on this machine (the eval's and the search's
``data_parallel: N``): on vLLM's CPU platform each replica gets its own contiguous block of the
cores this process may use (``VLLM_CPU_OMP_THREADS_BIND``) and 1/N of
``VLLM_CPU_KVCACHE_SPACE``; on CUDA each gets its own GPUs (``CUDA_VISIBLE_DEVICES``, tensor x
pipeline parallel size each). More replicas than cores or GPUs are refused, naming
``data_parallel``."""

from __future__ import annotations

import os
from typing import Any

from act_plugin.config import ACTConfigError
from act_plugin.vllm.env import omp_threads_bind, on_cpu_platform

__all__ = ["replica_count", "cpu_replicas", "cuda_replicas", "replica_environments"]


def replica_count(v: Any) -> int:
    """``data_parallel`` as a config or the command line gives it (``2`` or ``"2"``)."""
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ACTConfigError(f"data_parallel must be a positive whole number of engine replicas, got {v!r}")
    return v


def cpu_replicas(n: int, cores: list[int], kv_cache_gib: int) -> list[dict[str, str]]:
    """Each replica's environment on the CPU platform: a contiguous block of ``cores`` and an
    equal part of the KV-cache budget."""
    if n > len(cores):
        raise ACTConfigError(
            f"data_parallel: {n} replicas need a CPU core each, but this process may use {len(cores)} "
            f"({omp_threads_bind(cores)}); use data_parallel: {len(cores)} or fewer")
    if kv_cache_gib < n:
        raise ACTConfigError(f"data_parallel: {n} replicas need at least 1 GiB of KV cache each, but "
                             f"VLLM_CPU_KVCACHE_SPACE is {kv_cache_gib} GiB in all; raise it or lower data_parallel")
    blocks = [cores[i * len(cores) // n:(i + 1) * len(cores) // n] for i in range(n)]
    return [{"VLLM_CPU_OMP_THREADS_BIND": omp_threads_bind(b), "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib // n)}
            for b in blocks]


def cuda_replicas(n: int, devices: list[str], per_replica: int) -> list[dict[str, str]]:
    """Each replica's ``CUDA_VISIBLE_DEVICES``: ``per_replica`` of ``devices`` each."""
    if n * per_replica > len(devices):
        raise ACTConfigError(
            f"data_parallel: {n} replicas of {per_replica} GPU(s) each need {n * per_replica} GPUs, but "
            f"{len(devices)} are visible ({','.join(devices) or 'none'}); lower data_parallel")
    return [{"CUDA_VISIBLE_DEVICES": ",".join(devices[i * per_replica:(i + 1) * per_replica])} for i in range(n)]


def replica_environments(n: int, engine: dict[str, Any]) -> list[dict[str, str]]:
    """Each replica's environment overrides on this machine (refused: more replicas than
    cores, or than GPUs)."""
    if on_cpu_platform():
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
            range(os.cpu_count() or 1))
        raw = os.environ.get("VLLM_CPU_KVCACHE_SPACE") or "2"
        try:
            kv = int(raw)
        except ValueError:
            raise ACTConfigError(f"VLLM_CPU_KVCACHE_SPACE must be a whole number of GiB, got {raw!r}") from None
        return cpu_replicas(n, cores, kv)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())]
    per = int(engine.get("tensor_parallel_size", 1)) * int(engine.get("pipeline_parallel_size", 1))
    return cuda_replicas(n, devices, per)
