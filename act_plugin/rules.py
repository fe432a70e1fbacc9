"""Calibration rules: training-free reweightings of one key set per row, in pure torch.

ACT is one member of a family of attention interventions that pick, per sequence, head and
row, a set of keys ``K`` and scale the attention on it against the rest, each row still
summing to one. With ``S`` the row's attention on ``K`` and ``N = 1 - S`` the rest::

    p'_j = f * p_j   (j in K)        p'_j = g * p_j   (j not in K)        f*S + g*N = 1

so on outputs, with ``O_K = sum_{j in K} p_j v_j`` (the key set's weighted values)::

    O' = f * O_K + g * (O - O_K)

Rules differ only in ``K`` and in how ``f`` and ``g`` follow from ``S`` and ``N``:

========================  =============================  ===========================  ============================
rule                      key set K                      f                            g
========================  =============================  ===========================  ============================
``act`` (Yu et al.)       hidden sinks: column score     ``beta``                     ``1 + (1-beta) S / N``
                          > tau, position 0 excluded
``first_token``           the first real token           ``gamma / (gamma S + N)``    ``1 / (gamma S + N)``
(ZeroTuning)              (position 0)
``spans`` (PASTA)         the request's emphasised       ``1 / (S + alpha N)``        ``alpha / (S + alpha N)``
                          tokens
========================  =============================  ===========================  ============================

The denominators use the rest mass ``N`` summed directly rather than ``1 - S``, which cancels
when a row puts nearly all its attention on ``K`` (see :func:`act_plugin.core.calibrate_probs`).
A row the rule cannot or need not change (no mass on ``K``; for ACT also a vanishing rest
mass) is returned exactly unchanged.

This module is the one reference every fast path of a rule is tested against; ACT's own
maths stays in :mod:`act_plugin.core`, which this module calls for the ACT key set and factor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from act_plugin.core import NONSINK_EPS, dense_probabilities, find_sinks

__all__ = [
    "RULES",
    "ACTRule",
    "FirstTokenRule",
    "KeyReweightRule",
    "RuleFactors",
    "SpanRule",
    "apply_factors_to_output",
    "apply_factors_to_probs",
    "apply_rule_to_probs",
    "rule_attention_dense",
]

Scale = float | torch.Tensor  # a number, or one value per query head ([H])


@dataclass(frozen=True)
class RuleFactors:
    """Per row: the scale of the key set (``f``), of the other keys (``g``), and whether the
    row changes at all (``active``; inactive rows are returned bit for bit)."""

    f: torch.Tensor  # [..., Lq] float32
    g: torch.Tensor  # [..., Lq] float32
    active: torch.Tensor  # [..., Lq] bool


class KeyReweightRule(ABC):
    """One calibration rule: which keys it reweights and by how much.

    A subclass names its key set (:meth:`key_set`) and the factors that follow from the row's
    mass on it (:meth:`factors`); everything else (masking, normalisation, the epilogue on
    outputs) is shared by :func:`rule_attention_dense` and the fast kernels.
    """

    name: ClassVar[str]

    @abstractmethod
    def key_set(self, probs: torch.Tensor, vis: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, H, Lk]`` (the same set for every row of a call) or ``[B, H, Lq, Lk]``.

        ``probs [B, H, Lq, Lk]`` are this call's attention probabilities, ``vis [B, 1, Lq, Lk]``
        which row sees which key, ``k_pos [B, Lk]`` the keys' positions (-1 = padding)."""

    @abstractmethod
    def factors(self, set_mass: torch.Tensor, rest_mass: torch.Tensor) -> RuleFactors:
        """``f``, ``g`` and the active rows from the row's mass on the key set and off it
        (both ``[B, H, Lq]`` float32)."""


