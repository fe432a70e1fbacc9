"""FLASH_ATTN with ACT (CUDA). Its KV layout is unit-tested on CPU (tests/test_kv_layout.py)."""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

from act_plugin.kernels.cache_layout import flash_attn_split
from act_plugin.vllm.backends import act_backend

# Whole-layer decode (LayerCalibrator.decode_whole_layer): FlashAttentionImpl.forward only reads the
# cache (do_kv_cache_update writes it) and does nothing a skipped call would miss.
ACTFlashAttentionBackend = act_backend(FlashAttentionBackend, flash_attn_split, whole_decode=True)
