"""vLLM engine plugin: ACT inside vLLM's attention backends.

vLLM calls :func:`register` (entry point ``vllm.general_plugins: act``) in every process it
starts, possibly several times. Registration is cheap and idempotent:

* the platform's attention backends (CPU_ATTN on CPU; FLASH_ATTN and TRITON_ATTN on CUDA)
  are re-pointed, through vLLM's own backend registry, at thin subclasses in
  :mod:`act_plugin.vllm.backends`; those subclasses hand out the *native* implementation
  unless the engine has an ACT configuration, so an engine without one runs vanilla vLLM;
* the platform's ``check_and_update_config`` hook is wrapped so that an engine *with* an
  ACT configuration is validated against its model and set up for per-call statistics
  (one-call prefill, no prefix caching) before the engine starts -- the same place where
  vLLM itself switches these off for models that need it.

Turning ACT on::

    LLM(model, additional_config={"act": {"beta": 0.4, "heads": {"2": [0, 3]}}})
    vllm serve MODEL --additional-config '{"act": {...}}'
    ACT_CONFIG=/path/act.yaml vllm serve MODEL
"""

from __future__ import annotations

import logging

logger = logging.getLogger("act_plugin")

# Native backend name -> class path of our wrapper. Lazy: nothing is imported until vLLM
# resolves the backend for a model.
BACKEND_WRAPPERS = {
    "CPU_ATTN": "act_plugin.vllm.backends.cpu_attn.ACTCPUAttentionBackend",
    "FLASH_ATTN": "act_plugin.vllm.backends.flash_attn.ACTFlashAttentionBackend",
    "TRITON_ATTN": "act_plugin.vllm.backends.triton_attn.ACTTritonAttentionBackend",
}

_registered = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (safe to call many times)."""
    global _registered
    if _registered:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    for name, path in BACKEND_WRAPPERS.items():
        backend = AttentionBackendEnum[name]
        if backend.is_overridden() and backend.get_path() != path:
            # Somebody else (another plugin, the user) already replaced this backend:
            # wrapping their class silently would be guesswork, so leave it alone.
            logger.warning("act-plugin: %s is already overridden (%s); not wrapping it", name, backend.get_path())
            continue
        register_backend(backend, path)

    from act_plugin.vllm.engine import install_config_hook

    install_config_hook()
    _registered = True
