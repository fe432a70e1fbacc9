"""Calibration over vLLM's paged KV cache: one call per layer, step and profile group.

This is the boundary between the engine plugin (which knows the step's batch) and the
maths (which knows nothing of vLLM). :func:`calibrate_paged` takes the flat query rows of a
step, the native attention output, the paged cache viewed as ``[blocks, kv_heads, block,
D]`` and, per sequence of the group, its block table row, length and query rows; it
overwrites the selected heads of ``output`` with the ACT result (spec sections 1-2).

Implementations (``ACT_KERNEL`` = ``auto`` (default), ``reference``, ``cpu`` or ``triton``):

* ``cpu`` (:mod:`act_plugin.kernels.cpu`, C++ with OpenMP): the default on CPU tensors.
* ``triton`` (:mod:`act_plugin.kernels.triton_act`: split-K decode, K-only prefill column
  pass with the native log-sum-exp where given): the default on CUDA tensors.
* ``reference`` (:mod:`act_plugin.kernels.reference`): gathers the sequences' keys and values
  into padded tensors and calls :func:`act_plugin.core.act_attention_blocked`. Readable,
  any device; every fused kernel is tested against it and against ``core``. Used when the
  fused kernel of the device is unavailable (one warning says so).

The fused kernels read the paged cache in place (any strides), compute each sequence's
sinks from its own rows only, and change nothing but the calibrated rows and heads. They
make no device-to-host synchronisation: every bound comes from host integers
(``max_query_len``, ``max_seq_len``, tensor shapes) and per-sequence lengths are read on
the device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from act_plugin.kernels import cpu
from act_plugin.kernels.cpu import BLOCK_ELEMS as _CPU_BLOCK_ELEMS
from act_plugin.kernels.cpu import RECOMPUTE_BELOW as _CPU_CUT
from act_plugin.kernels.reference import calibrate_paged_reference
from act_plugin.kernels.row_arms import RowArms

__all__ = [
    "DecodeAttention", "DecodeRows", "LayerAttention", "PagedKernel", "RowArms", "bind_decode_attention",
    "bind_decode_rows", "bind_layer_attention", "bind_paged", "calibrate_paged", "calibrate_paged_reference",
    "kernel_name", "whole_prefill_enabled",
]

KERNEL_ENV = "ACT_KERNEL"
WHOLE_PREFILL_ENV = "ACT_WHOLE_PREFILL"  # "0": no whole-layer prefill on CPU (bind_layer_attention)
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

logger = logging.getLogger("act_plugin.kernels")
_warned: set = set()


def _warn_once(key, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_name(device: torch.device) -> str:
    """Which implementation :func:`calibrate_paged` uses on ``device``."""
    forced = os.environ.get(KERNEL_ENV, "")
    key = (device.type, forced)
    name = _chosen.get(key)
    if name is None:
        name = _choose(device, forced.strip().lower())
        _chosen[key] = name
    return name


_chosen: dict = {}  # (device type, ACT_KERNEL) -> implementation: one lookup per call


_cpu_op: Callable[..., Any] | None = None  # torch.ops.act_kernels.calibrate_paged once loaded


def _load_cpu_op():
    global _cpu_op
    op = cpu.load()
    if op is not None:
        _cpu_op = op
    return op


def _choose(device: torch.device, forced: str) -> str:
    if forced == "reference":
        return "reference"
    if forced in ("", "auto"):
        if device.type == "cpu":
            return "cpu" if _load_cpu_op() is not None else "reference"
        if device.type == "cuda" and _triton_available():
            return "triton"
        _warn_once(
            ("device", device.type), "ACT: no fused kernel for %s tensors; using the torch reference", device.type
        )
        return "reference"
    if forced == "cpu":
        if _load_cpu_op() is None:
            raise RuntimeError(f"{KERNEL_ENV}=cpu but the CPU kernel is unavailable: {cpu._state.get('error')}")
        return "cpu"
    if forced == "triton":
        if not _triton_available():
            raise RuntimeError(f"{KERNEL_ENV}=triton but triton is not installed")
        return "triton"
    raise ValueError(f"{KERNEL_ENV}={forced!r}: expected 'auto', 'reference', 'cpu' or 'triton'")


def _fused_dtypes(query, output, key_cache, value_cache) -> bool:
    """The fused kernels take one dtype among float32/bfloat16/float16 for all four."""
    return query.dtype == output.dtype == key_cache.dtype == value_cache.dtype and query.dtype in _FUSED_DTYPES


# A bound kernel: calibrate_paged's positional arguments (query, output, key_cache,
# value_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads, scale, beta,
# threshold, window, max_query_len, max_seq_len; optional keywords lse, lse_base2) with the
# implementation already chosen.
PagedKernel = Callable[..., None]


def bind_paged(
    query: torch.Tensor,
    output: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    *,
    recompute_below: float | None = None,
) -> PagedKernel:
    """The :func:`calibrate_paged` implementation for tensors like these (device, dtypes),
    chosen once: a calibrated layer binds it when it first sees its KV cache and then pays
    only the kernel call in every step (choosing costs microseconds, times every layer and
    step). Arguments as :func:`calibrate_paged`'s, positional; ``window`` may be None."""
    name = kernel_name(query.device)
    if name != "reference" and not _fused_dtypes(query, output, key_cache, value_cache):
        dtypes = sorted({str(t.dtype) for t in (query, output, key_cache, value_cache)})
        _warn_once(
            ("dtype", *dtypes),
            "ACT: the fused kernels take one dtype among float32/bfloat16/float16 for query, output and "
            "KV cache (got %s); using the torch reference", dtypes,
        )
        name = "reference"
    if name == "reference":
        return _reference_kernel()
    if name == "cpu":
        return _cpu_kernel(_CPU_CUT.get(output.dtype, 1.0 / 16) if recompute_below is None else float(recompute_below))
    if name == "triton":
        return _triton_kernel(recompute_below)
    raise AssertionError(name)  # pragma: no cover


