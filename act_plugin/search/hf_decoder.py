"""Hooks into a transformers model's own forward for the head search: find its decoder
stack, keep layer inputs, keep each prompt's last token before the head, and short-circuit
the layers before a restart layer (see :mod:`act_plugin.search.hf_backend`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["HFSearchUnsupported", "find_decoder", "describe_model", "LastTokens", "KeepInput", "skip_layers"]


class HFSearchUnsupported(RuntimeError):
    """The model cannot be searched on the transformers path; the message names it and why."""


def _layer_index(layer: nn.Module) -> int | None:
    """The one ``layer_idx`` the modules of a decoder layer carry (None if none or several)."""
    found = {idx for m in layer.modules() if isinstance(idx := getattr(m, "layer_idx", None), int)}
    return found.pop() if len(found) == 1 else None


def find_decoder(model: nn.Module, num_layers: int) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder stack (the module whose forward runs the decoder layers) and its layer
    list: the first ``ModuleList`` of ``num_layers`` modules whose i-th is layer i."""
    for owner in model.modules():
        for child in owner.children():
            if isinstance(child, nn.ModuleList) and len(child) == num_layers and all(
                    _layer_index(layer) == i for i, layer in enumerate(child)):
                return owner, child
    raise HFSearchUnsupported(
        f"head search (HF path): found no list of {num_layers} decoder layers (each holding an attention module "
        f"with its layer_idx) in {describe_model(model)}; use method 'exact', which runs in vLLM")


def describe_model(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"model type {model_type!r} ({type(model).__name__})" if model_type else type(model).__name__


class LastTokens:
    """Forward hook on the decoder stack: its output keeps each prompt's last token only, so
    the model's own head (norm already applied by the stack, LM head, soft-capping) runs on
    one row per prompt."""

    def __init__(self, last: torch.Tensor):
        self.last = last

    def _pick(self, h: torch.Tensor) -> torch.Tensor:
        return h[torch.arange(h.shape[0]), self.last].unsqueeze(1)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return self._pick(output)
        if isinstance(output, tuple):
            return (self._pick(output[0]), *output[1:])
        output.last_hidden_state = self._pick(output.last_hidden_state)
        return output


class KeepInput:
    """Forward pre-hook on decoder layer ``layer``: keeps its input hidden states."""

    def __init__(self, store: dict[int, torch.Tensor], layer: int):
        self.store, self.layer = store, layer

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.store[self.layer] = hidden.detach()


@contextmanager
def skip_layers(layers: list[nn.Module], hidden: torch.Tensor | None, as_tuple: bool) -> Iterator[None]:
    """Inside the block each of ``layers`` (those before a restart layer) hands on ``hidden``,
    the cached input of the restart layer, in the layers' own output structure, without
    computing anything. A layer's forward may already be wrapped on the instance
    (accelerate's device hooks do that): exactly what was there is put back."""
    if hidden is None or not layers:
        yield
        return
    out = (hidden,) if as_tuple else hidden

    def forward(*args: Any, **kwargs: Any) -> Any:
        return out

    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for layer in layers:
            layer.forward = forward
        yield
    finally:
        for layer, fwd in zip(layers, saved):
            if fwd is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = fwd
