"""CPU_ATTN with ACT (vLLM's CPU attention backend)."""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from act_plugin.vllm.backends import ACTImplMixin, act_enabled_for_current_engine
from act_plugin.vllm.kv_layout import cpu_attn_split


class ACTCPUAttentionImpl(ACTImplMixin, CPUAttentionBackendImpl):
    def act_kv_split(self, kv_cache):
        return cpu_attn_split(kv_cache)


class ACTCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return ACTCPUAttentionImpl if act_enabled_for_current_engine() else CPUAttentionBackendImpl
