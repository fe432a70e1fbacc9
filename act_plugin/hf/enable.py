"""Turning ACT on for a model: :func:`enable_act` (checks, finds the attention modules,
switches the implementation, installs the handle) and the :func:`act_enabled` block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from torch import nn

from act_plugin.config import ACTConfig, ACTConfigError, model_shape
from act_plugin.hf.handle import CALIBRATED_MODELS, ACTHandle, HFModel, disable_act
from act_plugin.hf.registration import SUPPORTED_BASES, act_impl_name


def enable_act(model: nn.Module, config: Any, *, capture: bool = False, capture_probs: bool = False) -> ACTHandle:
    """Calibrate ``model``'s attention with ``config`` (anything :meth:`ACTConfig.from_any` reads).

    Validates the head set against the model (:class:`ACTConfigError` naming the bad
    layer/head and the model's shape), switches the model to ``"act_<base>"`` where
    ``<base>`` is its current implementation (``sdpa`` or ``eager``), and returns the
    handle. Enabling an already calibrated model replaces its configuration.
    """
    cfg = ACTConfig.from_any(config)
    old = CALIBRATED_MODELS.get(model)
    if old is not None:
        disable_act(model)
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(f"enable_act needs a transformers PreTrainedModel, got {type(model).__name__}")
    hf_model = cast(HFModel, model)
    text_cfg = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
    shape = model_shape(hf_model.config)
    heads = cfg.validate_for(hf_model.config)

    base = getattr(text_cfg, "_attn_implementation", None) or "sdpa"
    if base not in SUPPORTED_BASES:
        raise ValueError(
            f"ACT (HF path) calibrates on top of the 'sdpa' or 'eager' attention implementation; this model uses "
            f"{base!r}. Call model.set_attn_implementation('sdpa') (or load with attn_implementation='sdpa') first."
        )
    previous = _current_impl(hf_model)

    attn_modules = _attention_modules(model, shape.num_layers)
    missing = sorted(set(heads) - set(attn_modules.values()))
    if missing:
        raise ACTConfigError(
            f"ACT config names layer(s) {missing}, but no attention module with that layer_idx was found in "
            f"{type(model).__name__} ({shape.describe()})"
        )
    handle = ACTHandle(model, cfg, heads, base, previous, shape.num_heads, capture=capture, capture_probs=capture_probs)
    hf_model.set_attn_implementation(act_impl_name(base))
    if getattr(text_cfg, "_attn_implementation", None) != act_impl_name(base):
        hf_model.set_attn_implementation(previous)
        raise RuntimeError(
            f"{type(model).__name__} did not accept the attention implementation {act_impl_name(base)!r} "
            "(it does not dispatch attention through transformers' AttentionInterface)"
        )
    handle._install(model, attn_modules)
    CALIBRATED_MODELS[model] = handle
    return handle


def _attention_modules(model: nn.Module, num_layers: int) -> dict[nn.Module, int]:
    """Attention modules of the text decoder, by ``layer_idx``."""
    model_cfg = cast(HFModel, model).config
    text_cfg = model_cfg.get_text_config() if hasattr(model_cfg, "get_text_config") else model_cfg
    found: dict[nn.Module, int] = {}
    for mod in model.modules():
        idx = getattr(mod, "layer_idx", None)
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < num_layers:
            continue
        if not any(hasattr(mod, p) for p in ("q_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv")):
            continue  # a decoder layer or cache helper that also carries layer_idx
        cfg = getattr(mod, "config", None)
        if cfg is not None and cfg is not text_cfg and cfg is not model_cfg:
            continue  # e.g. a vision tower's attention
        found[mod] = idx
    return found


def _current_impl(model: HFModel) -> str | dict:
    cfg = model.config
    subs = {}
    for key in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, key, None)
        if sub is not None and getattr(sub, "_attn_implementation", None) is not None:
            subs[key] = sub._attn_implementation
    if not subs:
        return cfg._attn_implementation
    return {"": cfg._attn_implementation, **subs}


@contextmanager
def act_enabled(model: nn.Module, config: Any, **kwargs: Any) -> Iterator[ACTHandle]:
    """``with act_enabled(model, cfg) as handle: ...`` -- calibrated inside the block only."""
    handle = enable_act(model, config, **kwargs)
    try:
        yield handle
    finally:
        handle.disable()
