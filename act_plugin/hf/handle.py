"""An active calibration on one model (:class:`ACTHandle`): its hooks, the ACT attention of
each calibrated layer, the captured records, and its removal (:func:`disable_act`).

The attention of a calibrated layer always runs the base implementation (``sdpa``, or the
model's own ``eager_attention_forward``) on all heads, unchanged, then overwrites the
configured heads with :func:`act_plugin.calibration.calibrate_heads` (an ``act`` profile) or
:func:`act_plugin.calibration.calibrate_heads_rule` (the other rules, dense). Uncalibrated
layers and heads are therefore bitwise identical to the untouched model, and with no heads
(or a rule setting that changes nothing: ``beta``/``scale``/``alpha`` of 1) so is the whole
model.

A ``spans`` profile needs the emphasised tokens of each batch row before the forward call:
:meth:`ACTHandle.set_emphasis` (a ``[B, P]`` bool mask by token position, or per-row lists),
e.g. from character spans with :func:`act_plugin.span_marks.emphasis_from_spans`.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any, Protocol, cast

import torch
from torch import nn

from act_plugin.calibration import (
    attention_scale,
    attention_window,
    calibrate_heads,
    calibrate_heads_rule,
    profile_rule,
    refuse_hf_layer,
    replace_heads,
)
from act_plugin.config import ACTConfig
from act_plugin.core import ACTResult
from act_plugin.hf.positions import CallPositions, mask_visibility
from act_plugin.hf.registration import CALIBRATED_MODULES
from act_plugin.span_marks import emphasis_by_position, emphasised_keys


class HFModel(Protocol):
    """What this package uses of a transformers ``PreTrainedModel`` (``enable_act`` checks both with hasattr)."""

    config: Any

    def set_attn_implementation(self, attn_implementation: str | dict) -> Any: ...


# model -> its active handle
CALIBRATED_MODELS: "weakref.WeakKeyDictionary[nn.Module, ACTHandle]" = weakref.WeakKeyDictionary()


def _forward_params(module: nn.Module) -> list[str]:
    try:
        return [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return []


class ACTHandle:
    """An active ACT calibration on one model (returned by :func:`~act_plugin.hf.enable_act`).

    Attributes:
        config: the :class:`ACTConfig` in force.
        heads: resolved ``{layer: (global query heads...)}``.
        base: the implementation calibrated heads are layered on (``"sdpa"``/``"eager"``).
        capture: when True, every calibrated layer of every forward call appends a dict to
            :attr:`records` (off by default: no overhead).
        capture_probs: also record the calibrated probabilities ``[B, Hsel, Lq, Lk]``
            (forces the dense computation).
        records: captured dicts, each with ``call`` (forward-call counter), ``layer``,
            ``heads`` (list of global heads), ``sinks`` ``[B, Hsel, Lk]`` bool (the rule's key
            set: ACT's sinks, the first token, the emphasised tokens; also as ``key_set``), ``q_pos``
            ``[B, Lq]``, ``k_pos`` ``[B, Lk]``, ``window``, ``out`` ``[B, Hsel, Lq, D]`` the
            calibrated per-head output before ``o_proj`` (float32), ``base_out`` the same
            heads as the base implementation computed them, and ``probs`` when requested.
    """

    def __init__(self, model: nn.Module, config: ACTConfig, heads: dict[int, tuple[int, ...]], base: str,
                 previous: str | dict, num_heads: int, capture: bool = False, capture_probs: bool = False):
        self._model_ref = weakref.ref(model)
        self.config = config
        self.heads = heads
        self.base = base
        self.previous = previous
        self.num_heads = num_heads
        self.capture = capture
        self.capture_probs = capture_probs
        self.records: list[dict[str, Any]] = []
        self.active = True
        self._hooks: list[Any] = []
        self._modules: list[weakref.ref] = []  # weak: CALIBRATED_MODULES' values must not keep its keys alive
        self._head_tensors: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._call = CallPositions()
        self._emphasis: torch.Tensor | None = None  # spans rule: [B, P] bool by token position

    # ------------------------------------------------------------------ public
    @property
    def model(self) -> nn.Module | None:
        return self._model_ref()

    @property
    def calls(self) -> int:
        """Forward calls of the model since the handle was enabled."""
        return self._call.calls

    def disable(self) -> None:
        """Same as :func:`disable_act` on this handle's model."""
        model = self.model
        if model is not None and CALIBRATED_MODELS.get(model) is self:
            disable_act(model)
        else:
            self._teardown()

    def clear(self) -> None:
        self.records.clear()

    def set_emphasis(self, emphasised: Any) -> None:
        """The emphasised tokens of each batch row, for a ``spans`` profile: a bool ``[B, P]``
        tensor by token position (position 0 = the row's first real token, whatever the
        padding), or one list of bools per row over its real tokens. It holds for every
        following forward call (prefill and decode) until changed; tokens past ``P`` (the
        generated ones) are never emphasised. None clears it."""
        if emphasised is None or isinstance(emphasised, torch.Tensor):
            if emphasised is not None and emphasised.dim() != 2:
                raise ValueError(f"set_emphasis: expected a [batch, positions] mask, got shape "
                                 f"{tuple(emphasised.shape)}")
            self._emphasis = None if emphasised is None else emphasised.to(torch.bool)
        else:
            self._emphasis = emphasis_by_position(emphasised)

    def __enter__(self) -> "ACTHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.disable()

    def __repr__(self) -> str:
        n = sum(len(h) for h in self.heads.values())
        settings = ", ".join(f"{k}={v}" for k, v in self.config.settings.items())
        return (f"ACTHandle(base={self.base!r}, rule={self.config.rule}, {settings}, "
                f"{n} heads in {len(self.heads)} layers, active={self.active})")

    # ------------------------------------------------------------------ hooks
    def _install(self, model: nn.Module, attn_modules: dict[nn.Module, int]) -> None:
        from transformers import PreTrainedModel

        for mod, layer in attn_modules.items():
            CALIBRATED_MODULES[mod] = (self, layer)
            self._modules.append(weakref.ref(mod))
        for sub in model.modules():
            if sub is model or isinstance(sub, PreTrainedModel):
                params = _forward_params(sub)
                self._hooks.append(sub.register_forward_pre_hook(self._make_pre_hook(params), with_kwargs=True))
                self._hooks.append(sub.register_forward_hook(self._post_hook, always_call=True))

    def _teardown(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for ref in self._modules:
            mod = ref()
            if mod is not None and CALIBRATED_MODULES.get(mod, (None,))[0] is self:
                del CALIBRATED_MODULES[mod]
        self._modules.clear()
        self._head_tensors.clear()
        self._call.forget()
        self.active = False

    def _make_pre_hook(self, params: list[str]):
        def pre_hook(module, args, kwargs):
            got = dict(zip(params, args))
            got.update(kwargs)
            self._call.enter(got)
            return None

        return pre_hook

    def _post_hook(self, module, args, output):
        self._call.leave()
        return None

    # ------------------------------------------------------------------ attention
    def _head_index(self, layer: int, device: torch.device) -> torch.Tensor:
        key = (layer, device)
        t = self._head_tensors.get(key)
        if t is None:
            t = torch.tensor(self.heads[layer], dtype=torch.long, device=device)
            self._head_tensors[key] = t
        return t

    def layer_attention(self, layer: int, base_fn: Callable, module: nn.Module, query: Any, key: Any, value: Any,
                        attention_mask: Any, args: tuple, kwargs: dict) -> Any:
        """The attention of calibrated module ``module`` (layer ``layer``): the base
        implementation's output with the configured heads replaced by their ACT output."""
        out, weights = base_fn(module, query, key, value, attention_mask, *args, **kwargs)
        if layer not in self.heads:
            return out, weights
        identity = self.config.is_identity
        want_probs = self.capture and self.capture_probs
        if identity and not self.capture:
            return out, weights  # identity: keep the base output bitwise
        refuse_hf_layer(layer, module, kwargs, "HF path")
        B, H, Lq, D = query.shape
        Lk = key.shape[2]
        if H != self.num_heads:
            raise RuntimeError(f"ACT: layer {layer} has {H} query heads, the model config says {self.num_heads}")
        device = query.device
        heads = self._head_index(layer, device)
        q_pos, k_pos = self._call.positions(B, Lq, Lk, device)
        window = attention_window(module, kwargs)
        base_sel = out[:, :, heads].transpose(1, 2).float() if self.capture else None
        scale, attn_mask = attention_scale(module, kwargs, D), mask_visibility(attention_mask, B, Lq, Lk)
        if self.config.rule == "act":
            res = calibrate_heads(
                query, key, value, q_pos, k_pos, heads, scale=scale, beta=self.config.beta,
                threshold=self.config.threshold, window=window, attn_mask=attn_mask,
                dense=want_probs or weights is not None,
            )
        else:
            res = self._rule_attention(layer, query, key, value, q_pos, k_pos, heads, scale, window, attn_mask)
        if not identity:
            out = replace_heads(out, heads, res.out)  # out is [B, Lq, H, D]
            if weights is not None and res.probs is not None and weights.dim() == 4 and weights.shape[1] == H:
                weights = weights.clone()
                weights[:, heads] = res.probs.to(weights.dtype)
        if self.capture:
            self.records.append(self._record(layer, res, q_pos, k_pos, window, base_sel, want_probs))
        return out, weights

    def _rule_attention(self, layer: int, query: Any, key: Any, value: Any, q_pos: torch.Tensor,
                        k_pos: torch.Tensor, heads: torch.Tensor, scale: float, window: int | None,
                        attn_mask: torch.Tensor | None) -> ACTResult:
        """A non-``act`` profile's heads through :mod:`act_plugin.rules` (dense reference)."""
        emph = None
        if self.config.rule == "spans":
            if self._emphasis is None:
                raise RuntimeError("ACT: a 'spans' profile needs the emphasised tokens: call "
                                   "handle.set_emphasis(...) before the forward call")
            if self._emphasis.shape[0] != q_pos.shape[0]:
                raise RuntimeError(f"ACT: set_emphasis was given {self._emphasis.shape[0]} rows, this forward "
                                   f"call has {q_pos.shape[0]}")
            emph = emphasised_keys(self._emphasis, k_pos)
        rule = profile_rule(self.config, layer, self.heads[layer], emph, query.device)
        r = calibrate_heads_rule(query, key, value, q_pos, k_pos, heads, rule, scale=scale, window=window,
                                 attn_mask=attn_mask)
        return ACTResult(out=r.out, sinks=r.key_set, probs=r.probs)

    def _record(self, layer: int, res: ACTResult, q_pos: torch.Tensor, k_pos: torch.Tensor, window: Any,
                base_sel: torch.Tensor | None, want_probs: bool) -> dict[str, Any]:
        """One captured record (see the class docstring)."""
        rec = {
            "call": self.calls,
            "layer": layer,
            "heads": list(self.heads[layer]),
            "sinks": res.sinks.detach(),
            "key_set": res.sinks.detach(),
            "q_pos": q_pos.detach().clone(),
            "k_pos": k_pos.detach().clone(),
            "window": window,
            "out": res.out.detach() if not self.config.is_identity else base_sel,
            "base_out": base_sel,
        }
        if want_probs:
            assert res.probs is not None  # capturing probabilities computes them densely
            rec["probs"] = res.probs.detach()
        return rec


def get_act_handle(model: nn.Module) -> ACTHandle | None:
    """The active :class:`ACTHandle` of ``model`` or None."""
    return CALIBRATED_MODELS.get(model)


def disable_act(model: nn.Module) -> bool:
    """Undo :func:`~act_plugin.hf.enable_act`: restore the previous implementation, remove the hooks.

    Returns False when the model was not calibrated.
    """
    handle = CALIBRATED_MODELS.pop(model, None)
    if handle is None:
        return False
    try:
        # only models enable_act accepted (it checked for set_attn_implementation) are in CALIBRATED_MODELS
        cast(HFModel, model).set_attn_implementation(handle.previous)
    finally:
        handle._teardown()
    return True
