"""FLASHINFER with ACT (CUDA; vLLM's first choice on Blackwell).

vLLM 0.32 hands every backend's ``Impl`` the same logical per-layer cache view, ``[blocks,
kv_heads, block, 2*D]`` with keys then values in the last dimension; FlashInfer's HND/NHD
choice only changes the strides (``KVCacheLayout.layer_view_order``), which the gather
follows. So FlashInfer shares FLASH_ATTN's adapter.
"""

from __future__ import annotations

from vllm.v1.attention.backends.flashinfer import FlashInferBackend

from act_plugin.kernels.cache_layout import flash_attn_split
from act_plugin.vllm.backends import act_backend

# Whole-layer decode: forward only reads the cache (do_kv_cache_update writes it); the scales it
# sets lazily on its first call are set whenever it first runs.
ACTFlashInferBackend = act_backend(FlashInferBackend, flash_attn_split, whole_decode=True)
