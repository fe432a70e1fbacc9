"""The calibration rules' shared maths (act_plugin.rules) against each rule's own definition.

Each rule is checked against the formula it is published with, written out the naive way
(scale the weights, renormalise the row), over random shapes with GQA, windows and left
padding; ACT through the rule layer must equal act_plugin.core exactly.
"""

from __future__ import annotations

import pytest
import torch

from act_plugin.core import act_attention_dense, visibility_mask
from act_plugin.rules import (
    RULES,
    ACTRule,
    FirstTokenRule,
    SpanRule,
    apply_factors_to_output,
    rule_attention_dense,
)

CASES = [  # B, H, Hkv, Lq, Lk, window
    (2, 4, 4, 7, 7, None),
    (3, 6, 2, 9, 9, None),
    (2, 4, 1, 1, 12, None),  # decode: one row over cached keys
    (2, 6, 3, 10, 10, 4),  # sliding window
]


def _inputs(B, H, Hkv, Lq, Lk, seed, pad=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, 8, generator=g) * 1.5
    k = torch.randn(B, Hkv, Lk, 8, generator=g) * 1.5
    v = torch.randn(B, Hkv, Lk, 8, generator=g)
    # left padding on sequence 0: its first `pad` keys are padding, position 0 comes after
    k_pos = torch.arange(Lk).repeat(B, 1)
    k_pos[0] = torch.arange(Lk) - pad
    k_pos[0, :pad] = -1
    q_pos = k_pos[:, Lk - Lq:].clone()
    return q, k, v, q_pos, k_pos


def _naive_probs(q, k, q_pos, k_pos, window, scale):
    H = q.shape[1]
    kk = k.repeat_interleave(H // k.shape[1], dim=1)
    s = (q @ kk.transpose(-1, -2)) * scale
    vis = visibility_mask(q_pos, k_pos, window).unsqueeze(1)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1)
    return torch.nan_to_num(p, nan=0.0), vis


def _renormalised(p, weights):
    w = p * weights
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-30), p)


