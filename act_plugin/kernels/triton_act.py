"""The Triton implementations behind :func:`act_plugin.kernels.calibrate_paged` and
:func:`act_plugin.kernels.bind_decode_attention` (CUDA tensors; CPU tensors under Triton's
interpreter in the tests).

* Decode rows: :func:`act_plugin.kernels.triton_decode.decode_split_k`, one split-K pass over
  K and V with per-split sink candidates and a reduce (docs/gpu_kernels.md).
* Prefill rows: :func:`act_plugin.kernels.triton_prefill.prefill_calibrate`, a K-only
  column pass with the native row log-sum-exp where the backend gives it, and a correction
  that reads only the sink columns' K and V rows.

No host synchronisation: every launch is sized from tensor shapes and the host-int bounds.
"""

from __future__ import annotations

import os

import torch

from act_plugin.kernels.cpu import RECOMPUTE_BELOW  # the same cut as the CPU kernel
from act_plugin.kernels.triton_decode import decode_split_k
from act_plugin.kernels.triton_prefill import prefill_calibrate


def _qk_fp32(dtype: torch.dtype) -> bool:
    # float32 caches: exact float32 dots; 16-bit ones natively. Triton 3.9's interpreter
    # computes bf16 tl.dot wrongly, so under it bf16 goes through float32 (the native
    # 16-bit path is tested with float16).
    return dtype == torch.float32 or (os.environ.get("TRITON_INTERPRET") == "1" and dtype == torch.bfloat16)


def calibrate_paged_triton(
    query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads, *,
    scale, beta, threshold, window, max_query_len, max_seq_len, recompute_below=None,
    lse: torch.Tensor | None = None, lse_base2: bool = False, split_len: int | None = None,
) -> None:
    """Same contract as :func:`act_plugin.kernels.calibrate_paged`. ``kv_heads`` must be each
    head's GQA KV head (``h // (H // Hkv)``, what vLLM uses); the decode kernel derives it.
    ``lse``/``lse_base2``: the native row log-sum-exp (see :func:`prefill_calibrate`)."""
    decode_split_k(
        query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads,
        scale=scale, beta=beta, threshold=threshold, window=window, max_seq_len=max_seq_len, whole=False,
        split_len=split_len,
    )
    if max_query_len <= 1:
        return
    cut = RECOMPUTE_BELOW.get(output.dtype, 1.0 / 16) if recompute_below is None else recompute_below
    prefill_calibrate(
        query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads,
        scale=scale, beta=beta, threshold=threshold, window=window, max_query_len=max_query_len,
        max_seq_len=max_seq_len, recompute_below=cut, lse=lse, lse_base2=lse_base2, qk_fp32=_qk_fp32(query.dtype),
    )


def decode_attention_triton(
    query, output, key_cache, value_cache, block_table, seq_lens, query_start, heads, scale, beta, threshold,
    window, max_seq_len, split_len: int | None = None,
) -> None:
    """Whole-layer decode: every query head of the group's rows (one per sequence) in one
    pass over the cache, ACT on ``heads``; the signature of the CPU kernel's
    ``decode_attention`` (:data:`act_plugin.kernels.DecodeAttention`)."""
    decode_split_k(
        query, output, key_cache, value_cache, block_table, seq_lens, query_start, None, heads,
        scale=scale, beta=beta, threshold=threshold, window=window, max_seq_len=max_seq_len, whole=True,
        split_len=split_len,
    )