def _per_head(value: Scale, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-head ``[H]`` parameter, broadcastable against ``[B, H, Lq]``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != like.shape[1]:
        raise ValueError(f"a per-head parameter must have one value per head ({like.shape[1]}), got {tuple(t.shape)}")
    return t.view(1, -1, 1)


@dataclass(frozen=True)
class ACTRule(KeyReweightRule):
    """ACT (Yu et al., ICML 2024): hidden sinks scaled by ``beta``, the mass handed back."""

    beta: float = 0.4
    threshold: float = 0.1
    name: ClassVar[str] = "act"

    def key_set(self, probs, vis, k_pos):
        col_mass = probs.sum(-2)  # [B, H, Lk]
        row_count = vis.sum(-2)  # [B, 1, Lk]
        return find_sinks(col_mass, row_count, (k_pos == 0).unsqueeze(1), self.threshold)

    def factors(self, set_mass, rest_mass):
        active = (set_mass > 0) & (rest_mass > NONSINK_EPS) & (self.beta != 1.0)
        safe = torch.where(active, rest_mass, torch.ones_like(rest_mass))
        g = 1.0 + (1.0 - self.beta) * set_mass / safe
        return RuleFactors(f=torch.full_like(g, self.beta), g=g, active=active)


@dataclass(frozen=True, eq=False)
class FirstTokenRule(KeyReweightRule):
    """ZeroTuning (arXiv 2505.11739): the first real token's attention scaled by ``gamma``
    (``scale``: a number or one value per head) and the row renormalised::

        p0' = gamma p0 / (1 + (gamma - 1) p0),      pj' = pj / (1 + (gamma - 1) p0)
    """

    scale: Scale = 1.0
    name: ClassVar[str] = "first_token"

    def key_set(self, probs, vis, k_pos):
        first = (k_pos == 0).unsqueeze(1)  # [B, 1, Lk]
        return first.expand(probs.shape[0], probs.shape[1], -1)

    def factors(self, set_mass, rest_mass):
        gamma = _per_head(self.scale, set_mass)
        denom = gamma * set_mass + rest_mass
        active = (set_mass > 0) & (gamma != 1.0)
        safe = torch.where(active, denom, torch.ones_like(denom))
        return RuleFactors(f=gamma / safe, g=1.0 / safe, active=active)


@dataclass(frozen=True, eq=False)
class SpanRule(KeyReweightRule):
    """PASTA (Zhang et al., ICLR 2024): attention outside the emphasised spans scaled by
    ``alpha`` and the row renormalised (so the spans gain). ``emphasised [B, Lk]`` marks the
    keys inside the request's spans."""

    emphasised: torch.Tensor
    alpha: float = 0.01
    name: ClassVar[str] = "spans"

    def key_set(self, probs, vis, k_pos):
        marked = self.emphasised.to(torch.bool) & (k_pos >= 0)
        return marked.unsqueeze(1).expand(probs.shape[0], probs.shape[1], -1)

    def factors(self, set_mass, rest_mass):
        denom = set_mass + self.alpha * rest_mass
        # A row that sees no emphasised key yet is unchanged (all its keys scaled alike).
        active = (set_mass > 0) & (rest_mass > 0) & (self.alpha != 1.0)
        safe = torch.where(active, denom, torch.ones_like(denom))
        return RuleFactors(f=1.0 / safe, g=self.alpha / safe, active=active)


RULES: dict[str, type[KeyReweightRule]] = {r.name: r for r in (ACTRule, FirstTokenRule, SpanRule)}


def apply_factors_to_probs(probs: torch.Tensor, key_set: torch.Tensor, fac: RuleFactors) -> torch.Tensor:
    """``p'`` of the rule: ``f`` on the key set, ``g`` elsewhere; inactive rows unchanged."""
    p = probs.to(torch.float32)
    s = key_set if key_set.dim() == p.dim() else key_set.unsqueeze(-2)
    scaled = torch.where(s, p * fac.f.unsqueeze(-1), p * fac.g.unsqueeze(-1))
    return torch.where(fac.active.unsqueeze(-1), scaled, p)


def apply_factors_to_output(
    out: torch.Tensor, set_out: torch.Tensor, fac: RuleFactors
) -> torch.Tensor:
    """The shared epilogue ``O' = f * O_K + g * (O - O_K)`` (``out``, ``set_out``: ``[..., Lq, D]``).

    This is what a kernel that already has the native output needs: the key set's weighted
    values and its mass. ``O - O_K`` cancels when ``S`` is close to 1, so kernels that can
    should weight probabilities instead (as :func:`apply_factors_to_probs`)."""
    o = out.to(torch.float32)
    o_k = set_out.to(torch.float32)
    cal = fac.f.unsqueeze(-1) * o_k + fac.g.unsqueeze(-1) * (o - o_k)
    return torch.where(fac.active.unsqueeze(-1), cal, o)


def apply_rule_to_probs(rule: KeyReweightRule, probs: torch.Tensor, vis: torch.Tensor, k_pos: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """A rule on a full probability matrix (``probs [B, H, Lq, Lk]``, ``vis [B, 1, Lq, Lk]``,
    ``k_pos [B, Lk]``): ``(p' [B, H, Lq, Lk] float32, key set)``."""
    key_set = rule.key_set(probs, vis, k_pos)
    s = key_set if key_set.dim() == probs.dim() else key_set.unsqueeze(-2)
    in_set = probs * s
    fac = rule.factors(in_set.sum(-1), (probs - in_set).sum(-1))
    return apply_factors_to_probs(probs, key_set, fac), key_set


@dataclass
class RuleResult:
    out: torch.Tensor  # [B, H, Lq, D] float32
    key_set: torch.Tensor  # [B, H, Lk] or [B, H, Lq, Lk] bool
    probs: torch.Tensor  # [B, H, Lq, Lk] float32, after the rule


def rule_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    rule: KeyReweightRule,
    *,
    scale: float,
    window: int | None = None,
    attn_mask: torch.Tensor | None = None,
) -> RuleResult:
    """Obviously-correct reference of any rule on the full probability matrix (shapes as in
    :mod:`act_plugin.core`: ``q [B, H, Lq, D]``, ``k``/``v`` ``[B, Hkv, Lk, D]``).
    ``attn_mask`` (bool ``[B, Lq, Lk]``, True = may attend) is ANDed with the positional
    visibility, for callers that hold a model's own mask."""
    probs, vis, vf = dense_probabilities(q, k, v, q_pos, k_pos, scale=scale, window=window, attn_mask=attn_mask)
    cal, key_set = apply_rule_to_probs(rule, probs, vis, k_pos)
    return RuleResult(out=torch.matmul(cal, vf), key_set=key_set, probs=cal)
