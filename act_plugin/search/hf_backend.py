"""Head search on the transformers path: first-order ranking of every head, exact scores.

Every pass runs the model's own ``forward`` (its embeddings and their scaling, its
positional encodings per layer type, its masks, decoder layers, final norm, LM head and any
logit soft-capping), so any decoder transformers loads is handled the way it computes
itself. Prompts go in right-padded batches sorted by length, with no attention mask: with
right padding and causal attention a real token never sees a padding token, so every real
row is exactly what the unpadded prompt computes. The ACT maths gets positions with ``-1``
on padding so padding rows never count towards the sink statistics. Two hooks shape a pass:

* a forward hook on the decoder stack (the module that owns the decoder layers) keeps only
  each prompt's last token of its output, so the model's own head computes one row of
  logits per prompt instead of a vocabulary-wide row per token;
* forward pre-hooks on chosen decoder layers keep their inputs (``keep``).

A start-up self-check guards the assumptions: the batched pass reproduces the model's own
forward prompt by prompt, every decoder layer's attention dispatches through the registered
implementation below, and a pass restarted from a cached layer input (below) reproduces
the full pass. A model failing one of the first two is refused with an error naming its
type; one failing the restart check is searched with full passes (correct, slower).

Attention goes through an implementation registered in transformers' ``AttentionInterface``
as ``"act_search_sdpa"``: sdpa on every head, then, depending on the mode of the current
pass (a context variable set around the model call, so it reaches every layer's attention
whatever keyword arguments a model passes on),

* ``exact``: the heads of the configuration under test are replaced by
  :func:`act_plugin.calibration.calibrate_heads` (the entry point every other path uses);
* ``gate`` (the ranking pass): every candidate head ``h`` of the layer gets a gate
  ``alpha_h`` (a leaf tensor, 0 in the forward): ``out_h = o_h + alpha_h * (o'_h - o_h)``
  with ``o'_h`` that head's ACT-calibrated output. At ``alpha = 0`` the forward is the
  baseline, and ``d score / d alpha_h`` -- from ONE backward pass per batch, through every
  later layer -- is the first-order estimate of calibrating head ``h`` alone. The difference
  ``o'_h - o_h`` is held constant (detached): its own dependence on earlier gates is
  multiplied by ``alpha_h = 0``, so the derivative at 0 is exact. Weights are frozen
  (``requires_grad=False``): the backward computes activation gradients only.

Either mode may also hold ``first_token`` groups (the ZeroTuning rule, exact or gated the
same way; :mod:`act_plugin.search.hf_first_token`), applied after the layer's ACT heads.

Exact scores reuse cached hidden states: the input of layer ``l`` for every batch is kept
from one baseline pass, so calibrating a head of layer ``l`` recomputes layers ``l..L-1``
only. The restarted pass is still the model's own forward: layers ``0..l-1`` are
short-circuited for that call (each returns the cached input of layer ``l``), so layer ``l``
onwards receive exactly the arguments the model builds for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from act_plugin.calibration import (
    attention_scale,
    attention_window,
    calibrate_heads,
    gate_heads,
    refuse_hf_layer,
    replace_heads,
)
from act_plugin.heads import group_by_layer
from act_plugin.search.hf_batches import Batch, make_batches
from act_plugin.search.hf_decoder import (
    HFSearchUnsupported,
    KeepInput,
    LastTokens,
    describe_model,
    find_decoder,
    skip_layers,
)
from act_plugin.search.hf_first_token import FirstTokenGroup, apply_first_token, exact_groups
from act_plugin.search.hf_threads import ThreadGovernor
from act_plugin.search.scoring import CalibrationSet, margins_torch

__all__ = ["SEARCH_IMPL", "Batch", "HFSearchBackend", "HFSearchUnsupported", "ThreadGovernor", "make_batches"]

logger = logging.getLogger("act_plugin.search")

SEARCH_IMPL = "act_search_sdpa"
Head = tuple[int, int]


# ----------------------------------------------------------------------------- attention


@dataclass
class _Mode:
    """What the registered attention function does during one pass."""

    kind: str  # "exact" or "gate"
    pos: torch.Tensor  # [B, L] position of each token, -1 on padding
    beta: float
    threshold: float
    exact: dict[int, torch.Tensor] = field(default_factory=dict)
    gates: dict[int, torch.Tensor] = field(default_factory=dict)
    gate_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    first_token: dict[int, list[FirstTokenGroup]] = field(default_factory=dict)  # layer -> its groups
    seen: set[int] = field(default_factory=set)  # layers whose attention ran in this mode

    @property
    def valid(self) -> torch.Tensor:
        return self.pos >= 0


# The mode of the pass in progress. A context variable rather than a keyword argument of the
# model call: a model's forward need not hand unknown keyword arguments on to its attention.
_ACTIVE: ContextVar[_Mode | None] = ContextVar("act_search_mode", default=None)


def _search_attention(module, query, key, value, attention_mask, *args, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    out, weights = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    mode = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if mode is None or layer is None:
        return out, weights
    mode.seen.add(layer)
    heads = mode.exact.get(layer) if mode.kind == "exact" else mode.gate_heads.get(layer)
    first_token = mode.first_token.get(layer)
    if heads is None and first_token is None:
        return out, weights
    refuse_hf_layer(layer, module, kwargs, "head search")
    if heads is not None:
        with torch.no_grad():
            res = calibrate_heads(
                query.detach(), key.detach(), value.detach(), mode.pos, mode.pos, heads,
                scale=attention_scale(module, kwargs, query.shape[-1]), beta=mode.beta, threshold=mode.threshold,
                window=attention_window(module, kwargs),
            )
        if mode.kind == "exact":
            out = replace_heads(out, heads, res.out)
        else:
            out = gate_heads(out, heads, res.out, mode.gates[layer], mode.valid)
    if first_token is not None:
        out = apply_first_token(out, query, key, value, module, kwargs, mode.pos, first_token, mode.valid)
    return out, weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if SEARCH_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEARCH_IMPL, _search_attention)
    if SEARCH_IMPL not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(SEARCH_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


_register()


# ----------------------------------------------------------------------------- backend


class HFSearchBackend:
    """Exact scores and first-order estimates on a transformers model (see the module docs)."""

    name = "hf"

    def __init__(self, model_path: str, calib: CalibrationSet, *, beta: float, threshold: float,
                 batch_tokens: int = 2048, threads: int | str | None = None, cache_hidden: bool = True,
                 model: Any = None, self_check: bool = True):
        from transformers import AutoModelForCausalLM

        self.threads = ThreadGovernor(threads)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
        self.model = model.eval()
        self.model.set_attn_implementation(SEARCH_IMPL)
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.hidden_size = int(cfg.hidden_size)
        # the decoder stack (Any: run.py reads its embed_tokens) and its decoder layers
        self.inner: Any
        self.inner, self.layers = find_decoder(self.model, self.num_layers)
        self.calib = calib
        self.beta = float(beta)
        self.threshold = float(threshold)
        self.cache_hidden = cache_hidden
        self._layer_tuple_out = False  # transformers 5 decoder layers return a tensor; the self-check reads it
        pad = getattr(cfg, "pad_token_id", None)
        self.batches = make_batches(calib, batch_tokens, pad_id=int(pad) if isinstance(pad, int) else 0)
        self._cache: dict[int, dict[int, torch.Tensor]] = {}  # layer -> batch -> hidden input
        self._want_layers: set[int] = set()
        self.baseline_lp: np.ndarray | None = None
        self._grad_baseline: np.ndarray | None = None
        if self_check:
            self._self_check()

    # ------------------------------------------------------------------ one pass
    def _run(self, batch: Batch, start: int = 0, h: torch.Tensor | None = None,
             keep: Iterable[int] = (), mode: _Mode | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Answer log-probabilities ``[B, Cmax]`` (float32) with the attention in ``mode``
        (None: plain sdpa), restarted at layer ``start`` from its input ``h`` when given;
        optionally the inputs of the ``keep`` layers."""
        if h is None:
            start = 0
        kept: dict[int, torch.Tensor] = {}
        hooks = [self.inner.register_forward_hook(LastTokens(batch.last))]
        hooks += [self.layers[i].register_forward_pre_hook(KeepInput(kept, i), with_kwargs=True)
                  for i in set(keep) if start <= i < self.num_layers]
        token = _ACTIVE.set(mode)
        try:
            with skip_layers(list(self.layers[:start]), h, self._layer_tuple_out):
                logits = self.model(input_ids=batch.ids, use_cache=False).logits
        finally:
            _ACTIVE.reset(token)
            for hook in hooks:
                hook.remove()
        lp = torch.log_softmax(logits[:, -1].float(), dim=-1).gather(1, batch.choice_ids)
        return lp.masked_fill(~batch.valid, float("nan")), kept

    def _mode(self, kind: str, batch: Batch, **kw) -> _Mode:
        return _Mode(kind, batch.pos, self.beta, self.threshold, **kw)

    # ------------------------------------------------------------------ self-check
    def _self_check(self) -> None:
        """The batched pass must reproduce the model's own forward, reach every layer's
        attention, and (for cached restarts) give the same answer restarted mid-way."""
        b = self.batches[-1]  # longest prompts: padding shows up in the shorter ones
        probe = self._mode("exact", b)
        mid = self.num_layers // 2
        first = self.layers[0].register_forward_hook(self._note_layer_output)
        try:
            with torch.no_grad():
                lp, kept = self._run(b, keep=[mid] if mid > 0 else [], mode=probe)
        finally:
            first.remove()
        self._check_dispatch(probe)
        self._check_against_forward(b, lp)
        if self.cache_hidden and mid > 0:
            self._check_restart(b, lp, mid, kept[mid])

    def _note_layer_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._layer_tuple_out = isinstance(output, tuple)

    def _check_dispatch(self, probe: _Mode) -> None:
        missing = sorted(set(range(self.num_layers)) - probe.seen)
        if missing:
            raise HFSearchUnsupported(
                f"head search (HF path): the attention of layer(s) {missing} of {describe_model(self.model)} does not "
                f"run through transformers' attention interface ({SEARCH_IMPL!r} was not called), so "
                "heads there cannot be calibrated on this path; use method 'exact', which runs in vLLM")

    def _check_against_forward(self, b: Batch, lp: torch.Tensor) -> None:
        with torch.no_grad():
            for r in (0, len(b.samples) - 1):
                n = int(b.last[r]) + 1
                ref = torch.log_softmax(self.model(input_ids=b.ids[r:r + 1, :n]).logits[0, -1].float(), -1)
                ref = ref[b.choice_ids[r]][b.valid[r]]
                got = lp[r][b.valid[r]]
                if not torch.allclose(got, ref, atol=2e-3, rtol=0):
                    diff = float((got - ref).abs().max())
                    raise HFSearchUnsupported(
                        f"head search (HF path): the batched right-padded forward does not reproduce the forward of "
                        f"{describe_model(self.model)} prompt by prompt (max diff {diff:.2e}); "
                        "this architecture is not supported by the HF search path (use method 'exact')")

    def _check_restart(self, b: Batch, lp: torch.Tensor, layer: int, hidden: torch.Tensor) -> None:
        with torch.no_grad():
            again, _ = self._run(b, layer, hidden, mode=self._mode("exact", b))
        if not torch.allclose(again, lp, atol=1e-5, rtol=0, equal_nan=True):
            self.cache_hidden = False
            logger.warning(
                "head search (HF path): %s does not give the same answer when restarted at layer %d from its cached "
                "input (max diff %.2e); exact scores run the whole model instead (correct, slower)",
                describe_model(self.model), layer, float((again - lp).nan_to_num().abs().max()))

    # ------------------------------------------------------------------ cache
    def plan_cache(self, layers: Iterable[int]) -> None:
        """Layers whose inputs the next baseline pass keeps (exact scores start there)."""
        if self.cache_hidden:
            self._want_layers |= {int(x) for x in layers if 0 < int(x) < self.num_layers}

    def _have(self, layer: int) -> bool:
        return layer == 0 or (layer in self._cache and len(self._cache[layer]) == len(self.batches))

    # ------------------------------------------------------------------ exact scores
    def evaluate(self, heads: Iterable[Head], progress: Callable[[int], None] | None = None,
                 first_token: dict[Head, float] | None = None) -> np.ndarray:
        """Answer log-probabilities ``[N, Cmax]`` with ``heads`` calibrated by ACT and the heads
        of ``first_token`` ((layer, head) -> gamma) by first_token (none of either: baseline)."""
        heads = sorted({(int(a), int(b)) for a, b in heads})
        by_layer = group_by_layer(heads)
        exact = {layer: torch.tensor(hs, dtype=torch.long) for layer, hs in by_layer.items()}
        ft_groups = exact_groups(first_token)
        if not heads and not ft_groups:
            if self._grad_baseline is not None and not self._missing():
                lp, self._grad_baseline = self._grad_baseline, None
            else:
                lp = self._pass({}, 0, keep=self._missing(), progress=progress)
            self.baseline_lp = lp
            return lp
        start = min([*by_layer, *ft_groups])
        if self.cache_hidden and not self._have(start):
            # one baseline pass keeps the inputs of every planned layer (and of this one)
            self._want_layers.add(start)
            self.baseline_lp = self._pass({}, 0, keep=self._missing())
        if not self._have(start):
            start = 0
        return self._pass(exact, start, progress=progress, first_token=ft_groups)

    def _missing(self) -> list[int]:
        return sorted(x for x in self._want_layers if not self._have(x)) if self.cache_hidden else []

    def _pass(self, exact: dict[int, torch.Tensor], start: int, keep: Iterable[int] = (),
              progress: Callable[[int], None] | None = None,
              first_token: dict[int, list[FirstTokenGroup]] | None = None) -> np.ndarray:
        keep = list(keep)
        out = np.full((len(self.calib), self.calib.max_choices), np.nan)
        with torch.no_grad():
            for b in self.batches:
                self.threads.update()
                h0 = self._cache[start][b.index] if start > 0 else None
                mode = self._mode("exact", b, exact=exact, first_token=first_token or {})
                lp, kept = self._run(b, start, h0, keep=keep, mode=mode)
                for layer, t in kept.items():
                    self._cache.setdefault(layer, {})[b.index] = t
                out[list(b.samples)] = lp.numpy()
                if progress:
                    progress(len(b.samples))
        return out

    # ------------------------------------------------------------------ first order
    def gradients(self, candidates: Iterable[Head], done: dict[int, dict] | None = None,
                  on_batch: Callable[[int, dict], None] | None = None,
                  progress: Callable[[int], None] | None = None,
                  clip: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """First-order estimate of the calibration score (macro mean margin, clipped to
        ``[-clip, clip]`` when ``clip`` is given) change of calibrating each candidate
        alone: ``grad [L, H]`` (NaN for non-candidates), and the
        baseline answer log-probabilities of the (gated, alpha = 0) forward.

        ``done`` maps batch index -> a stored record ``{"grad": [[...]], "lp": [[...]]}`` (resume);
        ``on_batch(index, record)`` is called after each computed batch."""
        cand = sorted({(int(a), int(b)) for a, b in candidates})
        by_layer = group_by_layer(cand)
        heads_t = {layer: torch.tensor(hs, dtype=torch.long) for layer, hs in by_layer.items()}
        total = np.zeros((self.num_layers, self.num_heads))
        lp_all = np.full((len(self.calib), self.calib.max_choices), np.nan)
        done = done or {}
        for b in self.batches:
            rec = done.get(b.index)
            if rec is None:
                self.threads.update()
                gates = {layer: torch.zeros(len(hs), requires_grad=True) for layer, hs in heads_t.items()}
                mode = self._mode("gate", b, gates=gates, gate_heads=heads_t)
                with torch.enable_grad():
                    lp, kept = self._run(b, 0, keep=self._missing(), mode=mode)
                    margin = margins_torch(lp.double(), b.gold, b.valid)
                    if clip is not None:
                        margin = margin.clamp(-clip, clip)
                    objective = (margin * b.weights).sum()
                    objective.backward()
                g = np.zeros((self.num_layers, self.num_heads))
                for layer, hs in by_layer.items():
                    gr = gates[layer].grad
                    g[layer, hs] = gr.double().numpy() if gr is not None else 0.0
                for layer, t in kept.items():
                    self._cache.setdefault(layer, {})[b.index] = t
                rec = {"grad": g.tolist(), "lp": lp.detach().numpy().tolist()}
                if on_batch:
                    on_batch(b.index, rec)
            total += np.asarray(rec["grad"], dtype=np.float64)
            lp_all[list(b.samples)] = np.asarray(rec["lp"], dtype=np.float64)
            if progress:
                progress(len(b.samples))
        mask = np.full((self.num_layers, self.num_heads), np.nan)
        for layer, hs in by_layer.items():
            mask[layer, hs] = 1.0
        if not done and self.baseline_lp is None:
            # at alpha = 0 the gated forward IS the baseline forward (same kernels, same
            # values: checked in tests/test_search.py), so the next exact baseline is free
            self._grad_baseline = lp_all
        return total * mask, lp_all

    def gated_objective(self, alphas: dict[Head, float]) -> float:
        """The ranking objective (macro mean margin) with head ``(l, h)`` interpolated
        ``alpha`` of the way to its calibrated output (no gradient; for checks)."""
        by_layer = group_by_layer((layer, (int(h), float(a))) for (layer, h), a in sorted(alphas.items()))
        heads_t = {layer: torch.tensor([h for h, _ in v], dtype=torch.long) for layer, v in by_layer.items()}
        gates = {layer: torch.tensor([a for _, a in v], dtype=torch.float32) for layer, v in by_layer.items()}
        total = 0.0
        with torch.no_grad():
            for b in self.batches:
                lp, _ = self._run(b, 0, mode=self._mode("gate", b, gates=gates, gate_heads=heads_t))
                total += float((margins_torch(lp.double(), b.gold, b.valid) * b.weights).sum())
        return total

    def cost_fraction(self, heads: Iterable[Head]) -> float:
        """Share of a full pass an exact score of ``heads`` recomputes (cache permitting)."""
        layers = [int(a) for a, _ in heads]
        if not layers:
            return 1.0
        start = min(layers)
        return (self.num_layers - start) / self.num_layers if self._have(start) or start in self._want_layers else 1.0

    def close(self) -> None:
        self._cache.clear()
