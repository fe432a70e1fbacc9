"""The ``act_<base>`` attention implementations in transformers' registries, and their dispatch.

One name per base is needed because transformers builds the attention mask from the
implementation name: a bare ``"act"`` would get no mask at all. The mask registry entry is the
base implementation's own mask builder, so every layer receives exactly the mask the base
implementation would get. The registered function runs the base implementation for modules no
handle calibrates, and hands calibrated modules to their handle.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from torch import nn

SUPPORTED_BASES = ("sdpa", "eager")
_PREFIX = "act_"


class CalibratingHandle(Protocol):
    """What the dispatch needs of an active handle (:class:`act_plugin.hf.handle.ACTHandle`)."""

    def layer_attention(self, layer: int, base_fn: Callable, module: nn.Module, query: Any, key: Any, value: Any,
                        attention_mask: Any, args: tuple, kwargs: dict) -> Any: ...


# attention module -> (the handle calibrating it, its layer index)
CALIBRATED_MODULES: "weakref.WeakKeyDictionary[nn.Module, tuple[CalibratingHandle, int]]" = weakref.WeakKeyDictionary()
_EAGER_CACHE: dict[type, Callable] = {}


def act_impl_name(base: str) -> str:
    """The attention implementation name registered for ACT on top of ``base``."""
    return _PREFIX + base


def _eager_fn(module: nn.Module) -> Callable:
    """The model file's own ``eager_attention_forward`` (what transformers uses for "eager")."""
    cls = type(module)
    fn = _EAGER_CACHE.get(cls)
    if fn is None:
        found = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if found is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward

            found = eager_attention_forward
        fn = _EAGER_CACHE[cls] = found
    return fn


def _base_fn(base: str, module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # Exactly the dispatch the model's own code performs for ``base``.
    return ALL_ATTENTION_FUNCTIONS.get_interface(base, _eager_fn(module))


def _make_attention(base: str) -> Callable:
    def act_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
        base_fn = _base_fn(base, module)
        entry = CALIBRATED_MODULES.get(module)
        if entry is None:
            return base_fn(module, query, key, value, attention_mask, *args, **kwargs)
        handle, layer = entry
        return handle.layer_attention(layer, base_fn, module, query, key, value, attention_mask, args, kwargs)

    act_attention_forward.__name__ = f"act_{base}_attention_forward"
    act_attention_forward.__qualname__ = act_attention_forward.__name__
    return act_attention_forward


def register_act_implementations() -> None:
    """Register ``act_sdpa`` and ``act_eager`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for base in SUPPORTED_BASES:
        name = act_impl_name(base)
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make_attention(base))
        if name not in AttentionMaskInterface._global_mapping:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
