"""Head search on the transformers path: first-order ranking of every head, exact scores.

The model runs layer by layer (embeddings, the decoder layers, final norm on the last prompt
token only, LM head), on right-padded batches of prompts sorted by length. With right
padding and plain causal attention a real token never sees a padding token, so no mask is
needed and every real row is exactly what the unpadded prompt computes; the ACT maths gets
positions with ``-1`` on padding so padding rows never count towards the sink statistics.
A self-check against the model's own ``forward`` guards architectures this loop does not
model (it is the Llama/Mistral/Qwen2 family loop).

Attention goes through an implementation registered in transformers' ``AttentionInterface``
as ``"act_search_sdpa"``: sdpa on every head, then, depending on the mode the layer loop passes
to each decoder layer as the keyword argument ``act_search_mode`` (transformers hands a
layer's extra keyword arguments to its attention function; no global state),

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

Exact scores reuse cached hidden states: the input of layer ``l`` for every batch is kept
from one baseline pass, so calibrating a head of layer ``l`` recomputes layers ``l..L-1``
only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from act_plugin.calibration import (
    attention_scale,
    attention_window,
    calibrate_heads,
    gate_heads,
    refuse_hf_layer,
    replace_heads,
)
from act_plugin.heads import group_by_layer
from act_plugin.search.scoring import CalibrationSet, margins_torch, sample_weights

__all__ = ["SEARCH_IMPL", "HFSearchBackend", "make_batches"]

logger = logging.getLogger("act_plugin.search")

SEARCH_IMPL = "act_search_sdpa"
Head = tuple[int, int]


# ----------------------------------------------------------------------------- attention


class _Mode:
    """What the registered attention function does during one forward call."""

    def __init__(self, kind: str, pos: torch.Tensor, beta: float, threshold: float,
                 exact: dict[int, torch.Tensor] | None = None, gates: dict[int, torch.Tensor] | None = None,
                 gate_heads: dict[int, torch.Tensor] | None = None):
        self.kind = kind
        self.pos = pos  # [B, L] position of each token, -1 on padding
        self.valid = (pos >= 0)
        self.beta = beta
        self.threshold = threshold
        self.exact = exact or {}
        self.gates = gates or {}
        self.gate_heads = gate_heads or {}


MODE_KWARG = "act_search_mode"


def _search_attention(module, query, key, value, attention_mask, *args, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mode: _Mode | None = kwargs.pop(MODE_KWARG, None)
    out, weights = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    if mode is None:
        return out, weights
    layer = module.layer_idx
    heads = mode.exact.get(layer) if mode.kind == "exact" else mode.gate_heads.get(layer)
    if heads is None:
        return out, weights
    refuse_hf_layer(layer, module, kwargs, "head search")
    with torch.no_grad():
        res = calibrate_heads(
            query.detach(), key.detach(), value.detach(), mode.pos, mode.pos, heads,
            scale=attention_scale(module, kwargs, query.shape[-1]), beta=mode.beta, threshold=mode.threshold,
            window=attention_window(module, kwargs),
        )
    if mode.kind == "exact":
        return replace_heads(out, heads, res.out), weights
    return gate_heads(out, heads, res.out, mode.gates[layer], mode.valid), weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if SEARCH_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEARCH_IMPL, _search_attention)
    if SEARCH_IMPL not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(SEARCH_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


_register()


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batch:
    index: int
    samples: tuple[int, ...]  # indices into the calibration set
    ids: torch.Tensor  # [B, L] right-padded
    pos: torch.Tensor  # [B, L], -1 on padding
    last: torch.Tensor  # [B] index of each prompt's last token
    choice_ids: torch.Tensor  # [B, Cmax]
    valid: torch.Tensor  # [B, Cmax]
    gold: torch.Tensor  # [B]
    weights: torch.Tensor  # [B] macro-average weight of each sample (float64)

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())


def make_batches(calib: CalibrationSet, batch_tokens: int, pad_id: int = 0) -> list[Batch]:
    """Prompts sorted by length (stable), packed while ``count x longest <= batch_tokens``."""
    order = sorted(range(len(calib)), key=lambda i: (len(calib.prompts[i]), i))
    groups: list[list[int]] = []
    for i in order:
        n = len(calib.prompts[i])
        if groups and (len(groups[-1]) + 1) * n <= batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    ids_all, valid_all = calib.choice_matrix()
    w_all = sample_weights(calib.tasks)
    batches = []
    for b, g in enumerate(groups):
        L = max(len(calib.prompts[i]) for i in g)
        ids = torch.full((len(g), L), pad_id, dtype=torch.long)
        pos = torch.full((len(g), L), -1, dtype=torch.long)
        for r, i in enumerate(g):
            p = calib.prompts[i]
            ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
            pos[r, : len(p)] = torch.arange(len(p))
        batches.append(Batch(
            index=b, samples=tuple(g), ids=ids, pos=pos,
            last=torch.tensor([len(calib.prompts[i]) - 1 for i in g], dtype=torch.long),
            choice_ids=torch.from_numpy(ids_all[g]), valid=torch.from_numpy(valid_all[g]),
            gold=torch.tensor([calib.gold[i] for i in g], dtype=torch.long),
            weights=torch.from_numpy(w_all[g])))
    return batches


# ----------------------------------------------------------------------------- threads


class ThreadGovernor:
    """Torch threads for a shared machine: ``"auto"`` uses every core nobody else is using.

    OpenMP threads that share a core with another busy process spin at barriers, so on a
    2-core machine with one foreign busy process two threads run 2-3x SLOWER than one
    (measured). ``auto`` measures the CPU time other processes used since the last check
    (``/proc/stat`` minus this process) and sets ``cores - round(others)`` threads (at
    least 1) before each batch. Thread counts change float summation order (log-probs
    differ by ~1e-5), so results are bitwise reproducible only for a fixed ``threads``.
    """

    def __init__(self, threads: int | str | None):
        import os

        self.fixed = int(threads) if isinstance(threads, int) or (isinstance(threads, str) and threads.isdigit()) \
            else None
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.used: dict[int, int] = {}
        self._last = self._sample()
        if self.fixed:
            torch.set_num_threads(self.fixed)
        elif threads is None:
            self.fixed = torch.get_num_threads()

    @staticmethod
    def _sample():
        import os

        try:
            with open("/proc/stat") as fh:
                f = [int(x) for x in fh.readline().split()[1:]]
            busy = sum(f) - f[3] - (f[4] if len(f) > 4 else 0)
            with open("/proc/self/stat") as fh:
                st = fh.read().rsplit(")", 1)[1].split()
            mine = int(st[11]) + int(st[12])
            return time.monotonic(), busy, mine, os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def update(self) -> int:
        if self.fixed:
            n = self.fixed
        else:
            now = self._sample()
            n = torch.get_num_threads()
            if now is not None and self._last is not None and now[0] - self._last[0] > 0.2:
                others = ((now[1] - self._last[1]) - (now[2] - self._last[2])) / now[3] / (now[0] - self._last[0])
                n = max(1, min(self.cores, self.cores - int(round(max(0.0, others)))))
                self._last = now
            elif self._last is None:
                self._last = now
            if n != torch.get_num_threads():
                torch.set_num_threads(n)
        self.used[n] = self.used.get(n, 0) + 1
        return n


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
        self.inner = self._inner(self.model)
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.calib = calib
        self.beta = float(beta)
        self.threshold = float(threshold)
        self.cache_hidden = cache_hidden
        pad = getattr(cfg, "pad_token_id", None)
        self.batches = make_batches(calib, batch_tokens, pad_id=int(pad) if isinstance(pad, int) else 0)
        self._cache: dict[int, dict[int, torch.Tensor]] = {}  # layer -> batch -> hidden input
        self._want_layers: set[int] = set()
        self.baseline_lp: np.ndarray | None = None
        self._grad_baseline: np.ndarray | None = None
        if self_check:
            self._self_check()

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _inner(model):
        inner = getattr(model, "model", None)
        for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if inner is None or not hasattr(inner, attr):
                raise NotImplementedError(
                    f"head search (HF path) runs Llama-family decoders layer by layer; {type(model).__name__} has no "
                    f"model.{attr} (use method 'exact', which runs in vLLM)")
        return inner

    def _run(self, batch: Batch, start: int = 0, h: torch.Tensor | None = None,
             keep: Iterable[int] = (), mode: _Mode | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Answer log-probabilities ``[B, Cmax]`` (float32) with the attention in ``mode``
        (None: plain sdpa); optionally the inputs of ``keep`` layers."""
        keep = set(keep)
        L = batch.ids.shape[1]
        pos_ids = torch.arange(L).unsqueeze(0)
        if start == 0 or h is None:
            start = 0
            h = self.inner.embed_tokens(batch.ids)
        pe = self.inner.rotary_emb(h, position_ids=pos_ids)
        kept = {}
        for i in range(start, self.num_layers):
            if i in keep:
                kept[i] = h.detach()
            h = self.inner.layers[i](h, attention_mask=None, position_ids=pos_ids, position_embeddings=pe,
                                     past_key_values=None, use_cache=False, **{MODE_KWARG: mode})
        last = h[torch.arange(h.shape[0]), batch.last]
        logits = self.model.get_output_embeddings()(self.inner.norm(last)).float()
        lp = torch.log_softmax(logits, dim=-1).gather(1, batch.choice_ids)
        return lp.masked_fill(~batch.valid, float("nan")), kept

    def _self_check(self) -> None:
        """The layer loop must reproduce the model's own forward (right padding included)."""
        b = self.batches[-1]  # longest prompts: padding shows up in the shorter ones
        with torch.no_grad():
            lp, _ = self._run(b)
            for r in (0, len(b.samples) - 1):
                n = int(b.last[r]) + 1
                ref = torch.log_softmax(self.model(input_ids=b.ids[r:r + 1, :n]).logits[0, -1].float(), -1)
                ref = ref[b.choice_ids[r]][b.valid[r]]
                got = lp[r][b.valid[r]]
                if not torch.allclose(got, ref, atol=2e-3, rtol=0):
                    raise RuntimeError(
                        f"head search (HF path): the layer-by-layer forward does not reproduce "
                        f"{type(self.model).__name__}.forward (max diff {float((got - ref).abs().max()):.2e}); "
                        "this architecture is not supported by the HF search path (use method 'exact')")

    def _positions_mode(self, kind: str, batch: Batch, **kw) -> _Mode:
        return _Mode(kind, batch.pos, self.beta, self.threshold, **kw)

    # ------------------------------------------------------------------ cache
    def plan_cache(self, layers: Iterable[int]) -> None:
        """Layers whose inputs the next baseline pass keeps (exact scores start there)."""
        if self.cache_hidden:
            self._want_layers |= {int(x) for x in layers if 0 < int(x) < self.num_layers}

    def _have(self, layer: int) -> bool:
        return layer == 0 or (layer in self._cache and len(self._cache[layer]) == len(self.batches))

    # ------------------------------------------------------------------ exact scores
    def evaluate(self, heads: Iterable[Head], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Answer log-probabilities ``[N, Cmax]`` with ``heads`` calibrated (none: baseline)."""
        heads = sorted({(int(a), int(b)) for a, b in heads})
        by_layer = group_by_layer(heads)
        exact = {layer: torch.tensor(hs, dtype=torch.long) for layer, hs in by_layer.items()}
        if not heads:
            if self._grad_baseline is not None and not self._missing():
                lp, self._grad_baseline = self._grad_baseline, None
            else:
                lp = self._pass({}, 0, keep=self._missing(), progress=progress)
            self.baseline_lp = lp
            return lp
        start = min(by_layer)
        if self.cache_hidden and not self._have(start):
            # one baseline pass keeps the inputs of every planned layer (and of this one)
            self._want_layers.add(start)
            self.baseline_lp = self._pass({}, 0, keep=self._missing())
        if not self._have(start):
            start = 0
        return self._pass(exact, start, progress=progress)

    def _missing(self) -> list[int]:
        return sorted(x for x in self._want_layers if not self._have(x)) if self.cache_hidden else []

    def _pass(self, exact: dict[int, torch.Tensor], start: int, keep: Iterable[int] = (),
              progress: Callable[[int], None] | None = None) -> np.ndarray:
        keep = list(keep)
        out = np.full((len(self.calib), self.calib.max_choices), np.nan)
        with torch.no_grad():
            for b in self.batches:
                self.threads.update()
                h0 = self._cache[start][b.index] if start > 0 else None
                lp, kept = self._run(b, start, h0, keep=keep, mode=self._positions_mode("exact", b, exact=exact))
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
                mode = self._positions_mode("gate", b, gates=gates, gate_heads=heads_t)
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
                lp, _ = self._run(b, 0, mode=self._positions_mode("gate", b, gates=gates, gate_heads=heads_t))
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