def _reference_kernel() -> PagedKernel:
    def run_reference(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens,
                      heads, kv_heads, scale, beta, threshold, window, max_query_len, max_seq_len, lse=None,
                      lse_base2=False) -> None:  # a native lse is not needed here
        calibrate_paged_reference(
            query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens,
            heads, kv_heads, scale=scale, beta=beta, threshold=threshold, window=window,
            max_query_len=max_query_len, max_seq_len=max_seq_len,
        )

    return run_reference


def _cpu_kernel(cut: float) -> PagedKernel:
    # "cpu" is only chosen (and cached in _chosen) after _load_cpu_op() returned the op and set _cpu_op
    op = _cpu_op
    assert op is not None

    def run_cpu(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens,
                heads, kv_heads, scale, beta, threshold, window, max_query_len, max_seq_len, lse=None,
                lse_base2=False) -> None:  # the CPU backend gives no lse; the kernel computes its own
        if beta == 1.0 or heads.shape[0] == 0 or block_table.shape[0] == 0:
            return  # nothing changes (spec: beta = 1 leaves every row as it is)
        op(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads,
           kv_heads, scale, beta, threshold, window or 0, cut, max_query_len, max_seq_len, _CPU_BLOCK_ELEMS)

    return run_cpu


def _triton_kernel(recompute_below: float | None) -> PagedKernel:
    from act_plugin.kernels.triton_act import calibrate_paged_triton  # triton: optional, CUDA only

    def run_triton(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens,
                   heads, kv_heads, scale, beta, threshold, window, max_query_len, max_seq_len, lse=None,
                   lse_base2=False) -> None:
        if beta == 1.0 or heads.shape[0] == 0 or block_table.shape[0] == 0:
            return
        calibrate_paged_triton(
            query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads,
            kv_heads, scale=scale, beta=beta, threshold=threshold, window=window,
            max_query_len=max_query_len, max_seq_len=max_seq_len, recompute_below=recompute_below,
            lse=lse, lse_base2=lse_base2,
        )

    return run_triton


