"""Calibration over vLLM's paged KV cache: one call per layer, step and profile group.

This is the boundary between the engine plugin (which knows the step's batch) and the
maths (which knows nothing of vLLM). :func:`calibrate_paged` takes the flat query rows of a
step, the native attention output, the paged cache viewed as ``[blocks, kv_heads, block,
D]`` and, per sequence of the group, its block table row, length and query rows; it
overwrites the selected heads of ``output`` with the ACT result (spec sections 1-2).

Implementations:

* ``reference`` (:mod:`act_plugin.kernels.reference`): gathers the sequences' keys and values
  into padded tensors and calls :func:`act_plugin.core.act_attention_blocked`. Readable,
  any device; every fused kernel is tested against it and against ``core``.

Fused kernels plug in here, chosen per device; ``ACT_KERNEL=reference`` forces the reference.
"""

from __future__ import annotations

import os

import torch

from act_plugin.kernels.reference import calibrate_paged_reference

__all__ = ["calibrate_paged", "calibrate_paged_reference", "kernel_name"]

KERNEL_ENV = "ACT_KERNEL"


def kernel_name(device: torch.device) -> str:
    """Which implementation :func:`calibrate_paged` uses on ``device``."""
    forced = os.environ.get(KERNEL_ENV, "").strip().lower()
    if forced in ("", "auto"):
        return "reference"
    if forced == "reference":
        return "reference"
    raise ValueError(f"{KERNEL_ENV}={forced!r}: expected 'auto' or 'reference'")


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
) -> None:
    """Overwrite ``output[rows, heads]`` with calibrated attention for one group of sequences.

    Shapes: ``query``/``output`` ``[T, H, D]`` (the step's flat rows; only the group's rows
    are read or written); ``key_cache``/``value_cache`` ``[num_blocks, Hkv, block, D]`` views
    (any strides); ``block_table`` ``[G, >= ceil(max_seq_len / block)]``; ``seq_lens`` ``[G]``
    keys of each sequence including this step's; ``query_start``/``query_lens`` ``[G]`` the
    sequence's rows ``query_start .. query_start + query_lens - 1`` of ``query``, which are
    its last ``query_lens`` positions; ``heads`` ``[Hs]`` local query heads to calibrate and
    ``kv_heads`` ``[Hs]`` the KV head each reads. ``max_query_len``/``max_seq_len`` are host
    integers (bounds, no device sync). Decode steps are ``query_lens == 1``.
    """
    name = kernel_name(query.device)
    if name == "reference":
        calibrate_paged_reference(
            query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens,
            heads, kv_heads, scale=scale, beta=beta, threshold=threshold, window=window,
            max_query_len=max_query_len, max_seq_len=max_seq_len,
        )
        return
    raise AssertionError(name)  # pragma: no cover
