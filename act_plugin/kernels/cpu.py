"""The fused CPU kernel (``csrc/act_paged_cpu.cpp``): build, load, call.

A small C++ extension built with ``torch.utils.cpp_extension`` (g++ and ninja, both already
needed by vLLM's CPU build for torch.compile). It is compiled once per machine -- by ``make
install`` (``python -m act_plugin.kernels build``) or, failing that, on first use -- into
torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``)
under a name that carries a hash of the source and the instruction set, so different
versions and machines never share a binary. One call per layer, step and group, work split
over (sequence, head) with torch's own OpenMP pool. The module's ``calibrate_paged``
(pybind11) is what the engine calls: through the dispatcher (``torch.ops.act_kernels.
calibrate_paged``, also registered) the 18 arguments cost ~11 us per call against ~4 us,
paid in every calibrated layer of every step.

If it cannot be built or loaded, :func:`load` logs ONE warning and returns None; the caller
then uses the torch reference (same results, slower).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger("act_plugin.kernels")

SOURCE = Path(__file__).with_name("csrc") / "act_paged_cpu.cpp"

# Rows whose non-sink mass N is below this are recomputed from all V columns instead of the
# output-space form, whose error is ~ulp(o)/N: with float32 outputs the amplification stays
# below 16 ulp; 16-bit outputs keep it below ~2 ulp of their (much coarser) rounding.
RECOMPUTE_BELOW = {torch.float32: 1.0 / 16, torch.bfloat16: 0.5, torch.float16: 0.5}

# Scores per block of prefill rows (float32 elements per task): 1M = 4 MiB.
BLOCK_ELEMS = 1 << 20

_lock = threading.Lock()
_state: dict = {}


def _isa_flags() -> tuple[str, list[str]]:
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return "avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
    if cap == "AVX2":
        return "avx2", ["-mavx2", "-mfma", "-mf16c"]
    return "generic", []


def extension_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:10]
    isa, _ = _isa_flags()
    return f"act_paged_cpu_{isa}_{digest}"


def build(verbose: bool = False):
    """Compile (or find in the cache) and load the extension; returns its Python module,
    raises on failure."""
    from torch.utils.cpp_extension import load as load_extension

    _, flags = _isa_flags()
    return load_extension(
        name=extension_name(),
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", *flags],
        extra_ldflags=["-fopenmp"],
        is_python_module=True,
        verbose=verbose,
    )


def load():
    """The kernel (the extension module's ``calibrate_paged``; same signature as
    ``torch.ops.act_kernels.calibrate_paged``) or None (logged once) when unavailable."""
    if "op" in _state:
        return _state["op"]
    with _lock:
        if "op" not in _state:
            try:
                if os.environ.get("ACT_KERNEL_NO_BUILD"):
                    raise RuntimeError("ACT_KERNEL_NO_BUILD is set")
                module = build()
                _state["op"] = module.calibrate_paged
                _state["decode_attention"] = module.decode_attention
                _state["layer_attention"] = module.layer_attention
            except Exception as exc:  # noqa: BLE001 -- any build/load failure means: use the reference
                _state["op"] = None
                _state["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                logger.warning(
                    "ACT: the fused CPU kernel is unavailable (%s); calibrating with the torch reference "
                    "instead (same results, slower). Run `python -m act_plugin.kernels build` to see why.",
                    _state["error"],
                )
    return _state["op"]


def decode_attention_op():
    """The module's ``decode_attention`` (every head of a decode step's rows in one pass, ACT
    on the given heads) or None when the kernel is unavailable."""
    return _state.get("decode_attention") if load() is not None else None


def layer_attention_op():
    """The module's ``layer_attention`` (every head of a step's prefill and decode rows, ACT on
    the given heads, each calibrated head's scores computed once) or None when unavailable."""
    return _state.get("layer_attention") if load() is not None else None


def scratch_peak_bytes(reset: bool = False) -> dict[str, int]:
    """Peak scratch memory (bytes) the CPU kernel held at once within one call since the last
    reset, for decode-only calls and for calls with prefill rows: the kernel's whole
    transient footprint (it allocates nothing through torch). Empty when it is unavailable."""
    if load() is None:
        return {}
    decode, prefill = torch.ops.act_kernels.scratch_peak_bytes(reset)
    return {"decode": int(decode), "prefill": int(prefill)}