# A bound whole-layer decode kernel: (query, output, key_cache, value_cache, block_table,
# seq_lens, query_start, heads, scale, beta, threshold, window, max_seq_len).
DecodeAttention = Callable[..., None]


def bind_decode_attention(
    query: torch.Tensor, output: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor
) -> DecodeAttention | None:
    """The fused whole-layer decode attention for tensors like these (the CPU kernel's, or
    on CUDA the Triton split-K kernel, :func:`act_plugin.kernels.triton_act.
    decode_attention_triton`), or None where there is none (``ACT_KERNEL=reference``, mixed
    or other dtypes): the caller then keeps the native kernel and calibrates after it.

    It computes every query head of the given decode rows in one pass over the paged cache
    (keys and values read once per KV head for all its query heads) and applies ACT to
    ``heads`` in the same pass, so a step whose rows are all calibrated need not run the
    native kernel and then read the cache a second time. Heads not in ``heads`` get plain
    attention, equal to the native kernel's within float rounding (not bit for bit).
    """
    name = kernel_name(query.device)
    if name not in ("cpu", "triton") or not _fused_dtypes(query, output, key_cache, value_cache):
        return None
    if name == "triton":
        from act_plugin.kernels.triton_act import decode_attention_triton  # triton: optional, CUDA only

        return decode_attention_triton
    op = cpu.decode_attention_op()
    if op is None:
        return None

    def run_decode(query, output, key_cache, value_cache, block_table, seq_lens, query_start, heads, scale, beta,
                   threshold, window, max_seq_len) -> None:
        op(query, output, key_cache, value_cache, block_table, seq_lens, query_start, heads, scale, beta, threshold,
           window or 0, max_seq_len)

    return run_decode


# A bound whole-layer kernel for any rows: (query, output, key_cache, value_cache, block_table,
# seq_lens, query_start, query_lens, heads, scale, beta, threshold, window, max_seq_len).
LayerAttention = Callable[..., None]


def whole_prefill_enabled() -> bool:
    """Whether steps with prefill rows may use the CPU kernel's whole-layer attention: on
    unless ``ACT_WHOLE_PREFILL=0``; any value but ``0`` and ``1`` is an error (never a silent
    choice of path)."""
    value = os.environ.get(WHOLE_PREFILL_ENV, "").strip()
    if value in ("", "1"):
        return True
    if value == "0":
        return False
    raise ValueError(f"{WHOLE_PREFILL_ENV}={value!r}: expected '1' (default: whole-layer prefill on CPU) or '0' "
                     "(the native kernel and a separate calibration pass)")


def bind_layer_attention(
    query: torch.Tensor, output: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor
) -> LayerAttention | None:
    """The CPU kernel's whole-layer attention for tensors like these, or None where there is
    none (not the CPU kernel: CUDA tensors, ``ACT_KERNEL=reference``; mixed or other dtypes)
    or where it is switched off with ``ACT_WHOLE_PREFILL=0`` (then steps with prefill rows run
    the native kernel and the separate pass, as steps that mix ACT-off rows always do).

    Like :func:`bind_decode_attention` it computes every query head of the given rows over the
    paged cache with ACT on ``heads``, for prefill rows too: each calibrated head's scores are
    computed once, for its output and its column statistics together, where a separate pass
    after the native kernel computes them a second time. Heads not in ``heads`` get plain
    attention, equal to the native kernel's within float rounding (not bit for bit): a
    request's result can differ in the last bits between a step whose rows all run ACT (this
    kernel) and one shared with ACT-off rows (the native kernel and the separate pass).
    """
    if not whole_prefill_enabled():
        return None
    if kernel_name(query.device) != "cpu" or not _fused_dtypes(query, output, key_cache, value_cache):
        return None
    op = cpu.layer_attention_op()
    if op is None:
        return None

    def run_layer(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, scale,
                  beta, threshold, window, max_seq_len) -> None:
        op(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, scale, beta,
           threshold, window or 0, _CPU_CUT.get(output.dtype, 1.0 / 16), max_seq_len, _CPU_BLOCK_ELEMS)

    return run_layer


