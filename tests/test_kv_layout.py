"""KV-cache layout adapters: the CPU one against vLLM's real CPU cache kernel, the CUDA ones
(FLASH_ATTN, TRITON_ATTN) on CPU tensors laid out as those backends lay them out."""

from __future__ import annotations

import pytest
import torch

from act_plugin.kernels.cache_layout import cpu_attn_split, flash_attn_split, gather_kv

pytest.importorskip("vllm")


def _tokens(T, H, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, D, generator=g).to(dtype), torch.randn(T, H, D, generator=g).to(dtype)


@pytest.mark.parametrize("isa", ["vec", "vec16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_layout_reads_what_the_cpu_kernel_wrote(isa, dtype):
    from vllm import _custom_ops as ops

    nb, H, bs, D, T = 5, 3, 32, 64, 70
    kv = torch.zeros(nb, H, bs, 2 * D, dtype=dtype)
    # vLLM's own view of the CPU cache (vllm/v1/attention/backends/cpu_attn.py, do_kv_cache_update)
    k_view, v_view = kv.view(nb, H, 2 * bs, D).chunk(2, dim=2)
    k, v = _tokens(T, H, D, dtype)
    blocks = [4, 1, 3]  # a non-monotonic block table
    slots = torch.tensor([blocks[t // bs] * bs + t % bs for t in range(T)])
    ops.cpu_attn_reshape_and_cache(k, v, k_view, v_view, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    keys, values = cpu_attn_split(kv)
    table = torch.tensor([blocks])
    assert torch.equal(gather_kv(keys, table, T)[0].transpose(0, 1), k)
    assert torch.equal(gather_kv(values, table, T)[0].transpose(0, 1), v)
    # selecting KV heads
    sel = torch.tensor([0, 2])
    assert torch.equal(gather_kv(keys, table, T, sel)[0].transpose(0, 1), k[:, sel])


def _flash_style_cache(nb, H, bs, D, padded, physical):
    """A [blocks, kv_heads, block, 2*P] logical cache with the given physical stride order,
    written through the view FLASH_ATTN/TRITON_ATTN use (``kv_cache.transpose(1, 2)`` and a
    split of the last dimension at P; vllm/v1/attention/backends/flash_attn.py forward)."""
    if physical == "LBNHC":  # memory [B, N, H, C]
        kv = torch.zeros(nb, bs, H, 2 * padded).permute(0, 2, 1, 3)
    else:  # "LBHNC": memory [B, H, N, C]
        kv = torch.zeros(nb, H, bs, 2 * padded)
    key_cache, value_cache = kv.transpose(1, 2).split(padded, dim=-1)  # [B, N, H, P] each
    return kv, key_cache, value_cache


@pytest.mark.parametrize("physical", ["LBNHC", "LBHNC"])
@pytest.mark.parametrize("padded_extra", [0, 16])  # TRITON_ATTN may pad the head size
def test_flash_and_triton_layouts(physical, padded_extra):
    nb, H, bs, D, T = 6, 2, 16, 64, 40
    P = D + padded_extra
    kv, key_cache, value_cache = _flash_style_cache(nb, H, bs, D, P, physical)
    k, v = _tokens(T, H, D)
    blocks = [5, 0, 2]
    for t in range(T):
        b, off = blocks[t // bs], t % bs
        key_cache[b, off, :, :D] = k[t]
        value_cache[b, off, :, :D] = v[t]
    keys, values = flash_attn_split(kv, D)
    table = torch.tensor([blocks, [1, 3, 4]])
    K = gather_kv(keys, table, T)
    V = gather_kv(values, table, T)
    assert K.shape == (2, H, T, D)
    assert torch.equal(K[0].transpose(0, 1), k)
    assert torch.equal(V[0].transpose(0, 1), v)
    assert not torch.equal(K[1].transpose(0, 1), k)  # the other sequence reads other blocks


def test_gather_pads_past_the_table_with_valid_block_ids():
    keys = torch.arange(4 * 1 * 4 * 2, dtype=torch.float32).view(4, 1, 4, 2)
    table = torch.tensor([[3, 0, 0], [1, 2, 0]])
    out = gather_kv(keys, table, 6)
    assert out.shape == (2, 1, 6, 2)
    assert torch.equal(out[1, 0, :4], keys[1, 0])
    assert torch.equal(out[1, 0, 4:6], keys[2, 0, :2])
