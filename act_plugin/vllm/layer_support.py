"""Start-up self-check: every configured layer is calibrated, or the engine does not start.

Runs once per worker process, after the model is loaded (from the first ACT metadata
builder; see :mod:`act_plugin.vllm.backends`). It walks the layers vLLM registered for the
forward pass and, for every layer index some profile configures, checks that the layer is
decoder self-attention served by a wrapped backend whose ``Impl`` carries a calibrator, and
that the capability table (:mod:`act_plugin.capabilities`) accepts it. A problem raises
:class:`ACTEngineError` naming the layer, what vLLM chose and the setting to change, so a
request can never find it later. The report (per configured layer: attention type, backend,
impl, calibrated or not, local heads per profile) is what ``control.get_act_status`` returns.

Runtime reconfiguration checks new profiles against the same table
(:func:`check_profiles_against_layers`) before any worker switches.

A second guard, :func:`check_backend_choice`, runs when vLLM picks a layer's backend: with
ACT on, a decoder self-attention layer on a backend the plugin does not wrap is refused
there (no ACT builder would ever run the self-check for such a model).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from act_plugin.capabilities import LayerFeatures, describe_refusal, unsupported_reasons
from act_plugin.config import ACTConfigError, ACTEngineConfig

logger = logging.getLogger("act_plugin")

_done = False
_lock = threading.Lock()

BACKEND_HINT = "--attention-backend {choices} (attention_config={{'backend': ...}} in Python)"


class ACTEngineError(ACTConfigError):
    """An engine setting or model that ACT cannot work with (refused at start)."""


def wrapped_backend_names() -> list[str]:
    from act_plugin.vllm import BACKEND_WRAPPERS

    return sorted(BACKEND_WRAPPERS)


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


def describe_layer(name: str, module: Any) -> dict:
    """Capability row of one registered forward-context layer."""
    from vllm.model_executor.models.utils import extract_layer_index

    try:
        index = extract_layer_index(name)
    except (AssertionError, ValueError):
        index = None
    impl = getattr(module, "impl", None)
    backend = getattr(module, "attn_backend", None)
    backend_name = backend.get_name() if backend is not None and hasattr(backend, "get_name") else None
    calibrator = getattr(impl, "act", None)
    kind = _layer_kind(module)
    if impl is not None and hasattr(impl, "act_features"):
        features = impl.act_features
        if kind != "attention":
            features = LayerFeatures(kind=kind, attn_type=features.attn_type)
    else:
        from act_plugin.vllm.backends import impl_features

        base = impl_features(impl) if impl is not None else LayerFeatures()
        features = LayerFeatures(
            kind=kind, attn_type=base.attn_type, alibi=base.alibi, logit_softcap=base.logit_softcap,
            learned_sinks=base.learned_sinks, kv_cache_dtype=base.kv_cache_dtype,
        )
    return {
        "layer_name": name,
        "layer": index,
        "kind": kind,
        "attn_type": features.attn_type,
        "backend": backend_name,
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


def check_profiles_against_layers(engine_cfg: ACTEngineConfig, rows: list[dict]) -> None:
    """Raise ACTEngineError if a profile configures a layer this worker cannot calibrate."""
    if not rows:
        return  # not checked yet (before the model is loaded)
    by_index: dict[int, list[dict]] = {}
    for row in rows:
        if row["layer"] is not None:
            by_index.setdefault(row["layer"], []).append(row)
    for name, prof in engine_cfg.profiles.items():
        if prof.is_identity:
            continue
        for layer in prof.heads:
            found = by_index.get(layer)
            if not found:
                raise ACTEngineError(
                    f"profile '{name}': ACT cannot calibrate layer {layer}: the model registers no attention "
                    "layer with that index for the forward pass (e.g. a Mamba/linear-attention layer). "
                    "Remove it from the ACT configuration."
                )
            for row in found:
                problem = layer_problem(row)
                if problem:
                    raise ACTEngineError(f"profile '{name}': {problem}")


def run_startup_check(vllm_config: Any) -> None:
    """Check every configured layer of this worker once; attach layer indices; log a summary."""
    global _done
    with _lock:
        if _done:
            return
        from act_plugin.vllm.runtime import init_worker_state

        state = init_worker_state(vllm_config)
        ctx = vllm_config.compilation_config.static_forward_context
        rows = [describe_layer(name, module) for name, module in ctx.items()]
        check_profiles_against_layers(state.engine_cfg, rows)
        for row in rows:
            cal = row["_calibrator"]
            if cal is not None and not row["unsupported"] and row["layer"] is not None:
                cal.layer_index = row["layer"]
        state.layers = [{k: v for k, v in row.items() if k != "_calibrator"} for row in rows]
        _done = True
        configured = sorted(state.calibrated_layers())
        backends = sorted({str(r["backend"]) for r in rows if r["layer"] in configured})
        logger.info(
            "act-plugin: start-up check passed on TP rank %d: %d configured layer(s) %s calibrated on %s; "
            "runner %s; profiles %s (default %s)",
            state.tp.rank if state.tp else 0, len(configured), _ranges(configured), ", ".join(backends) or "-",
            state.runner, sorted(state.engine_cfg.profiles), state.engine_cfg.default,
        )


def configured_layer_report(state: Any) -> list[dict]:
    """Status rows of the layers the current profiles configure, with local heads per profile."""
    configured = state.calibrated_layers()
    out = []
    for row in state.layers:
        if row["layer"] not in configured:
            continue
        heads = {}
        for name, prof in state.engine_cfg.profiles.items():
            if prof.is_identity or row["layer"] not in prof.heads:
                continue
            num_local = _num_local_heads(state)
            local = state.local_heads(prof, row["layer"], num_local, "cpu")
            heads[name] = local.tolist() if local is not None else []
        out.append({**row, "local_heads": heads})
    return out


def _num_local_heads(state: Any) -> int:
    from vllm.distributed import get_tensor_model_parallel_world_size

    try:
        world = get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError):
        world = 1
    return state.tp.num_heads // world


def _ranges(values: list[int]) -> str:
    if not values:
        return "[]"
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        if v is not None:
            start = prev = v
    return ",".join(parts)


def check_backend_choice(class_path: str, attn_selector_config: Any) -> None:
    """Refuse, when ACT is on, a decoder self-attention backend act-plugin does not wrap."""
    from vllm.config import get_current_vllm_config_or_none

    from act_plugin.vllm import BACKEND_WRAPPERS
    from act_plugin.vllm.settings import act_configured

    if not act_configured(get_current_vllm_config_or_none()):
        return
    attn_type = getattr(attn_selector_config, "attn_type", "decoder")
    if str(getattr(attn_type, "value", attn_type)) != "decoder":
        return  # other attention types are judged per layer by the self-check
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
