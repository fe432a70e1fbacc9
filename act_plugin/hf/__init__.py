"""ACT on Hugging Face transformers models: the reference path.

Any transformers model whose attention layers dispatch through transformers' attention
interface (``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)``,
i.e. every modern decoder: Llama, Mistral, Qwen2, SmolLM2, ...) can be calibrated without
touching its classes::

    from transformers import AutoModelForCausalLM
    from act_plugin import ACTConfig
    from act_plugin.hf import enable_act, disable_act, act_enabled

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = ACTConfig(beta=0.4, threshold=0.1, heads={2: [0, 3], "5-7": "all"})

    tok.padding_side = "left"                # batched generation pads on the left
    handle = enable_act(model, cfg)          # model now computes ACT in those heads
    out = model.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=8)
    disable_act(model)                       # back to the previous implementation

    with act_enabled(model, cfg, capture=True) as h:   # or: with enable_act(...) as h
        model(**batch)
        rec = h.records[0]   # {"call", "layer", "heads", "sinks", "q_pos", "k_pos", "out", "base_out", ...}

How it works
------------
Importing this module registers the attention implementations ``"act_sdpa"`` and
``"act_eager"`` in transformers' ``AttentionInterface`` *and* ``AttentionMaskInterface``
(the mask registry entry is the base implementation's own mask builder, so every layer
receives exactly the mask the base implementation would get); ``enable_act`` calls
``model.set_attn_implementation("act_<base>")`` with ``<base>`` the model's current one.
``disable_act`` restores the previous implementation. One name per base is needed because
transformers builds the attention mask from the implementation name: a bare ``"act"`` would
get no mask at all.

The act attention function always runs the base implementation (``sdpa``, or the model's
own ``eager_attention_forward``) on all heads, unchanged; in a calibrated layer it then
overwrites the configured heads with :func:`act_plugin.core.act_attention_blocked` (or the
dense reference when probabilities are needed). Uncalibrated layers and heads are therefore
bitwise identical to the untouched model, and with no heads (or ``beta == 1``) so is the
whole model.

* Heads are global query-head indices; the function receives K/V before ``repeat_kv``
  (``num_key_value_heads`` heads), and query head ``h`` reads KV head ``h // (H // Hkv)``.
* Positions: a forward pre-hook on the model (and its inner ``PreTrainedModel``\\s)
  records the 2D ``attention_mask`` of each call (``generate`` passes it covering past and
  new tokens). A token's position is ``cumsum(mask) - 1`` over the sequence's real tokens
  (``-1`` for padding), so with left padding position 0 is the first *real* token, padding
  is never a key, never a sink, and padding rows come out as zeros (no NaN). Without a 2D
  mask (``generate`` with a static cache hands the model a ready 4D mask) the call's
  ``position_ids`` locate the first real token (left padding); without either, positions
  are ``arange(past + new)`` with ``past`` read from the cache. Queries are the last ``Lq``
  token indices, keys the last ``Lk`` (sliding-window caches hand over only the window's
  tail); when a static cache hands over more key slots than tokens seen, the unused
  trailing slots are padding. An attention module called outside a model forward gets
  ``arange`` positions.
* Visibility for the calibrated heads = causal/window/padding from those positions AND the
  4D mask transformers passed (bool, or additive float where ``<= min/2`` means masked;
  ``None`` means plain causal). The layer's ``sliding_window`` kwarg (or module attribute)
  is passed to the core as ``window``.
* Statistics are per sequence and per forward call over the rows of that call (spec
  section 1): a prefill reproduces the paper, each decode step is the one-row case.
* Computation is float32 inside; the result is cast back to the query dtype.

Limitations: base implementations other than ``sdpa``/``eager`` (flash, flex, paged) are
refused; attention extras the core does not model (``softcap``, attention sinks
``s_aux``) are refused in calibrated layers; dropout is not applied to calibrated heads
(this is an inference path).
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, cast

import torch
from torch import nn

from act_plugin.calibration import attention_scale, attention_window, calibrate_heads, refuse_hf_layer, replace_heads
from act_plugin.config import ACTConfig, ACTConfigError, model_shape

__all__ = [
    "SUPPORTED_BASES",
    "ACTHandle",
    "enable_act",
    "disable_act",
    "act_enabled",
    "get_act_handle",
    "act_impl_name",
]

SUPPORTED_BASES = ("sdpa", "eager")
_PREFIX = "act_"


class _HFModel(Protocol):
    """What this module uses of a transformers ``PreTrainedModel`` (``enable_act`` checks both with hasattr)."""

    config: Any

    def set_attn_implementation(self, attn_implementation: str | dict) -> Any: ...


def act_impl_name(base: str) -> str:
    """The attention implementation name registered for ACT on top of ``base``."""
    return _PREFIX + base


# attention module -> (handle, layer index); model -> handle
_MODULES: "weakref.WeakKeyDictionary[nn.Module, tuple[ACTHandle, int]]" = weakref.WeakKeyDictionary()
_MODELS: "weakref.WeakKeyDictionary[nn.Module, ACTHandle]" = weakref.WeakKeyDictionary()
_EAGER_CACHE: dict[type, Callable] = {}


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
        entry = _MODULES.get(module)
        if entry is None:
            return base_fn(module, query, key, value, attention_mask, *args, **kwargs)
        handle, layer = entry
        return handle._attention(layer, base_fn, module, query, key, value, attention_mask, args, kwargs)

    act_attention_forward.__name__ = f"act_{base}_attention_forward"
    act_attention_forward.__qualname__ = act_attention_forward.__name__
    return act_attention_forward


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for base in SUPPORTED_BASES:
        name = act_impl_name(base)
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make_attention(base))
        if name not in AttentionMaskInterface._global_mapping:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


_register()


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
    """An active ACT calibration on one model (returned by :func:`enable_act`).

    Attributes:
        config: the :class:`ACTConfig` in force.
        heads: resolved ``{layer: (global query heads...)}``.
        base: the implementation calibrated heads are layered on (``"sdpa"``/``"eager"``).
        capture: when True, every calibrated layer of every forward call appends a dict to
            :attr:`records` (off by default: no overhead).
        capture_probs: also record the calibrated probabilities ``[B, Hsel, Lq, Lk]``
            (forces the dense computation).
        records: captured dicts, each with ``call`` (forward-call counter), ``layer``,
            ``heads`` (list of global heads), ``sinks`` ``[B, Hsel, Lk]`` bool, ``q_pos``
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
        self.calls = 0
        self.active = True
        self._hooks: list[Any] = []
        self._modules: list[weakref.ref] = []  # weak: _MODULES' values must not keep its keys alive
        self._head_tensors: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._depth = 0
        self._mask2d: torch.Tensor | None = None
        self._past_len: int | None = None
        self._new_len: int | None = None
        self._pos_ids: torch.Tensor | None = None
        self._pos_cache: torch.Tensor | None = None

    # ------------------------------------------------------------------ public
    @property
    def model(self) -> nn.Module | None:
        return self._model_ref()

    def disable(self) -> None:
        """Same as :func:`disable_act` on this handle's model."""
        model = self.model
        if model is not None and _MODELS.get(model) is self:
            disable_act(model)
        else:
            self._teardown()

    def clear(self) -> None:
        self.records.clear()

    def __enter__(self) -> "ACTHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.disable()

    def __repr__(self) -> str:
        n = sum(len(h) for h in self.heads.values())
        return (f"ACTHandle(base={self.base!r}, beta={self.config.beta}, threshold={self.config.threshold}, "
                f"{n} heads in {len(self.heads)} layers, active={self.active})")

    # ------------------------------------------------------------------ hooks
    def _install(self, model: nn.Module, attn_modules: dict[nn.Module, int]) -> None:
        from transformers import PreTrainedModel

        for mod, layer in attn_modules.items():
            _MODULES[mod] = (self, layer)
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
            if mod is not None and _MODULES.get(mod, (None,))[0] is self:
                del _MODULES[mod]
        self._modules.clear()
        self._head_tensors.clear()
        self._mask2d = self._pos_cache = None
        self.active = False

    def _make_pre_hook(self, params: list[str]):
        def pre_hook(module, args, kwargs):
            got = dict(zip(params, args))
            got.update(kwargs)
            if self._depth == 0:
                self.calls += 1
                self._mask2d = None
                self._past_len = None
                self._new_len = None
                self._pos_ids = None
                self._pos_cache = None
            self._depth += 1
            mask = got.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                self._mask2d = mask
                self._pos_cache = None
            pid = got.get("position_ids")
            if isinstance(pid, torch.Tensor) and pid.dim() == 2:
                self._pos_ids = pid
            past = got.get("past_key_values")
            if past is not None and hasattr(past, "get_seq_length"):
                try:
                    self._past_len = int(past.get_seq_length())
                except Exception:  # pragma: no cover - exotic caches
                    pass
            for name in ("input_ids", "inputs_embeds"):
                x = got.get(name)
                if isinstance(x, torch.Tensor) and x.dim() >= 2:
                    self._new_len = int(x.shape[1])
                    break
            return None

        return pre_hook

    def _post_hook(self, module, args, output):
        self._depth = max(0, self._depth - 1)
        return None

    # ------------------------------------------------------------------ positions
    def _positions(self, B: int, Lq: int, Lk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``q_pos [B, Lq]``, ``k_pos [B, Lk]``: position in the sequence's real tokens, -1 = padding."""
        pos = self._pos_cache if self._depth > 0 else None
        if self._depth > 0 and (pos is None or pos.device != device):
            pos = self._call_positions(device)
            self._pos_cache = pos
        if pos is None or pos.shape[1] < Lq:
            pos = torch.arange(max(Lk, Lq), device=device).unsqueeze(0)
        if pos.shape[0] != B:
            if pos.shape[0] != 1:
                raise RuntimeError(
                    f"ACT: the 2D attention_mask has batch {pos.shape[0]} but the attention layer sees batch {B}"
                )
            pos = pos.expand(B, -1)
        T = pos.shape[1]
        q_pos = pos[:, T - Lq:]
        if Lk <= T:
            k_pos = pos[:, T - Lk:]
        else:  # static cache: key slots beyond the tokens seen so far are empty
            k_pos = torch.cat([pos, torch.full((B, Lk - T), -1, dtype=pos.dtype, device=device)], dim=1)
        return q_pos, k_pos

    def _call_positions(self, device: torch.device) -> torch.Tensor | None:
        """``[B or 1, T]`` position of each token index of this call's sequences (past + new)."""
        if self._mask2d is not None:
            m = self._mask2d.to(device=device) != 0
            return torch.where(m, m.long().cumsum(-1) - 1, torch.full_like(m, -1, dtype=torch.long))
        if self._new_len is None:
            return None
        total = (self._past_len or 0) + self._new_len
        idx = torch.arange(total, device=device).unsqueeze(0)
        pid = self._pos_ids
        if pid is not None and pid.shape[1] == self._new_len:
            # No 2D mask (e.g. generate() with a static cache hands the model a ready 4D mask):
            # the last token of the call is real and tokens are contiguous after the left
            # padding, so the first real token sits at index (total - 1) - position_ids[:, -1].
            first = (total - 1) - pid[:, -1:].to(device=device, dtype=torch.long)
            pos = idx - first
            return pos.masked_fill(pos < 0, -1)
        return idx

    # ------------------------------------------------------------------ attention
    def _head_index(self, layer: int, device: torch.device) -> torch.Tensor:
        key = (layer, device)
        t = self._head_tensors.get(key)
        if t is None:
            t = torch.tensor(self.heads[layer], dtype=torch.long, device=device)
            self._head_tensors[key] = t
        return t

    def _attention(self, layer, base_fn, module, query, key, value, attention_mask, args, kwargs):
        out, weights = base_fn(module, query, key, value, attention_mask, *args, **kwargs)
        if layer not in self.heads:
            return out, weights
        beta = self.config.beta
        want_probs = self.capture and self.capture_probs
        if beta == 1.0 and not self.capture:
            return out, weights  # identity: keep the base output bitwise
        refuse_hf_layer(layer, module, kwargs, "HF path")
        B, H, Lq, D = query.shape
        Lk = key.shape[2]
        if H != self.num_heads:
            raise RuntimeError(f"ACT: layer {layer} has {H} query heads, the model config says {self.num_heads}")
        device = query.device
        heads = self._head_index(layer, device)
        q_pos, k_pos = self._positions(B, Lq, Lk, device)
        window = attention_window(module, kwargs)
        base_sel = out[:, :, heads].transpose(1, 2).float() if self.capture else None
        res = calibrate_heads(
            query, key, value, q_pos, k_pos, heads, scale=attention_scale(module, kwargs, D), beta=beta,
            threshold=self.config.threshold, window=window, attn_mask=_mask_visibility(attention_mask, B, Lq, Lk),
            dense=want_probs or weights is not None,
        )
        if beta != 1.0:
            out = replace_heads(out, heads, res.out)  # out is [B, Lq, H, D]
            if weights is not None and res.probs is not None and weights.dim() == 4 and weights.shape[1] == H:
                weights = weights.clone()
                weights[:, heads] = res.probs.to(weights.dtype)
        if self.capture:
            rec = {
                "call": self.calls,
                "layer": layer,
                "heads": list(self.heads[layer]),
                "sinks": res.sinks.detach(),
                "q_pos": q_pos.detach().clone(),
                "k_pos": k_pos.detach().clone(),
                "window": window,
                "out": res.out.detach() if beta != 1.0 else base_sel,
                "base_out": base_sel,
            }
            if want_probs:
                rec["probs"] = res.probs.detach()
            self.records.append(rec)
        return out, weights


def _mask_visibility(mask: Any, B: int, Lq: int, Lk: int) -> torch.Tensor | None:
    """Boolean ``[B, Lq, Lk]`` (True = may attend) from the 4D mask transformers passed."""
    if not isinstance(mask, torch.Tensor):
        return None  # None: plain causal (sdpa's is_causal skip); positions encode it
    if mask.dim() == 4:
        m = mask[:, 0]
    elif mask.dim() == 3:
        m = mask
    elif mask.dim() == 2 and mask.shape == (Lq, Lk):
        m = mask.unsqueeze(0)
    else:
        raise RuntimeError(f"ACT: unexpected attention mask of shape {tuple(mask.shape)}")
    if m.shape[-1] > Lk:
        m = m[..., :Lk]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0
    return m.expand(B, Lq, Lk)


def _attention_modules(model: nn.Module, num_layers: int) -> dict[nn.Module, int]:
    """Attention modules of the text decoder, by ``layer_idx``."""
    model_cfg = cast(_HFModel, model).config
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


def get_act_handle(model: nn.Module) -> ACTHandle | None:
    """The active :class:`ACTHandle` of ``model`` or None."""
    return _MODELS.get(model)


def enable_act(model: nn.Module, config: Any, *, capture: bool = False, capture_probs: bool = False) -> ACTHandle:
    """Calibrate ``model``'s attention with ``config`` (anything :meth:`ACTConfig.from_any` reads).

    Validates the head set against the model (:class:`ACTConfigError` naming the bad
    layer/head and the model's shape), switches the model to ``"act_<base>"`` where
    ``<base>`` is its current implementation (``sdpa`` or ``eager``), and returns the
    handle. Enabling an already calibrated model replaces its configuration.
    """
    cfg = ACTConfig.from_any(config)
    old = _MODELS.get(model)
    if old is not None:
        disable_act(model)
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(f"enable_act needs a transformers PreTrainedModel, got {type(model).__name__}")
    hf_model = cast(_HFModel, model)
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
    _MODELS[model] = handle
    return handle


def _current_impl(model: _HFModel) -> str | dict:
    cfg = model.config
    subs = {}
    for key in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, key, None)
        if sub is not None and getattr(sub, "_attn_implementation", None) is not None:
            subs[key] = sub._attn_implementation
    if not subs:
        return cfg._attn_implementation
    return {"": cfg._attn_implementation, **subs}


def disable_act(model: nn.Module) -> bool:
    """Undo :func:`enable_act`: restore the previous implementation, remove the hooks.

    Returns False when the model was not calibrated.
    """
    handle = _MODELS.pop(model, None)
    if handle is None:
        return False
    try:
        # only models enable_act accepted (it checked for set_attn_implementation) are in _MODELS
        cast(_HFModel, model).set_attn_implementation(handle.previous)
    finally:
        handle._teardown()
    return True


@contextmanager
def act_enabled(model: nn.Module, config: Any, **kwargs: Any) -> Iterator[ACTHandle]:
    """``with act_enabled(model, cfg) as handle: ...`` -- calibrated inside the block only."""
    handle = enable_act(model, config, **kwargs)
    try:
        yield handle
    finally:
        handle.disable()
