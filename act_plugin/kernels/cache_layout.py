"""Paged KV-cache layouts the kernels read, and the gather that reads them.

Each adapter turns a layer's raw ``kv_cache`` tensor, as vLLM's attention backends hold it,
into ``(key_cache, value_cache)`` views of shape ``[num_blocks, num_kv_heads, block_size,
head_size]`` (any strides), which is what every kernel takes; the gather then reads whole
sequences through the block table. Adapters are plain functions on tensors (no vLLM import),
so that the CUDA layouts are unit-tested on CPU. The check that vLLM's CPU cache kernel
really writes the layout :func:`cpu_attn_split` reads is the CPU backend's
(:mod:`act_plugin.vllm.backends.cpu_attn`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KVSplit = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cpu_attn_split(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU_ATTN (``vec``/``vec16`` ISAs): ``[blocks, kv_heads, block, 2*D]`` whose memory per
    (block, head) holds the block's keys first, *transposed* (``[D, block]``, so the kernel
    streams one dimension across tokens), then its values (``[block, D]``).

    Other CPU ISAs (AMX, NEON, ...) pack keys differently; the CPU backend checks the layout
    against vLLM's own cache kernel before the first use.
    """
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    halves = kv_cache.view(nb, hkv, 2, bs * d)
    keys = halves[:, :, 0].view(nb, hkv, d, bs).transpose(-1, -2)
    values = halves[:, :, 1].view(nb, hkv, bs, d)
    return keys, values


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
    """Read ``[G, heads, max_len, D]`` keys (or values) of G sequences.

    ``cache``: ``[num_blocks, kv_heads, block, D]`` view; ``block_table``: ``[G, >= ceil(
    max_len / block)]`` block ids; ``kv_heads``: which KV head to read for each output head
    (repeats allowed: one entry per calibrated query head under GQA). One gather touches
    only the sequences' own blocks and heads, never the whole cache, and copies whole
    (block, head) tiles in the cache's own memory order: when a backend stores a block's
    keys transposed (``[D, block]``), the result is returned as a transposed view of a
    ``[G, heads, D, max_len]`` tensor, which is also what ``q @ k^T`` wants. Positions past
    a sequence's length hold whatever the block has there and must be masked by the caller.
    """
    nb, hkv, bs, d = cache.shape
    nblk = (max_len + bs - 1) // bs
    blocks = block_table[:, :nblk].long().clamp_min(0)  # [G, nblk]
    G = blocks.shape[0]
    heads = torch.arange(hkv, device=cache.device) if kv_heads is None else kv_heads
    H = len(heads)
    transposed = cache.stride(-2) == 1 and cache.stride(-1) != 1  # tiles stored [D, block]
    source = cache.transpose(-1, -2) if transposed else cache
    tiles = _gather_tiles(source, blocks, heads)  # [G, H, nblk, a, b] in memory order
    if transposed:
        kt = tiles.permute(0, 1, 3, 2, 4).reshape(G, H, d, nblk * bs)[..., :max_len]
        return kt.transpose(-1, -2)
    return tiles.reshape(G, H, nblk * bs, d)[:, :, :max_len]


def _gather_tiles(source: torch.Tensor, blocks: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    nb, hkv, a, b = source.shape
    G, nblk = blocks.shape
    try:
        # Whole (block, head) tiles are contiguous: copy them as rows (memcpy per tile).
        flat = source.view(nb * hkv, a * b)
    except RuntimeError:
        flat = None
    if flat is not None and flat.stride(-1) == 1:
        rows = (blocks.unsqueeze(1) * hkv + heads.view(1, -1, 1)).reshape(-1)
        return flat.index_select(0, rows).view(G, len(heads), nblk, a, b)
    return source[blocks.unsqueeze(1), heads.view(1, -1, 1)]
