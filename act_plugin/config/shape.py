"""The shape of a model (layers, query heads, KV heads) that ACT configs are checked against."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from act_plugin.config.errors import ACTConfigError

__all__ = ["ModelShape", "model_shape"]


class ModelShape(BaseModel):
    """What :meth:`ACTConfig.validate_for` needs to know of a model."""

    model_config = ConfigDict(frozen=True)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    name: str = "model"

    def describe(self) -> str:
        return (
            f"{self.name} has {self.num_layers} layers (0..{self.num_layers - 1}) with "
            f"{self.num_heads} query heads each (0..{self.num_heads - 1}), {self.num_kv_heads} KV heads"
        )


def model_shape(model_config: Any) -> ModelShape:
    """Shape of a transformers ``PretrainedConfig``, a vLLM ``ModelConfig`` or a dict."""
    if isinstance(model_config, ModelShape):
        return model_config
    hf = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None) or model_config
    if hasattr(hf, "get_text_config"):
        hf = hf.get_text_config()
    get = hf.get if isinstance(hf, Mapping) else lambda key, default=None: getattr(hf, key, default)
    layers = get("num_hidden_layers") or get("n_layer") or get("num_layers")
    heads = get("num_attention_heads") or get("n_head")
    if not layers or not heads:
        raise ACTConfigError(f"cannot read num_hidden_layers / num_attention_heads from {type(hf).__name__}")
    kv = get("num_key_value_heads") or heads
    name = get("_name_or_path") or getattr(model_config, "model", None) or "model"
    return ModelShape(num_layers=int(layers), num_heads=int(heads), num_kv_heads=int(kv), name=str(name) or "model")
