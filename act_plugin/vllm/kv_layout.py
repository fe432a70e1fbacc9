"""Paged KV-cache layouts of the backends ACT wraps, and the gather that reads them.

Each adapter turns a layer's raw ``kv_cache`` tensor into ``(key_cache, value_cache)``
views of shape ``[num_blocks, num_kv_heads, block_size, head_size]`` (any strides); the
gather then reads whole sequences through the block table. Adapters are plain functions
on tensors so that the CUDA layouts are unit-tested on CPU.
"""

from __future__ import annotations

from typing import Callable

import torch

KVSplit = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cpu_attn_split(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU_ATTN: ``[blocks, kv_heads, block, 2*D]`` whose per-(block, head) memory holds
    the block's keys first, then its values (vLLM views it as ``[.., 2*block, D]``)."""
    nb, hkv, bs, d2 = kv_cache.shape
    view = kv_cache.view(nb, hkv, 2 * bs, d2 // 2)
    return view[:, :, :bs], view[:, :, bs:]


def flash_attn_split(kv_cache: torch.Tensor, head_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLASH_ATTN / TRITON_ATTN: ``[blocks, kv_heads, block, 2*P]`` with each token's key
    and value side by side in the last dimension; ``P >= head_size`` when the backend pads
    the head size, so keys are ``[..., :D]`` and values ``[..., P:P + D]``."""
    padded = kv_cache.shape[-1] // 2
    d = padded if head_size is None else head_size
    return kv_cache[..., :d], kv_cache[..., padded : padded + d]


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, max_len: int, kv_heads: torch.Tensor | None = None
) -> torch.Tensor:
    """Read ``[G, kv_heads, max_len, D]`` keys (or values) of G sequences.

    ``cache``: ``[num_blocks, kv_heads, block, D]`` view; ``block_table``: ``[G, >= ceil(
    max_len / block)]`` block ids. Positions past a sequence's length are read from whatever
    block the table holds there and must be masked by the caller (``k_pos = -1``).
    """
    bs = cache.shape[2]
    nblk = (max_len + bs - 1) // bs
    blocks = block_table[:, :nblk].long().clamp_min(0)
    if kv_heads is not None:
        cache = cache.index_select(1, kv_heads)
    g = cache[blocks]  # [G, nblk, H, bs, D]
    G, _, H, _, D = g.shape
    return g.permute(0, 2, 1, 3, 4).reshape(G, H, nblk * bs, D)[:, :, :max_len]