# A bound per-row decode kernel: (query, output, key_cache, value_cache, block_table,
# seq_lens, query_start, row_arms, scale, window, max_seq_len, whole).
DecodeRows = Callable[..., None]


def bind_decode_rows(
    query: torch.Tensor, output: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor
) -> DecodeRows | None:
    """The decode kernel in per-row mode (each row's arm read on the device from
    :class:`RowArms`: what a CUDA graph captures once and replays for any mix of arms), or
    None where there is none (not the Triton kernel: CPU tensors, ``ACT_KERNEL=reference``,
    mixed or other dtypes). Every row of the batch is a decode row; rows without keys (a
    graph's padding) are skipped. ``whole``: write every head of every row with keys (rows
    without an arm: plain attention), else only the calibrated heads' changed rows."""
    if kernel_name(query.device) != "triton" or not _fused_dtypes(query, output, key_cache, value_cache):
        return None
    from act_plugin.kernels.triton_decode import decode_split_k  # triton: optional, CUDA only

    no_heads = torch.zeros(0, dtype=torch.long, device=query.device)

    def run_rows(query, output, key_cache, value_cache, block_table, seq_lens, query_start, row_arms, scale, window,
                 max_seq_len, whole=False) -> None:
        decode_split_k(query, output, key_cache, value_cache, block_table, seq_lens, query_start, None, no_heads,
                       scale=scale, beta=1.0, threshold=1.0, window=window, max_seq_len=max_seq_len, whole=whole,
                       row_arms=row_arms)

    return run_rows


def calibrate_paged(
    query: torch.Tensor,
    output: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    query_lens: torch.Tensor,
    heads: torch.Tensor,
    kv_heads: torch.Tensor,
    *,
    scale: float,
    beta: float,
    threshold: float,
    window: int | None,
    max_query_len: int,
    max_seq_len: int,
    recompute_below: float | None = None,
    lse: torch.Tensor | None = None,
    lse_base2: bool = False,
) -> None:
    """Overwrite ``output[rows, heads]`` with calibrated attention for one group of sequences.

    Shapes: ``query``/``output`` ``[T, H, D]`` (the step's flat rows; only the group's rows
    are read or written); ``key_cache``/``value_cache`` ``[num_blocks, Hkv, block, D]`` views
    (any strides); ``block_table`` ``[G, >= ceil(max_seq_len / block)]``; ``seq_lens`` ``[G]``
    keys of each sequence including this step's; ``query_start``/``query_lens`` ``[G]`` the
    sequence's rows ``query_start .. query_start + query_lens - 1`` of ``query``, which are
    its last ``query_lens`` positions; ``heads`` ``[Hs]`` local query heads to calibrate and
    ``kv_heads`` ``[Hs]`` the KV head each reads. ``max_query_len``/``max_seq_len`` are host
    integers (bounds, no device sync). Decode steps are ``query_lens == 1``; a group may mix
    decode and prefill sequences.

    ``recompute_below`` (fused kernels): rows whose non-sink mass is below it are recomputed
    from all V columns instead of corrected on the native output (default per output dtype,
    :data:`act_plugin.kernels.cpu.RECOMPUTE_BELOW`).

    ``lse`` (Triton only; others compute their own): the native backend's row log-sum-exp,
    a float32 ``[T, H]`` view (FLASH_ATTN's ``softmax_lse`` ``[H, T]`` passed transposed),
    natural log unless ``lse_base2`` (FLASHINFER's default); it saves the prefill kernels a
    pass over the keys.

    Chooses the implementation on every call; per-step callers bind it once
    (:func:`bind_paged`).
    """
    kernel = bind_paged(query, output, key_cache, value_cache, recompute_below=recompute_below)
    kernel(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads,
           float(scale), float(beta), float(threshold), window, int(max_query_len), int(max_seq_len),
           lse=lse, lse_base2=lse_base2)
