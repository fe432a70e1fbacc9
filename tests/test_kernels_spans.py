"""The spans rule over the paged cache (act_plugin.kernels.spans) against the dense rule
reference (act_plugin.rules.rule_attention_dense) on the same keys and values; the layer
calibrator running spans groups beside act, first_token and uncalibrated rows; the step
plan giving each spans sequence its own token ranges."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from act_plugin.kernels.spans import emphasised_positions, spans_paged
from act_plugin.kernels.testing import LAYOUTS, make_problem
from act_plugin.rules import SpanRule, rule_attention_dense

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}

# seq lens, query lens (1 = decode), window, each sequence's token ranges
SCENARIOS = {
    "decode": ([37, 130, 5, 64], [1, 1, 1, 1], None, [[(3, 9)], [(0, 2), (50, 80)], [(1, 2)], [(20, 21)]]),
    "prefill": ([40, 70], [40, 70], None, [[(5, 12), (30, 31)], [(0, 70)]]),  # all of seq 1 emphasised
    "mixed": ([90, 33], [25, 1], None, [[(60, 75)], [(2, 4)]]),
    # spans leave the window of later rows: those rows have no mass on them and stay native
    "window": ([60, 45, 20], [60, 1, 7], 9, [[(10, 20)], [(0, 30)], [(4, 6)]]),
    "padded_group": ([40, 1, 66, 1], [1, 0, 12, 0], None, [[(1, 3)], [(0, 1)], [(40, 66)], [(0, 1)]]),
    # generated tokens (past the prompt) are never in the ranges; a sequence may emphasise nothing here
    "decode_after_prompt": ([48, 30], [1, 1], None, [[(10, 16)], []]),
}


def _ranges_tensor(per_seq):
    r = max(1, max(len(x) for x in per_seq))
    t = torch.zeros(len(per_seq), r, 2, dtype=torch.long)
    for i, ranges in enumerate(per_seq):
        for j, (a, b) in enumerate(ranges):
            t[i, j] = torch.tensor([a, b])
    return t


def expected(p, per_seq, alpha: float, rows=None) -> torch.Tensor:
    """The dense rule on each sequence, written over the native output (``rows``: which
    sequences of the problem; default all)."""
    out = p.output.to(torch.float32).clone()
    for g, (k, v) in enumerate(zip(p.keys, p.values)):
        if rows is not None and g not in rows:
            continue
        L, ql, q0 = int(p.seq_lens[g]), int(p.query_lens[g]), int(p.query_start[g])
        if ql == 0:
            continue
        emph = torch.zeros(1, L, dtype=torch.bool)
        for a, b in per_seq[g]:
            emph[0, a:b] = True
        q = p.query[q0 : q0 + ql].index_select(1, p.heads).permute(1, 0, 2)[None]
        res = rule_attention_dense(q, k.index_select(0, p.kv_heads)[None], v.index_select(0, p.kv_heads)[None],
                                   torch.arange(L - ql, L)[None], torch.arange(L)[None],
                                   SpanRule(emphasised=emph, alpha=alpha), scale=p.scale, window=p.window)
        out[q0 : q0 + ql, p.heads] = res.out[0].permute(1, 0, 2)
    return out


def _run(p, per_seq, alpha, **kw):
    out = p.output.clone()
    spans_paged(p.query, out, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start, p.query_lens,
                p.heads, p.kv_heads, _ranges_tensor(per_seq), alpha=alpha, scale=p.scale, window=p.window,
                max_query_len=p.max_query_len, max_seq_len=p.max_seq_len, **kw)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spans_paged_matches_the_rule_formula(layout, scenario, dtype):
    seq_lens, query_lens, window, per_seq = SCENARIOS[scenario]
    p = make_problem(seq_lens, query_lens, layout=layout, dtype=dtype, window=window, num_heads=8,
                     num_kv_heads=2, heads=[0, 3, 5, 6], sink_strength=1.5, seed=len(scenario))  # GQA: both KV heads
    out = _run(p, per_seq, 0.05, max_block_elems=512)  # several row blocks
    exp = expected(p, per_seq, 0.05)
    err = (out.to(torch.float32) - exp).abs().max().item()
    assert err <= TOL[dtype] * exp.abs().max().item(), err
    assert not torch.equal(out, p.output)
    untouched = torch.ones(out.shape[1], dtype=torch.bool)
    untouched[p.heads] = False
    assert torch.equal(out[:, untouched], p.output[:, untouched])  # other heads: bit for bit
    assert torch.equal(out[:2], p.output[:2])  # rows of other requests


def test_spans_paged_small_alpha_and_extreme_rows():
    """alpha 1e-3 (f up to 1/alpha) with strong sinks outside the spans, and a span on the sink:
    still within float32 tolerance of the dense formula; alpha 1 changes nothing."""
    per_seq = [[(3, 4)], [(10, 40)]]  # seq 0: the span is a sink (position 3); seq 1: no sink in it
    p = make_problem([50, 64], [50, 1], num_heads=4, num_kv_heads=1, heads=[0, 1, 2, 3], sink_strength=4.0, seed=7)
    out = _run(p, per_seq, 1e-3)
    exp = expected(p, per_seq, 1e-3)
    assert (out - exp).abs().max() <= 5e-5 * exp.abs().max()
    assert torch.equal(_run(p, per_seq, 1.0), p.output)


def test_emphasised_positions_ignore_padding_and_empty_ranges():
    k_pos = torch.tensor([[0, 1, 2, 3, -1, -1], [0, 1, 2, 3, 4, 5]])
    ranges = torch.tensor([[[1, 3], [0, 0]], [[0, 0], [0, 0]]])
    got = emphasised_positions(ranges, k_pos)
    assert got.tolist() == [[False, True, True, False, False, False], [False] * 6]


# ============================================================================ the layer calibrator
def _calibrator_and_arms():
    from act_plugin.config import ACTEngineConfig
    from act_plugin.kernels.cache_layout import cpu_attn_split
    from act_plugin.vllm.layer_calibrator import LayerCalibrator
    from act_plugin.vllm.worker_state import Arm, TPSlice, WorkerState

    cfg = ACTEngineConfig.from_any({"profiles": {
        "act": {"heads": {1: [0, 3]}, "beta": 0.3, "threshold": 0.1},
        "zt": {"rule": "first_token", "scale": 4.0, "heads": {1: [1]}},
        "emph": {"rule": "spans", "alpha": 0.02, "heads": {1: [0, 2, 3]}},
    }})
    state = WorkerState(engine_cfg=cfg, tp=TPSlice(rank=0, num_heads=4, num_layers=4))
    cal = LayerCalibrator(heads=state, num_heads=4, num_kv_heads=2, scale=32**-0.5, sliding_window=None,
                          kv_split=cpu_attn_split)
    cal.bind_layer(1)
    arms = {name: Arm(name, prof) for name, prof in cfg.profiles.items()}
    return state, cal, arms


def _group(p, arm, idx: list[int], per_seq=None):
    from act_plugin.vllm.plan import SeqGroup

    sel = torch.tensor(idx)
    return SeqGroup(arm=arm, block_table=p.block_table[sel], seq_lens=p.seq_lens[sel],
                    query_start=p.query_start[sel], query_lens=p.query_lens[sel],
                    max_query_len=int(p.query_lens[sel].max()), max_seq_len=int(p.seq_lens[sel].max()),
                    span_ranges=None if per_seq is None else _ranges_tensor([per_seq[i] for i in idx]))


def _rows(p, g):
    return slice(int(p.query_start[g]), int(p.query_start[g] + p.query_lens[g]))


@pytest.mark.parametrize("query_lens", [(1, 1, 1, 1, 1), (1, 6, 1, 9, 3)], ids=["decode", "mixed"])
def test_calibrator_mixes_spans_with_act_first_token_and_off_rows(query_lens):
    """One step: sequence 0 runs ACT, 1 and 3 spans (each its own ranges), 2 first_token, 4 no
    ACT. Every row gets exactly what its arm alone gives it; the whole-layer decode declines."""
    from act_plugin.vllm.plan import StepPlan

    _, cal, arms = _calibrator_and_arms()
    per_seq = {1: [(2, 5)], 3: [(0, 1), (10, 14)]}
    p = make_problem([40, 23, 17, 30, 12], list(query_lens), num_heads=4, num_kv_heads=2, head_size=32,
                     heads=[0, 2, 3], sink_strength=1.5, seed=5)
    alone = {}
    for name, idx in (("act", [0]), ("zt", [2]), ("emph", [1, 3])):
        out = p.output.clone()
        grp = _group(p, arms[name], idx, per_seq if name == "emph" else None)
        plan = StepPlan(groups=[grp]) if name == "act" else StepPlan(rule_groups=[grp])
        cal.apply(p.query, p.raw_cache, types.SimpleNamespace(act_plan=plan), out)
        alone[name] = out
    step = types.SimpleNamespace(act_plan=StepPlan(
        groups=[_group(p, arms["act"], [0])], covers_step=False,
        rule_groups=[_group(p, arms["emph"], [1, 3], per_seq), _group(p, arms["zt"], [2])]))
    out = p.output.clone()
    assert not cal.whole_layer(p.query, p.raw_cache, step, out)
    cal.apply(p.query, p.raw_cache, step, out)
    for g, name in ((0, "act"), (1, "emph"), (2, "zt"), (3, "emph")):
        assert torch.equal(out[_rows(p, g)], alone[name][_rows(p, g)]), (g, name)
    assert torch.equal(out[_rows(p, 4)], p.output[_rows(p, 4)])  # off row: native
    # the spans rows against the dense formula, with the profile's heads and alpha
    p.heads, p.kv_heads = torch.tensor([0, 2, 3]), torch.tensor([0, 1, 1])
    full = {g: per_seq.get(g, []) for g in range(5)}
    exp = expected(p, full, 0.02, rows={1, 3})
    for g in (1, 3):
        r = _rows(p, g)
        assert (out[r] - exp[r]).abs().max() <= 2e-5 * exp.abs().max()
        assert torch.equal(out[r][:, 1], p.output[r][:, 1])  # head 1 is not in the spans profile
        assert not torch.equal(out[r], p.output[r])


# ============================================================================ the step plan
def test_step_plan_gives_each_spans_sequence_its_ranges():
    pytest.importorskip("vllm")
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from act_plugin.vllm.plan import build_step_plan

    state, _, arms = _calibrator_and_arms()
    q_lens, seq_lens = [1, 1, 5, 1], [9, 5, 5, 7]
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=sl, num_reqs=4,
        num_actual_tokens=int(qsl[-1]), max_query_len=5, max_seq_len=9,
        block_table_tensor=torch.arange(16, dtype=torch.int32).view(4, 4),
        slot_mapping=torch.zeros(8, dtype=torch.long), seq_lens_cpu_upper_bound=sl.clone(),
    )
    state.arms.update({0: arms["emph"].with_token_ranges(((1, 3),)), 1: arms["act"],
                       2: arms["emph"].with_token_ranges(((0, 1), (3, 5))),
                       3: arms["emph"].with_token_ranges(((2, 4), (5, 6), (6, 7)))})
    plan = build_step_plan(state, common, torch.device("cpu"), head_size=32, max_heads=4)
    assert [g.arm.profile for g in plan.groups] == ["act"]
    spans = {tuple(g.query_start.tolist()): g.span_ranges.tolist() for g in plan.rule_groups}
    assert spans == {
        (0, 7): [[[1, 3], [0, 0], [0, 0]], [[2, 4], [5, 6], [6, 7]]],  # the decode rows of seqs 0 and 3
        (2,): [[[0, 1], [3, 5]]],  # the prefill of seq 2
    }
    assert plan.groups[0].span_ranges is None
