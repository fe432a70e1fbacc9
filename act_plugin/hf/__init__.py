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

Other calibration rules (``{"rule": "first_token", "scale": 1.5, ...}``, ``{"rule": "spans",
...}``, README "Calibration rules") run the same way, with the dense formula of
:mod:`act_plugin.rules` in their heads; a ``spans`` profile needs the emphasised tokens of each
batch row first (:meth:`ACTHandle.set_emphasis`, :func:`act_plugin.span_marks.emphasis_from_spans`).

Modules by job: :mod:`~act_plugin.hf.registration` (the ``act_<base>`` implementations and
their dispatch), :mod:`~act_plugin.hf.enable` (:func:`enable_act`, :func:`act_enabled`),
:mod:`~act_plugin.hf.handle` (:class:`ACTHandle`: hooks, per-layer ACT attention, capture
records; :func:`disable_act`), :mod:`~act_plugin.hf.positions` (token positions of a forward
call, visibility from transformers' mask).

Limitations: base implementations other than ``sdpa``/``eager`` (flash, flex, paged) are
refused; attention extras the core does not model (``softcap``, attention sinks
``s_aux``) are refused in calibrated layers; dropout is not applied to calibrated heads
(this is an inference path).
"""

from act_plugin.hf.enable import act_enabled, enable_act
from act_plugin.hf.handle import ACTHandle, disable_act, get_act_handle
from act_plugin.hf.registration import SUPPORTED_BASES, act_impl_name, register_act_implementations

# Importing the package makes "act_sdpa"/"act_eager" known to transformers, so a model can also
# be loaded or switched to them by name.
register_act_implementations()

__all__ = [
    "SUPPORTED_BASES",
    "ACTHandle",
    "enable_act",
    "disable_act",
    "act_enabled",
    "get_act_handle",
    "act_impl_name",
]
