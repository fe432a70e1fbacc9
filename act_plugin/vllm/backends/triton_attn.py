"""TRITON_ATTN with ACT (CUDA/ROCm). Its KV layout is unit-tested on CPU (tests/test_kv_layout.py)."""

from __future__ import annotations

from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from act_plugin.vllm.backends import ACTImplMixin, act_enabled_for_current_engine
from act_plugin.vllm.kv_layout import flash_attn_split


class ACTTritonAttentionImpl(ACTImplMixin, TritonAttentionImpl):
    def act_kv_split(self, kv_cache):
        # Triton may pad the head size inside the cache; keys/values start at 0 and P.
        return flash_attn_split(kv_cache, self.head_size)


class ACTTritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return ACTTritonAttentionImpl if act_enabled_for_current_engine() else TritonAttentionImpl
