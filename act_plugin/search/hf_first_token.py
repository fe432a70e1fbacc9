"""The ``first_token`` rule (ZeroTuning) on the transformers search path.

The search's attention function (:mod:`act_plugin.search.hf_backend`) applies, after any ACT
heads of the pass, the groups of :class:`FirstTokenGroup` its mode holds for the layer: each
group's heads get :func:`act_plugin.calibration.calibrate_heads_rule` with a
:class:`~act_plugin.rules.FirstTokenRule` of one gamma per head (the dense reference every
path of the rule is tested against), and either replace the native output (exact scores) or
are gated like ACT's ranking pass (``out + alpha * (calibrated - out)``, ``alpha`` a leaf at
0): the derivative in ``alpha`` is the first-order effect of that (head, gamma) alone.
One group per (layer, gamma) gives every gamma of the grid its own gate in one backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from act_plugin.calibration import attention_scale, attention_window, calibrate_heads_rule, gate_heads, replace_heads
from act_plugin.rules import FirstTokenRule
from act_plugin.search.scoring import margins_torch

__all__ = ["FirstTokenGroup", "apply_first_token", "exact_groups", "first_token_gradients", "FTItem"]

Head = tuple[int, int]
FTItem = tuple[int, int, float]  # (layer, head, gamma)


@dataclass(frozen=True)
class FirstTokenGroup:
    """Heads of one layer under first_token: ``heads [Hs]``, ``gammas [Hs]``, and in the
    ranking pass ``gates [Hs]`` (None: the calibrated output replaces the native one)."""

    heads: torch.Tensor
    gammas: torch.Tensor
    gates: torch.Tensor | None = None


def apply_first_token(out: torch.Tensor, query, key, value, module: Any, kwargs: dict, pos: torch.Tensor,
                      groups: list[FirstTokenGroup], valid: torch.Tensor) -> torch.Tensor:
    """``out`` (``[B, Lq, H, D]``) with each group's heads calibrated by first_token."""
    scale = attention_scale(module, kwargs, query.shape[-1])
    window = attention_window(module, kwargs)
    for g in groups:
        with torch.no_grad():
            res = calibrate_heads_rule(query.detach(), key.detach(), value.detach(), pos, pos, g.heads,
                                       FirstTokenRule(scale=g.gammas), scale=scale, window=window)
        out = replace_heads(out, g.heads, res.out) if g.gates is None else gate_heads(out, g.heads, res.out, g.gates,
                                                                                       valid)
    return out


def exact_groups(scales: Mapping[Head, float] | None) -> dict[int, list[FirstTokenGroup]]:
    """Layer -> one group holding each head's gamma (``scales``: (layer, head) -> gamma)."""
    by_layer: dict[int, list[tuple[int, float]]] = {}
    for (layer, head), gamma in sorted((scales or {}).items()):
        by_layer.setdefault(int(layer), []).append((int(head), float(gamma)))
    return {layer: [FirstTokenGroup(torch.tensor([h for h, _ in v], dtype=torch.long),
                                    torch.tensor([g for _, g in v], dtype=torch.float32))]
            for layer, v in by_layer.items()}


def _gated_groups(heads: list[Head], gammas: list[float]) -> tuple[dict[int, list[FirstTokenGroup]],
                                                                    list[tuple[int, float, list[int], torch.Tensor]]]:
    by_layer: dict[int, list[int]] = {}
    for layer, head in sorted(heads):
        by_layer.setdefault(int(layer), []).append(int(head))
    groups: dict[int, list[FirstTokenGroup]] = {}
    leaves = []
    for layer, hs in by_layer.items():
        for gamma in gammas:
            gate = torch.zeros(len(hs), requires_grad=True)
            groups.setdefault(layer, []).append(FirstTokenGroup(
                torch.tensor(hs, dtype=torch.long), torch.full((len(hs),), float(gamma)), gate))
            leaves.append((layer, float(gamma), hs, gate))
    return groups, leaves


def first_token_gradients(be: Any, heads: Iterable[Head], gammas: list[float], *, clip: float | None = None,
                          done: dict[int, dict] | None = None, on_batch: Callable[[int, dict], None] | None = None,
                          progress: Callable[[int], None] | None = None) -> dict[FTItem, float]:
    """First-order estimate, over ``be``'s calibration set (an
    :class:`~act_plugin.search.hf_backend.HFSearchBackend`), of the score change (macro mean
    margin, clipped to ``[-clip, clip]`` when given) of each (layer, head, gamma) alone: one
    backward per batch. ``done``/``on_batch``: stored batch records ``{"grad": [[l, h, g, v],
    ...]}`` (resume) and the callback after each computed batch."""
    heads = sorted({(int(a), int(b)) for a, b in heads})
    total: dict[FTItem, float] = {(a, b, float(g)): 0.0 for a, b in heads for g in gammas}
    done = done or {}
    for b in be.batches:
        rec = done.get(b.index)
        if rec is None:
            be.threads.update()
            groups, leaves = _gated_groups(heads, gammas)
            mode = be._mode("gate", b, first_token=groups)
            with torch.enable_grad():
                lp, _ = be._run(b, 0, mode=mode)
                margin = margins_torch(lp.double(), b.gold, b.valid)
                if clip is not None:
                    margin = margin.clamp(-clip, clip)
                (margin * b.weights).sum().backward()
            rows = []
            for layer, gamma, hs, gate in leaves:
                grad = gate.grad.double().numpy() if gate.grad is not None else np.zeros(len(hs))
                rows += [[layer, h, gamma, float(v)] for h, v in zip(hs, grad)]
            rec = {"grad": rows}
            if on_batch:
                on_batch(b.index, rec)
        for layer, h, gamma, v in rec["grad"]:
            total[(int(layer), int(h), float(gamma))] += float(v)
        if progress:
            progress(len(b.samples))
    return total
