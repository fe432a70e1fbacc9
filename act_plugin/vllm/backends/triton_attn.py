"""TRITON_ATTN with ACT (CUDA/ROCm). Its KV layout is unit-tested on CPU (tests/test_kv_layout.py)."""

from __future__ import annotations

from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

from act_plugin.kernels.cache_layout import flash_attn_split
from act_plugin.vllm.backends import act_backend

# Triton may pad the head size inside the cache; flash_attn_split reads keys at [0, D) and
# values at [P, P + D) of each token's 2P entries.
# Whole-layer decode: as FLASH_ATTN, forward only reads the cache (do_kv_cache_update writes it).
ACTTritonAttentionBackend = act_backend(TritonAttentionBackend, flash_attn_split, whole_decode=True)
