"""CPU_ATTN with ACT (vLLM's CPU attention backend)."""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from act_plugin.vllm.backends import act_backend
from act_plugin.vllm.kv_layout import cpu_attn_split, verify_cpu_layout


class CPUAttentionImplWithLayoutCheck(CPUAttentionBackendImpl):
    """The native impl, checking once that ACT reads the cache layout of the ISA in use."""

    # Until the check has run, ACT never computes a layer in place of this kernel.
    act_layout_verified = False

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is not None and not getattr(self, "_act_layout_checked", False):
            # The ISA is chosen by the metadata builder; check our reader against it once.
            verify_cpu_layout(layer.isa, kv_cache.dtype, self.head_size, kv_cache.shape[2])
            self._act_layout_checked = True
            self.act_layout_verified = True
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                               output_block_scale)


# Whole-layer decode: the fused CPU kernel computes decode steps whose rows all run ACT arms in
# one pass (act_plugin.vllm.calibrate.LayerCalibrator.decode_whole_layer) instead of this
# backend's kernel followed by a second read of the cache.
ACTCPUAttentionBackend = act_backend(CPUAttentionBackend, cpu_attn_split, impl_base=CPUAttentionImplWithLayoutCheck,
                                     whole_decode=True)
