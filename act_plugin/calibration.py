"""The one calibration entry point every host calls.

A host (the transformers reference path, the head search, the vLLM calibrator) knows a
layer's queries, keys and values, which heads a profile calibrates, the positions, the
scale and the window. It describes the layer with :func:`hf_layer_features` (or its own
:class:`~act_plugin.capabilities.LayerFeatures`), refuses it with the capability table if
needed, and calls:

* :func:`calibrate_heads` on dense ``[B, heads, L, D]`` tensors (transformers' layout), or
* :func:`act_plugin.kernels.calibrate_paged` on vLLM's paged cache (same maths, same
  arguments, fused kernels behind it);

Profiles of other rules (``first_token``, ``spans``: :mod:`act_plugin.rules`) go through
:func:`profile_rule` and :func:`calibrate_heads_rule` (dense, the reference formula).

Either way it then writes the result back with :func:`replace_heads` (calibrated output instead of the
native one) or :func:`gate_heads` (native + alpha * (calibrated - native), the head search's
first-order ranking). The maths itself is :mod:`act_plugin.core`.
"""

from __future__ import annotations

from typing import Any

import torch

from act_plugin.capabilities import LayerFeatures, describe_refusal, unsupported_reasons
from act_plugin.core import ACTResult, act_attention_blocked, act_attention_dense
from act_plugin.rules import FirstTokenRule, KeyReweightRule, RuleResult, SpanRule, rule_attention_dense

__all__ = ["calibrate_heads", "calibrate_heads_rule", "profile_rule",
           "kv_heads_of", "replace_heads", "gate_heads", "hf_layer_features", "refuse_hf_layer",
           "attention_window", "attention_scale"]


def kv_heads_of(heads: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """The KV head each query head reads under grouped-query attention."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    return heads // (num_heads // num_kv_heads)


def calibrate_heads(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    heads: torch.Tensor,
    *,
    scale: float,
    beta: float,
    threshold: float,
    window: int | None = None,
    attn_mask: torch.Tensor | None = None,
    dense: bool = False,
) -> ACTResult:
    """ACT attention of the selected ``heads`` of one layer.

    ``query`` ``[B, H, Lq, D]`` (every head of the layer), ``key``/``value`` ``[B, Hkv, Lk,
    D]``, positions as in :mod:`act_plugin.core`, ``heads`` ``[Hs]`` query-head indices.
    Returns the core result for those heads only (``out`` ``[B, Hs, Lq, D]`` float32).
    ``dense=True`` keeps the full probability matrix (needed to return attention weights).
    """
    kv = kv_heads_of(heads, query.shape[1], key.shape[1])
    fn = act_attention_dense if dense else act_attention_blocked
    return fn(
        query.index_select(1, heads), key.index_select(1, kv), value.index_select(1, kv), q_pos, k_pos,
        scale=scale, beta=beta, threshold=threshold, window=window, attn_mask=attn_mask,
    )


def profile_rule(cfg: Any, layer: int, heads: list[int] | tuple[int, ...],
                 emphasised: torch.Tensor | None = None, device: torch.device | str = "cpu") -> KeyReweightRule:
    """The rule object of a non-``act`` profile (:class:`~act_plugin.config.ACTConfig`) for
    ``heads`` (global query heads) of ``layer``; ``spans`` needs ``emphasised`` ``[B, Lk]``
    (the emphasised keys of this call, :func:`act_plugin.span_marks.emphasised_keys`)."""
    if cfg.rule == "first_token":
        gammas = cfg.head_scales(layer, heads)
        scale = gammas[0] if len(set(gammas)) == 1 else torch.tensor(gammas, dtype=torch.float32, device=device)
        return FirstTokenRule(scale=scale)
    if cfg.rule == "spans":
        if emphasised is None:
            raise ValueError("a 'spans' profile needs the emphasised tokens of each sequence "
                             "(HF path: ACTHandle.set_emphasis)")
        return SpanRule(emphasised=emphasised, alpha=float(cfg.alpha))
    raise ValueError(f"profile_rule: rule {cfg.rule!r} is calibrated by calibrate_heads")


def calibrate_heads_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    heads: torch.Tensor,
    rule: KeyReweightRule,
    *,
    scale: float,
    window: int | None = None,
    attn_mask: torch.Tensor | None = None,
) -> RuleResult:
    """:func:`calibrate_heads` for any rule of :mod:`act_plugin.rules`, on the dense reference
    (memory: the ``[B, Hs, Lq, Lk]`` probabilities of the selected heads)."""
    kv = kv_heads_of(heads, query.shape[1], key.shape[1])
    return rule_attention_dense(
        query.index_select(1, heads), key.index_select(1, kv), value.index_select(1, kv), q_pos, k_pos, rule,
        scale=scale, window=window, attn_mask=attn_mask,
    )


def replace_heads(out: torch.Tensor, heads: torch.Tensor, calibrated: torch.Tensor) -> torch.Tensor:
    """``out`` ``[B, Lq, H, D]`` (attention functions' output layout) with ``heads`` replaced by
    ``calibrated`` ``[B, Hs, Lq, D]``; a new tensor, ``out`` is untouched."""
    out = out.clone()
    out[:, :, heads] = calibrated.transpose(1, 2).to(out.dtype)
    return out


def gate_heads(out: torch.Tensor, heads: torch.Tensor, calibrated: torch.Tensor, alpha: torch.Tensor,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """``out_h + alpha_h * (calibrated_h - out_h)`` for the selected heads, differentiable in
    ``alpha`` ``[Hs]`` only (the difference is a constant of the graph); ``valid`` ``[B, Lq]``
    zeroes the change on padding rows."""
    with torch.no_grad():
        delta = calibrated.transpose(1, 2).float() - out.detach()[:, :, heads].float()
        if valid is not None:
            delta = delta * valid[:, :, None, None]
    gated = out[:, :, heads] + alpha.view(1, 1, -1, 1).to(out.dtype) * delta.to(out.dtype)
    return out.index_copy(2, heads, gated)


def hf_layer_features(module: Any, kwargs: dict) -> LayerFeatures:
    """What a transformers attention call computes, from its module and keyword arguments."""
    return LayerFeatures(
        causal=kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False,
        logit_softcap=kwargs.get("softcap") is not None,
        learned_sinks=kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None,
        position_bias=kwargs.get("position_bias") is not None,
    )


def refuse_hf_layer(layer: int, module: Any, kwargs: dict, host: str) -> None:
    """Raise NotImplementedError when the capability table rejects this layer."""
    reasons = unsupported_reasons(hf_layer_features(module, kwargs))
    if reasons:
        raise NotImplementedError(describe_refusal(
            f"layer {layer} ({host})", reasons, "Remove this layer from the ACT configuration."))


def attention_window(module: Any, kwargs: dict) -> int | None:
    w = kwargs.get("sliding_window", None)
    if w is None:
        w = getattr(module, "sliding_window", None)
    return int(w) if isinstance(w, (int, torch.Tensor)) and int(w) > 0 else None


def attention_scale(module: Any, kwargs: dict, head_dim: int) -> float:
    scale = kwargs.get("scaling")
    if scale is None:
        scale = getattr(module, "scaling", None) or head_dim ** -0.5
    return float(scale)
