"""vLLM engine plugin: ACT inside vLLM's attention backends.

vLLM calls :func:`register` (entry point ``vllm.general_plugins: act``) in every process it
starts, possibly several times. Registration is cheap and idempotent:

* the attention backends act-plugin wraps (:data:`BACKEND_WRAPPERS`) are re-pointed, through
  vLLM's own backend registry, at thin subclasses in :mod:`act_plugin.vllm.backends`; those
  hand out the *native* implementation unless the engine has an ACT configuration, so an
  engine without one runs vanilla vLLM;
* the platform's ``check_and_update_config`` hook is wrapped so that an engine *with* an ACT
  configuration is validated against its model and set up for per-call statistics (one-call
  prefill, no prefix caching, the router of its model runner) before the engine starts;
* the platform's backend selector is wrapped so that, with ACT on, a decoder attention layer
  on a backend act-plugin does not wrap is refused when the model is built;
* the OpenAI server's beam-search conversion refuses a request that names an ACT arm (vLLM's
  beam search re-issues requests without their ``vllm_xargs``; the arm would be lost).

Turning ACT on::

    LLM(model, additional_config={"act": {"beta": 0.4, "heads": {"2": [0, 3]}}})
    vllm serve MODEL --additional-config '{"act": {...}}'
    ACT_CONFIG=/path/act.yaml vllm serve MODEL
"""

from __future__ import annotations

import logging
from typing import Any

from act_plugin.config.vocabulary import REQUEST_KEY
from act_plugin.vllm.backend_registry import BACKEND_WRAPPERS
from act_plugin.vllm.layer_support import check_backend_choice

logger = logging.getLogger("act_plugin")

__all__ = ["BACKEND_WRAPPERS", "register"]

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
            # wrapping their class silently would be guesswork. With ACT on, the selector
            # guard below then refuses the engine for layers on it.
            logger.warning("act-plugin: %s is already overridden (%s); not wrapping it", name, backend.get_path())
            continue
        register_backend(backend, path)

    # Deferred, like every import in this module that reaches vLLM: importing the package
    # (for act_plugin.vllm.env / compat, e.g. in the eval's front end) must not load vLLM.
    from act_plugin.vllm.config_hook import install_config_hook

    install_config_hook()
    _install_backend_guard()
    _install_beam_search_guard()
    _registered = True


def _install_backend_guard() -> None:
    from vllm.platforms import current_platform

    # Any: a classmethod of vLLM's platform class is replaced below (get_attn_backend_cls wrapped), which its
    # declared type does not allow; the wrapper keeps the original signature.
    platform_cls: Any = type(current_platform)
    original = getattr(platform_cls, "get_attn_backend_cls", None)
    if original is None or getattr(original, "_act_wrapped", False):
        return
    original_func = original.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        path = original_func(cls, selected_backend, attn_selector_config, *args, **kwargs)
        if path:
            check_backend_choice(path, attn_selector_config)
        return path

    get_attn_backend_cls._act_wrapped = True  # type: ignore[attr-defined]
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _install_beam_search_guard() -> None:
    """Refuse ``use_beam_search`` requests that name an ACT arm (HTTP 400), instead of
    running their beams on the engine's default arm."""
    import sys

    from act_plugin.vllm.request_spans import SPANS_KEY

    targets = []
    for mod, cls in (
        ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
        ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
    ):
        # Only where the OpenAI server is loaded (it imports these before plugins load):
        # importing them in every worker would cost start-up time for nothing.
        module = sys.modules.get(mod)
        if module is not None and hasattr(module, cls):
            targets.append(getattr(module, cls))
    for request_cls in targets:
        original = request_cls.to_beam_search_params
        if getattr(original, "_act_wrapped", False):
            continue

        def to_beam_search_params(self, *args, _original=original, **kwargs):
            xargs = getattr(self, "vllm_xargs", None) or {}
            given = [k for k in (REQUEST_KEY, SPANS_KEY) if k in xargs]
            if given:
                raise ValueError(
                    f"'{given[0]}' in vllm_xargs is not supported with use_beam_search: vLLM's beam search "
                    "re-issues the request without its vllm_xargs, so the beams would run the engine's default "
                    "ACT arm instead. Drop use_beam_search, or drop the 'act' value to use the default arm."
                )
            return _original(self, *args, **kwargs)

        to_beam_search_params._act_wrapped = True  # type: ignore[attr-defined]
        request_cls.to_beam_search_params = to_beam_search_params
