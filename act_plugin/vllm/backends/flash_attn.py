"""FLASH_ATTN with ACT (CUDA). Its KV layout is unit-tested on CPU (tests/test_kv_layout.py)."""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

from act_plugin.vllm.backends import ACTImplMixin, act_enabled_for_current_engine
from act_plugin.vllm.kv_layout import flash_attn_split


class ACTFlashAttentionImpl(ACTImplMixin, FlashAttentionImpl):
    def act_kv_split(self, kv_cache):
        return flash_attn_split(kv_cache, self.head_size)


class ACTFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return ACTFlashAttentionImpl if act_enabled_for_current_engine() else FlashAttentionImpl