@pytest.mark.parametrize("case", CASES)
def test_act_rule_is_core_act(case):
    B, H, Hkv, Lq, Lk, window = case
    q, k, v, q_pos, k_pos = _inputs(B, H, Hkv, Lq, Lk, seed=1)
    for beta, tau in ((0.4, 0.1), (0.0, 0.05), (1.0, 0.1)):
        ref = act_attention_dense(q, k, v, q_pos, k_pos, scale=0.35, beta=beta, threshold=tau, window=window)
        got = rule_attention_dense(q, k, v, q_pos, k_pos, ACTRule(beta=beta, threshold=tau), scale=0.35,
                                   window=window)
        assert torch.equal(got.key_set, ref.sinks)
        torch.testing.assert_close(got.probs, ref.probs, rtol=0, atol=1e-7)
        torch.testing.assert_close(got.out, ref.out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("gamma", [2.0, 0.5, "per-head"])
def test_first_token_rule_scales_the_first_real_token(case, gamma):
    B, H, Hkv, Lq, Lk, window = case
    q, k, v, q_pos, k_pos = _inputs(B, H, Hkv, Lq, Lk, seed=2)
    scale_value = torch.linspace(0.25, 3.0, H) if gamma == "per-head" else gamma
    got = rule_attention_dense(q, k, v, q_pos, k_pos, FirstTokenRule(scale=scale_value), scale=0.35, window=window)
    p, _ = _naive_probs(q, k, q_pos, k_pos, window, 0.35)
    g = torch.as_tensor(scale_value, dtype=torch.float32).reshape(1, -1, 1, 1) if gamma == "per-head" else gamma
    first = (k_pos == 0).view(B, 1, 1, Lk)
    weights = torch.where(first, g * torch.ones_like(p), torch.ones_like(p))
    expect = _renormalised(p, weights)
    torch.testing.assert_close(got.probs, expect, rtol=1e-5, atol=1e-6)
    # the closed form of the issue: p0' = g p0 / (1 + (g - 1) p0)
    p0 = (p * first).sum(-1)
    gg = g if isinstance(g, float) else g.squeeze(-1)
    closed = gg * p0 / (1 + (gg - 1) * p0)
    torch.testing.assert_close((got.probs * first).sum(-1), closed, rtol=1e-5, atol=1e-6)
    # padding keys never receive attention, and rows still sum to one where they see a key
    assert torch.all(got.probs[0, :, :, :2] == 0)
    sums = got.probs.sum(-1)
    seen = sums > 0
    torch.testing.assert_close(sums[seen], torch.ones_like(sums[seen]), rtol=0, atol=1e-5)
    torch.testing.assert_close(got.out, got.probs @ v.repeat_interleave(H // Hkv, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("alpha", [0.01, 0.3])
def test_span_rule_scales_everything_outside_the_spans(case, alpha):
    B, H, Hkv, Lq, Lk, window = case
    q, k, v, q_pos, k_pos = _inputs(B, H, Hkv, Lq, Lk, seed=3)
    emph = torch.zeros(B, Lk, dtype=torch.bool)
    emph[:, Lk // 3: Lk // 3 + 3] = True
    got = rule_attention_dense(q, k, v, q_pos, k_pos, SpanRule(emphasised=emph, alpha=alpha), scale=0.35,
                               window=window)
    p, _ = _naive_probs(q, k, q_pos, k_pos, window, 0.35)
    inside = (emph & (k_pos >= 0)).view(B, 1, 1, Lk)
    weights = torch.where(inside, torch.ones_like(p), alpha * torch.ones_like(p))
    expect = _renormalised(p, weights)
    # rows that see no emphasised key are left as they are (every key scaled alike)
    sees_span = (p * inside).sum(-1, keepdim=True) > 0
    expect = torch.where(sees_span, expect, p)
    torch.testing.assert_close(got.probs, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(RULES))
def test_output_epilogue_equals_reweighted_probabilities(name):
    """O' = f O_K + g (O - O_K): what a kernel holding the native output computes."""
    B, H, Hkv, Lq, Lk = 2, 6, 3, 9, 9
    q, k, v, q_pos, k_pos = _inputs(B, H, Hkv, Lq, Lk, seed=4)
    emph = torch.zeros(B, Lk, dtype=torch.bool)
    emph[:, 3:6] = True
    rule = {"act": ACTRule(beta=0.3, threshold=0.08), "first_token": FirstTokenRule(scale=1.7),
            "spans": SpanRule(emphasised=emph, alpha=0.05)}[name]
    res = rule_attention_dense(q, k, v, q_pos, k_pos, rule, scale=0.35)
    p, vis = _naive_probs(q, k, q_pos, k_pos, None, 0.35)
    vv = v.repeat_interleave(H // Hkv, 1)
    s = res.key_set if res.key_set.dim() == 4 else res.key_set.unsqueeze(-2)
    o, o_k = p @ vv, (p * s) @ vv
    rest = (p * ~s).sum(-1)
    fac = rule.factors((p * s).sum(-1), rest)
    got = apply_factors_to_output(o, o_k, fac)
    # O - O_K cancels as the rest mass N -> 0 (error ~ ulp(O) / N): compare where N is not tiny,
    # which is why the kernels weight probabilities where they can.
    fine = rest > 1e-2
    assert fine.float().mean() > 0.5  # (rows at position 0 and padding rows have no rest mass at all)
    torch.testing.assert_close(got[fine], res.out[fine], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", [ACTRule(beta=1.0), FirstTokenRule(scale=1.0),
                                  SpanRule(emphasised=torch.ones(2, 7, dtype=torch.bool), alpha=0.01)])
def test_identities_are_exact(rule):
    """beta 1, gamma 1, and spans covering every key change nothing, bit for bit."""
    q, k, v, q_pos, k_pos = _inputs(2, 4, 2, 7, 7, seed=5)
    res = rule_attention_dense(q, k, v, q_pos, k_pos, rule, scale=0.35)
    base = rule_attention_dense(q, k, v, q_pos, k_pos, FirstTokenRule(scale=1.0), scale=0.35)
    assert torch.equal(res.probs, base.probs)


def test_per_head_scale_must_match_the_heads():
    q, k, v, q_pos, k_pos = _inputs(2, 4, 2, 5, 5, seed=6)
    with pytest.raises(ValueError, match="one value per head"):
        rule_attention_dense(q, k, v, q_pos, k_pos, FirstTokenRule(scale=torch.ones(3)), scale=0.35)
