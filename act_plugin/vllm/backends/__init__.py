"""Wrapped vLLM attention backends, one file per native backend.

Each wrapper subclasses the native ``Backend`` and hands out the native ``Impl`` unless the
engine being built has an ACT configuration; then it hands out a subclass of the native
``Impl`` whose ``forward`` runs the native kernel and lets a
:class:`~act_plugin.vllm.calibrate.LayerCalibrator` overwrite the configured heads.
"""

from __future__ import annotations

from typing import Any

from act_plugin.vllm.calibrate import LayerCalibrator
from act_plugin.vllm.kv_layout import KVSplit


def act_enabled_for_current_engine() -> bool:
    from vllm.config import get_current_vllm_config

    from act_plugin.vllm.engine import act_configured

    try:
        cfg = get_current_vllm_config()
    except Exception:  # no config context (tests building a bare impl)
        return False
    return act_configured(cfg)


def make_calibrator(impl: Any, kv_split: KVSplit) -> LayerCalibrator:
    """A calibrator for a native ``Impl`` after its ``__init__`` ran."""
    from vllm.config import get_current_vllm_config

    from act_plugin.vllm.engine import ACTEngineError
    from act_plugin.vllm.runtime import init_worker_state

    kv_dtype = str(getattr(impl, "kv_cache_dtype", "auto"))
    if kv_dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ACTEngineError(f"ACT does not support kv_cache_dtype={kv_dtype!r}; use 'auto'")
    unsupported = []
    if getattr(impl, "alibi_slopes", None) is not None:
        unsupported.append("ALiBi position bias")
    if getattr(impl, "logits_soft_cap", None):
        unsupported.append("logit soft-capping")
    if getattr(impl, "sinks", None) is not None:
        unsupported.append("learned attention sinks (s_aux)")
    window = getattr(impl, "sliding_window", None)
    if isinstance(window, tuple):  # flash-attn style (left, right)
        window = window[0] + 1 if window[0] >= 0 else None
    return LayerCalibrator(
        state=init_worker_state(get_current_vllm_config()),
        num_heads=impl.num_heads,
        num_kv_heads=impl.num_kv_heads,
        scale=float(impl.scale),
        sliding_window=window,
        kv_split=kv_split,
        unsupported=", ".join(unsupported) or None,
    )


class ACTImplMixin:
    """Mixed in before a native ``Impl``: native forward, then ACT on the configured heads."""

    def act_kv_split(self, kv_cache):  # pragma: no cover - overridden per backend
        raise NotImplementedError

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.act = make_calibrator(self, self.act_kv_split)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        result = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output,
            output_scale=output_scale, output_block_scale=output_block_scale,
        )
        if self.attn_type == "decoder":
            self.act.apply(layer, query, kv_cache, attn_metadata, output)
        return result
