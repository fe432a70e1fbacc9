"""Which of vLLM's attention backends act-plugin wraps, and where each wrapper class lives.

Class paths, not classes: vLLM's backend registry imports a wrapper only when it resolves the
backend for a model, so importing this module (and :mod:`act_plugin.vllm`) loads no backend.
"""

from __future__ import annotations

__all__ = ["BACKEND_WRAPPERS", "BACKEND_HINT", "wrapped_backend_names"]

# Native backend name -> class path of our wrapper (one module per backend in backends/).
BACKEND_WRAPPERS = {
    "CPU_ATTN": "act_plugin.vllm.backends.cpu_attn.ACTCPUAttentionBackend",
    "FLASH_ATTN": "act_plugin.vllm.backends.flash_attn.ACTFlashAttentionBackend",
    "TRITON_ATTN": "act_plugin.vllm.backends.triton_attn.ACTTritonAttentionBackend",
    "FLASHINFER": "act_plugin.vllm.backends.flashinfer.ACTFlashInferBackend",
}

# How a user picks a backend; every refusal about backends ends with it.
BACKEND_HINT = "--attention-backend {choices} (attention_config={{'backend': ...}} in Python)"


def wrapped_backend_names() -> list[str]:
    return sorted(BACKEND_WRAPPERS)
