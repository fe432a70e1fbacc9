"""The ACT maths (act_plugin.core) against hand-computed cases, the dense reference, and
properties that must hold for every valid input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from act_plugin.core import (
    NONSINK_EPS,
    act_attention_blocked,
    act_attention_dense,
    calibrate_output,
    calibrate_probs,
    find_sinks,
    visibility_mask,
)


def _pos(B, L, start=0):
    return (torch.arange(L) + start).expand(B, L).clone()


# ----------------------------------------------------------------------------- hand-computed
def test_hand_computed_three_tokens():
    # One head, 3 keys, 3 rows (full prefill). Attention chosen by hand.
    A = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.7, 0.1]])
    vis = visibility_mask(_pos(1, 3), _pos(1, 3))[0]
    # column scores: c0 = 1.7/3, c1 = 1.2/2 = 0.6, c2 = 0.1/1 = 0.1 (not > 0.1)
    sinks = find_sinks(A.sum(0), vis.sum(0), torch.tensor([True, False, False]), threshold=0.1)
    assert sinks.tolist() == [False, True, False]
    out = calibrate_probs(A, sinks, beta=0.4)
    # row 1: P_S = 0.5 -> sink 0.2; key 0 gets 0.5 + 0.6*0.5*0.5/0.5 = 0.8
    assert torch.allclose(out[1], torch.tensor([0.8, 0.2, 0.0]))
    # row 2: P_S = 0.7 -> sink 0.28; others scaled by (1 - 0.28)/(0.3) = 2.4
    assert torch.allclose(out[2], torch.tensor([0.48, 0.28, 0.24]))
    assert torch.equal(out[0], A[0])  # no sink mass in row 0


def test_position_zero_never_a_sink_even_when_not_above_threshold():
    # The release drops "the first index above tau"; token 0 below tau must not spare key 2.
    col = torch.tensor([0.05, 0.01, 0.5])
    sinks = find_sinks(col, torch.ones(3), torch.tensor([True, False, False]), 0.1)
    assert sinks.tolist() == [False, False, True]
    col = torch.tensor([0.9, 0.01, 0.5])
    assert find_sinks(col, torch.ones(3), torch.tensor([True, False, False]), 0.1).tolist() == [False, False, True]


def test_decode_case_is_one_row():
    # One query after 4 cached keys: the column score is that row's attention.
    B, H, D = 1, 1, 8
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, 1, D, generator=g) * 3
    k = torch.randn(B, H, 5, D, generator=g) * 3
    v = torch.randn(B, H, 5, D, generator=g)
    res = act_attention_dense(q, k, v, torch.tensor([[4]]), _pos(1, 5), scale=1.0, beta=0.4, threshold=0.1)
    p = torch.softmax((q @ k.transpose(-1, -2))[0, 0, 0], -1)
    expected = (p > 0.1) & (torch.arange(5) != 0)
    assert torch.equal(res.sinks[0, 0], expected)


def test_counts_when_rows_start_after_cached_keys():
    # 2 rows at positions 3, 4 over 5 keys: keys 0..3 seen by 2 rows, key 4 by 1 row.
    vis = visibility_mask(torch.tensor([[3, 4]]), _pos(1, 5))
    assert vis.sum(-2).tolist() == [[2, 2, 2, 2, 1]]
    # sliding window 2: row 3 sees 2,3; row 4 sees 3,4
    vis = visibility_mask(torch.tensor([[3, 4]]), _pos(1, 5), window=2)
    assert vis.sum(-2).tolist() == [[0, 0, 1, 2, 1]]


def test_keys_no_row_can_see_are_never_sinks():
    col = torch.tensor([0.0, 0.0, 0.3])
    assert find_sinks(col, torch.tensor([2, 0, 1]), torch.tensor([True, False, False]), 0.1).tolist() == [False, False, True]


def test_all_sink_row_left_unchanged_no_nan():
    A = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0 - 1e-9, 1e-9]])
    sinks = torch.tensor([False, True, False])
    out = calibrate_probs(A, sinks, 0.4)
    assert torch.equal(out[0], A[0])
    assert torch.isfinite(out).all()
    assert 1e-9 < NONSINK_EPS  # second row's non-sink mass is below resolution: unchanged
    assert torch.equal(out[1], A[1])


def test_output_form_matches_probability_form():
    g = torch.Generator().manual_seed(1)
    A = torch.softmax(torch.randn(4, 6, generator=g), -1)
    V = torch.randn(6, 3, generator=g)
    sinks = torch.tensor([False, True, False, False, True, False])
    ref = calibrate_probs(A, sinks, 0.3) @ V
    P = (A * sinks).sum(-1)
    o_s = (A * sinks) @ V
    assert torch.allclose(calibrate_output(A @ V, P, o_s, 0.3), ref, atol=1e-6)
    # identities
    assert torch.equal(calibrate_output(A @ V, P, o_s, 1.0), A @ V)
    assert torch.equal(calibrate_output(A @ V, torch.zeros(4), torch.zeros(4, 3), 0.3), A @ V)


# ----------------------------------------------------------------------------- properties
@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 3))
    Lk = draw(st.integers(1, 24))
    Lq = draw(st.integers(1, Lk))
    D = draw(st.sampled_from([4, 8]))
    window = draw(st.one_of(st.none(), st.integers(1, 8)))
    beta = draw(st.sampled_from([0.0, 0.2, 0.4, 0.9, 1.0]))
    threshold = draw(st.sampled_from([0.02, 0.1, 0.3]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 10_000))
    left_pad = draw(st.lists(st.integers(0, 3), min_size=B, max_size=B))
    return B, H, Hkv, Lq, Lk, D, window, beta, threshold, dtype, seed, left_pad


def _make(B, H, Hkv, Lq, Lk, D, dtype, seed, left_pad):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Lq, D, generator=g) * 2).to(dtype)
    k = (torch.randn(B, Hkv, Lk, D, generator=g) * 2).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    k_pos = torch.full((B, Lk), -1)
    for b, pad in enumerate(left_pad):
        pad = min(pad, Lk - 1)
        k_pos[b, pad:] = torch.arange(Lk - pad)
    q_pos = k_pos[:, Lk - Lq :].clone()
    return q, k, v, q_pos, k_pos


@settings(max_examples=150, deadline=None)
@given(problems())
def test_properties(problem):
    B, H, Hkv, Lq, Lk, D, window, beta, threshold, dtype, seed, left_pad = problem
    q, k, v, q_pos, k_pos = _make(B, H, Hkv, Lq, Lk, D, dtype, seed, left_pad)
    kw = dict(scale=1 / math.sqrt(D), beta=beta, threshold=threshold, window=window)
    dense = act_attention_dense(q, k, v, q_pos, k_pos, **kw)
    P = dense.probs
    assert torch.isfinite(P).all() and torch.isfinite(dense.out).all()
    valid_rows = q_pos >= 0
    sums = P.sum(-1)
    assert torch.allclose(sums[valid_rows.unsqueeze(1).expand_as(sums)], torch.ones(()), atol=1e-5)
    # position 0 is never a sink, invisible keys are never sinks
    assert not dense.sinks[(k_pos == 0).unsqueeze(1).expand_as(dense.sinks)].any()
    assert not dense.sinks[(k_pos < 0).unsqueeze(1).expand_as(dense.sinks)].any()
    # position 0 is never scaled down: its probability can only grow (mass handed back)
    plain = act_attention_dense(q, k, v, q_pos, k_pos, scale=kw["scale"], beta=1.0, threshold=threshold, window=window)
    first = (k_pos == 0).view(B, 1, 1, Lk).expand_as(P)
    assert (P[first] >= plain.probs[first] - 1e-6).all()
    # sink columns are scaled by exactly beta, in every row whose non-sink mass is not
    # below float resolution (those rows are left as they are)
    s = dense.sinks.unsqueeze(2).expand_as(P)
    nonsink = (plain.probs * ~s).sum(-1, keepdim=True)
    active = s & (nonsink > NONSINK_EPS)
    assert torch.allclose(P[active], beta * plain.probs[active], atol=1e-6)
    frozen = (nonsink <= NONSINK_EPS).expand_as(P)
    assert torch.equal(P[frozen], plain.probs[frozen])
    # blocked (forced into several row blocks) equals dense
    blocked = act_attention_blocked(q, k, v, q_pos, k_pos, max_block_elems=max(1, B * H * Lk * 2), **kw)
    assert torch.equal(blocked.sinks, dense.sinks)
    assert torch.allclose(blocked.out, dense.out, atol=2e-5, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_identities_are_exact(problem):
    B, H, Hkv, Lq, Lk, D, window, _, threshold, dtype, seed, left_pad = problem
    q, k, v, q_pos, k_pos = _make(B, H, Hkv, Lq, Lk, D, dtype, seed, left_pad)
    kw = dict(scale=1 / math.sqrt(D), threshold=threshold, window=window)
    plain = act_attention_dense(q, k, v, q_pos, k_pos, beta=1.0, **kw)
    # beta = 1 is exactly the identity (the uncalibrated softmax)
    vis = visibility_mask(q_pos, k_pos, window).unsqueeze(1)
    kf = k.float().repeat_interleave(H // Hkv, 1)
    scores = (q.float() @ kf.transpose(-1, -2) * kw["scale"]).masked_fill(~vis, float("-inf"))
    ref = torch.softmax(scores, -1).nan_to_num(0.0)
    assert torch.allclose(plain.probs, ref, atol=1e-6)
    # a threshold nobody reaches (no sinks) is exactly the identity too
    none = act_attention_dense(q, k, v, q_pos, k_pos, beta=0.3, scale=kw["scale"], threshold=0.999999, window=window)
    if not none.sinks.any():
        assert torch.equal(none.probs, plain.probs)


def test_blocked_never_builds_the_full_matrix(monkeypatch):
    """With a small block budget, no score tensor larger than the budget is created."""
    import act_plugin.core as core

    B, H, L, D = 1, 2, 96, 8
    q, k, v, q_pos, k_pos = _make(B, H, H, L, L, D, torch.float32, 0, [0])
    budget = B * H * L * 8  # 8 rows per block
    biggest = []
    real_matmul = torch.matmul

    def spy(a, b):
        out = real_matmul(a, b)
        biggest.append(out.numel())
        return out

    monkeypatch.setattr(core.torch, "matmul", spy)
    res = act_attention_blocked(q, k, v, q_pos, k_pos, scale=0.3, beta=0.4, threshold=0.1, max_block_elems=budget)
    monkeypatch.undo()
    assert max(biggest) <= budget < B * H * L * L
    dense = act_attention_dense(q, k, v, q_pos, k_pos, scale=0.3, beta=0.4, threshold=0.1)
    assert torch.allclose(res.out, dense.out, atol=1e-5)


def test_half_precision_inputs_accumulate_in_float32():
    q, k, v, q_pos, k_pos = _make(1, 2, 1, 64, 64, 8, torch.bfloat16, 5, [0])
    res = act_attention_blocked(q, k, v, q_pos, k_pos, scale=0.35, beta=0.4, threshold=0.1, max_block_elems=2 * 64 * 4)
    assert res.out.dtype == torch.float32
    ref = act_attention_dense(q.float(), k.float(), v.float(), q_pos, k_pos, scale=0.35, beta=0.4, threshold=0.1)
    assert torch.allclose(res.out, ref.out, atol=1e-5)


def test_shape_errors_are_clear():
    q = torch.zeros(1, 3, 2, 4)
    k = torch.zeros(1, 2, 2, 4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        act_attention_dense(q, k, k, _pos(1, 2), _pos(1, 2), scale=1.0, beta=0.4, threshold=0.1)
    with pytest.raises(ValueError, match="q_pos must be"):
        act_attention_dense(q, q, q, _pos(1, 3), _pos(1, 2), scale=1.0, beta=0.4, threshold=0.1)
