"""Whether ACT can calibrate a vLLM attention layer, judged from what vLLM built for it.

* :func:`describe_layer` turns one registered forward-context layer into a capability row
  (attention kind and type, backend, impl, whether a calibrator is attached, what the
  capability table (:mod:`act_plugin.capabilities`) refuses);
* :func:`check_profiles_against_layers` raises :class:`ACTEngineError` when a profile
  configures a layer that a row says cannot be calibrated: at start-up
  (:mod:`act_plugin.vllm.startup_check`) and before every runtime reconfiguration
  (:meth:`act_plugin.vllm.worker_state.WorkerState.check`);
* :func:`check_backend_choice` runs when vLLM picks a layer's backend: with ACT on, a decoder
  self-attention layer on a backend the plugin does not wrap is refused there (no ACT
  metadata builder would ever run the start-up check for such a model).

Nothing here holds state; it judges rows and settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from act_plugin.capabilities import LayerFeatures, describe_refusal, unsupported_reasons
from act_plugin.config import ACTConfigError, ACTEngineConfig
from act_plugin.vllm.backend_registry import BACKEND_HINT, BACKEND_WRAPPERS, wrapped_backend_names
from act_plugin.vllm.config_source import act_configured

__all__ = ["ACTEngineError", "impl_features", "describe_layer", "layer_problem", "check_profiles_against_layers",
           "check_backend_choice"]


class ACTEngineError(ACTConfigError):
    """An engine setting or model that ACT cannot work with (refused at start)."""


def impl_features(impl: Any) -> LayerFeatures:
    """What a native ``Impl`` computes, for the capability table."""
    attn_type = getattr(impl, "attn_type", "decoder")
    return LayerFeatures(
        attn_type=str(getattr(attn_type, "value", attn_type)),  # vLLM's AttentionType enum or str
        alibi=getattr(impl, "alibi_slopes", None) is not None,
        logit_softcap=bool(getattr(impl, "logits_soft_cap", None)),
        learned_sinks=getattr(impl, "sinks", None) is not None,
        kv_cache_dtype=str(getattr(impl, "kv_cache_dtype", "auto")),
    )


def _layer_kind(module: Any) -> str:
    name = type(module).__name__
    if "MLA" in name:
        return "mla"
    if "Mamba" in name or "ShortConv" in name or "GDN" in name or "Linear" in name:
        return "mamba/linear attention"
    if "ChunkedLocal" in name:
        return "chunked local attention"
    if "CrossAttention" in name:
        return "cross-attention"
    if "EncoderOnly" in name:
        return "encoder-only attention"
    return "attention" if hasattr(module, "impl") else name


def _layer_index(name: str) -> int | None:
    from vllm.model_executor.models.utils import extract_layer_index  # vLLM itself: loaded with the model

    try:
        return extract_layer_index(name)
    except (AssertionError, ValueError):
        return None


def _layer_features(impl: Any, kind: str) -> LayerFeatures:
    """The features of a layer: the ACT impl's own record where there is one, else the
    native impl's, with the kind of layer the module is."""
    if impl is not None and hasattr(impl, "act_features"):
        features = impl.act_features
        return features if kind == "attention" else LayerFeatures(kind=kind, attn_type=features.attn_type)
    base = impl_features(impl) if impl is not None else LayerFeatures()
    return LayerFeatures(
        kind=kind, attn_type=base.attn_type, alibi=base.alibi, logit_softcap=base.logit_softcap,
        learned_sinks=base.learned_sinks, kv_cache_dtype=base.kv_cache_dtype,
    )


def describe_layer(name: str, module: Any) -> dict:
    """Capability row of one registered forward-context layer; ``_calibrator`` is the
    layer's calibrator (None: none), which the start-up check binds and then drops."""
    impl = getattr(module, "impl", None)
    backend = getattr(module, "attn_backend", None)
    kind = _layer_kind(module)
    features = _layer_features(impl, kind)
    calibrator = getattr(impl, "act", None)
    return {
        "layer_name": name,
        "layer": _layer_index(name),
        "kind": kind,
        "attn_type": features.attn_type,
        "backend": backend.get_name() if backend is not None and hasattr(backend, "get_name") else None,
        "impl": type(impl).__name__ if impl is not None else None,
        "calibrator": calibrator is not None,
        "unsupported": unsupported_reasons(features),
        "_calibrator": calibrator,
    }


def layer_problem(row: dict) -> str | None:
    """Why a configured layer would not be calibrated (None: it will be)."""
    where = f"layer {row['layer']} ({row['layer_name']}, {row['kind']}, backend {row['backend']}, impl {row['impl']})"
    if row["unsupported"]:
        return describe_refusal(where, row["unsupported"], "Remove this layer from the ACT configuration.")
    if not row["calibrator"]:
        return describe_refusal(
            where, [f"vLLM chose the {row['backend']} attention backend, which act-plugin does not wrap"],
            "Choose a wrapped backend with " + BACKEND_HINT.format(choices="|".join(wrapped_backend_names()))
            + ", or remove this layer from the ACT configuration.",
        )
    return None


def check_profiles_against_layers(
    engine_cfg: ACTEngineConfig, rows: list[dict], holds: Callable[[int], bool] | None = None, where: str = ""
) -> None:
    """Raise ACTEngineError if a profile configures a layer this worker cannot calibrate.

    ``holds``: whether this worker's pipeline stage holds a layer (None: every layer); the
    layers it does not hold are judged on the stage that does. ``where`` names the worker in
    the message ("PP stage 1 / TP rank 0")."""
    if not rows:
        return  # not checked yet (before the model is loaded)
    prefix = f"{where}: " if where else ""
    by_index: dict[int, list[dict]] = {}
    for row in rows:
        if row["layer"] is not None:
            by_index.setdefault(row["layer"], []).append(row)
    for name, prof in engine_cfg.profiles.items():
        if prof.is_identity:
            continue
        for layer in prof.heads:
            if holds is not None and not holds(layer):
                continue
            found = by_index.get(layer)
            if not found:
                raise ACTEngineError(
                    f"{prefix}profile '{name}': ACT cannot calibrate layer {layer}: the model registers no attention "
                    "layer with that index for the forward pass (e.g. a Mamba/linear-attention layer). "
                    "Remove it from the ACT configuration."
                )
            for row in found:
                problem = layer_problem(row)
                if problem:
                    raise ACTEngineError(f"{prefix}profile '{name}': {problem}")


def check_backend_choice(class_path: str, attn_selector_config: Any) -> None:
    """Refuse, when ACT is on, a decoder self-attention backend act-plugin does not wrap."""
    from vllm.config import get_current_vllm_config_or_none  # vLLM itself: only called from its selector

    if not act_configured(get_current_vllm_config_or_none()):
        return
    attn_type = getattr(attn_selector_config, "attn_type", "decoder")
    if str(getattr(attn_type, "value", attn_type)) != "decoder":
        return  # other attention types are judged per layer by the start-up check
    if getattr(attn_selector_config, "use_mla", False):
        return  # MLA is refused by the engine config hook
    if class_path in BACKEND_WRAPPERS.values():
        return
    name = class_path.rsplit(".", 1)[-1]
    raise ACTEngineError(
        f"ACT is configured, but vLLM chose the attention backend {name} ({class_path}) for this model's "
        f"attention layers, and act-plugin does not wrap it, so no layer would be calibrated. Choose a "
        f"wrapped backend with " + BACKEND_HINT.format(choices="|".join(wrapped_backend_names()))
        + ", or start the engine without an ACT configuration."
    )
