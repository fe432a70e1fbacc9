"""CPU_ATTN with ACT (vLLM's CPU attention backend)."""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from act_plugin.kernels.cache_layout import cpu_attn_split, gather_kv
from act_plugin.vllm.backends import act_backend

_verified: dict = {}


def verify_cpu_layout(isa: str, dtype: torch.dtype, head_size: int, block_size: int) -> None:
    """Write known keys/values with vLLM's own CPU cache kernel and read them back through
    :func:`cpu_attn_split`; raise if this ISA stores them in another layout."""
    key = (isa, dtype, head_size, block_size)
    if key in _verified:
        if _verified[key]:
            raise NotImplementedError(_verified[key])
        return
    gen = torch.Generator().manual_seed(0)
    nb, hkv, t = 3, 2, block_size + 3
    kv = torch.zeros(nb, hkv, block_size, 2 * head_size, dtype=dtype)
    k_view, v_view = kv.view(nb, hkv, 2 * block_size, head_size).chunk(2, dim=2)  # vLLM's own view
    k = torch.randn(t, hkv, head_size, generator=gen).to(dtype)
    v = torch.randn(t, hkv, head_size, generator=gen).to(dtype)
    slots = torch.arange(t) + block_size  # blocks 1 and 2
    ops.cpu_attn_reshape_and_cache(k, v, k_view, v_view, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    keys, values = cpu_attn_split(kv)
    table = torch.tensor([[1, 2]])
    ok = torch.equal(gather_kv(keys, table, t)[0].transpose(0, 1), k) and torch.equal(
        gather_kv(values, table, t)[0].transpose(0, 1), v
    )
    _verified[key] = None if ok else (
        f"ACT cannot read vLLM's CPU KV cache for the '{isa}' attention ISA ({dtype}, head size {head_size}); "
        "supported: the 'vec'/'vec16' layouts (x86 AVX2/AVX-512 without AMX)"
    )
    if _verified[key]:
        raise NotImplementedError(_verified[key])


class CPUAttentionImplWithLayoutCheck(CPUAttentionBackendImpl):
    """The native impl, checking once that ACT reads the cache layout of the ISA in use."""

    def act_layout_ready(self, layer, kv_cache: torch.Tensor) -> bool:
        """Check (once) that ACT reads the cache layout of the ISA the metadata builder chose
        for ``layer``; raises if it cannot. Called before the first step decides between ACT's
        whole-layer kernel and this one, so that the engine's first step takes the same path
        as every later one: a request's result never depends on whether it ran first (a
        resumed eval's first step would otherwise differ from the uninterrupted run's)."""
        if not getattr(self, "_act_layout_checked", False):
            verify_cpu_layout(layer.isa, kv_cache.dtype, self.head_size, kv_cache.shape[2])
            self._act_layout_checked = True
        return True

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is not None:  # also without ACT's whole-layer path (steps mixing rules)
            self.act_layout_ready(layer, kv_cache)
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                               output_block_scale)


# Whole layer: the fused CPU kernel computes steps whose rows all run ACT arms
# (act_plugin.vllm.layer_calibrator.LayerCalibrator.whole_layer) instead of this backend's kernel
# followed by a separate calibration pass: decode steps in one read of the cache, steps with
# prefill rows (unless ACT_WHOLE_PREFILL=0) with each calibrated head's scores computed once.
ACTCPUAttentionBackend = act_backend(CPUAttentionBackend, cpu_attn_split, impl_base=CPUAttentionImplWithLayoutCheck,
                                     whole_decode=True)
