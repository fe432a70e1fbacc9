"""The first_token rule over the paged cache (act_plugin.kernels.first_token) against the
dense rule reference (act_plugin.rules.rule_attention_dense) on the same keys and values."""

from __future__ import annotations

import pytest
import torch

from act_plugin.kernels.first_token import first_token_paged
from act_plugin.kernels.testing import LAYOUTS, make_problem
from act_plugin.kernels.testing import expected_first_token as expected

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}

SCENARIOS = {
    "decode": ([37, 130, 5, 64], [1, 1, 1, 1], None),
    "prefill": ([40, 70], [40, 70], None),
    "mixed": ([90, 33], [25, 1], None),
    "window": ([60, 45, 20], [60, 1, 7], 9),  # key 0 leaves the window: those rows stay native
    "padded_group": ([40, 1, 66, 1], [1, 0, 12, 0], None),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_token_paged_matches_the_rule_formula(layout, scenario, dtype):
    seq_lens, query_lens, window = SCENARIOS[scenario]
    p = make_problem(seq_lens, query_lens, layout=layout, dtype=dtype, window=window, num_heads=8,
                     num_kv_heads=2, heads=[0, 3, 5, 6], sink_strength=1.5, seed=len(scenario))
    gammas = torch.tensor([0.2, 3.0, 1.0, 8.0])  # GQA: heads over both KV heads; gamma 1 changes nothing
    out = p.output.clone()
    first_token_paged(p.query, out, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start,
                      p.query_lens, p.heads, p.kv_heads, gammas, scale=p.scale, window=p.window,
                      max_query_len=p.max_query_len, max_seq_len=p.max_seq_len, max_block_elems=512)
    exp = expected(p, gammas)
    err = (out.to(torch.float32) - exp).abs().max().item()
    assert err <= TOL[dtype] * exp.abs().max().item(), err
    assert not torch.equal(out, p.output)
    untouched = torch.ones(out.shape[1], dtype=torch.bool)
    untouched[p.heads[gammas != 1.0]] = False
    assert torch.equal(out[:, untouched], p.output[:, untouched])  # other heads and gamma-1 heads: bit for bit
    assert torch.equal(out[:2], p.output[:2])  # rows of other requests


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_token_paged_recomputes_where_p0_nears_one(dtype, monkeypatch):
    """Key 0 takes nearly all the attention and gamma is small: ``O - p0 v0`` cancels and the
    epilogue multiplies the output's rounding by up to 1/gamma. Rows below the recompute cut
    are computed from all keys and values; without the cut bf16 outputs lose the tolerance."""
    from act_plugin.kernels import first_token as mod

    p = make_problem([40, 30], [40, 1], num_heads=4, num_kv_heads=2, heads=[0, 1, 2, 3], sink_positions=(0,),
                     sink_strength=3.0, dtype=dtype, seed=7)
    gammas = torch.tensor([0.05, 0.3, 2.0, 0.01])
    exp = expected(p, gammas)

    def rel_err() -> float:
        out = p.output.clone()
        first_token_paged(p.query, out, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start,
                          p.query_lens, p.heads, p.kv_heads, gammas, scale=p.scale, window=None,
                          max_query_len=p.max_query_len, max_seq_len=p.max_seq_len, max_block_elems=512)
        return (out.to(torch.float32) - exp).abs().max().item() / exp.abs().max().item()

    assert rel_err() <= TOL[dtype]
    monkeypatch.setitem(mod.RECOMPUTE_BELOW, dtype, 0.0)
    forced = rel_err()
    assert forced > (TOL[dtype] if dtype == torch.bfloat16 else 1e-5)  # the cut is what keeps the tolerance


# ============================================================================ the layer calibrator
def _calibrator_and_arms():
    from act_plugin.config import ACTEngineConfig
    from act_plugin.kernels.cache_layout import cpu_attn_split
    from act_plugin.vllm.layer_calibrator import LayerCalibrator
    from act_plugin.vllm.worker_state import Arm, TPSlice, WorkerState

    cfg = ACTEngineConfig.from_any({"profiles": {
        "act": {"heads": {1: [0, 3]}, "beta": 0.3, "threshold": 0.1},
        "zt": {"rule": "first_token", "scale": {"1:0": 0.3, "1:2,3": 5.0}},
    }})
    state = WorkerState(engine_cfg=cfg, tp=TPSlice(rank=0, num_heads=4, num_layers=4))
    cal = LayerCalibrator(heads=state, num_heads=4, num_kv_heads=2, scale=32**-0.5, sliding_window=None,
                          kv_split=cpu_attn_split)
    cal.bind_layer(1)
    return state, cal, Arm("act", cfg.profiles["act"]), Arm("zt", cfg.profiles["zt"])


def _group(p, arm, idx: list[int]):
    from act_plugin.vllm.plan import SeqGroup

    sel = torch.tensor(idx)
    return SeqGroup(arm=arm, block_table=p.block_table[sel], seq_lens=p.seq_lens[sel],
                    query_start=p.query_start[sel], query_lens=p.query_lens[sel],
                    max_query_len=int(p.query_lens[sel].max()), max_seq_len=int(p.seq_lens[sel].max()))


@pytest.mark.parametrize("query_lens", [(1, 1, 1), (1, 6, 1)], ids=["decode", "mixed"])
def test_calibrator_runs_act_and_first_token_groups_side_by_side(query_lens):
    """One step: sequences 0 and 2 run ACT, sequence 1 first_token: each gets its own rule,
    the ACT rows exactly what an ACT-only step gives them, and the whole-layer decode declines."""
    import types

    from act_plugin.vllm.plan import StepPlan

    state, cal, act_arm, zt_arm = _calibrator_and_arms()
    p = make_problem([40, 23, 17], list(query_lens), num_heads=4, num_kv_heads=2, head_size=32, heads=[0, 3],
                     sink_strength=1.5, seed=3)
    act_only = p.output.clone()
    cal.apply(p.query, p.raw_cache, types.SimpleNamespace(act_plan=StepPlan(groups=[_group(p, act_arm, [0, 2])])),
              act_only)
    step = types.SimpleNamespace(act_plan=StepPlan(groups=[_group(p, act_arm, [0, 2])], covers_step=True,
                                                   rule_groups=[_group(p, zt_arm, [1])]))
    out = p.output.clone()
    assert not cal.whole_layer(p.query, p.raw_cache, step, out)  # declined: first_token rows in the step
    assert torch.equal(out, p.output)
    cal.apply(p.query, p.raw_cache, step, out)
    r1 = slice(int(p.query_start[1]), int(p.query_start[1] + p.query_lens[1]))
    rest = torch.ones(out.shape[0], dtype=torch.bool)
    rest[r1] = False
    assert torch.equal(out[rest], act_only[rest])  # ACT rows: bit for bit what they get alone
    p.heads, p.kv_heads = torch.tensor([0, 2, 3]), torch.tensor([0, 1, 1])
    exp = expected(p, torch.tensor([0.3, 5.0, 5.0]))
    assert (out[r1] - exp[r1]).abs().max() <= 2e-5 * exp.abs().max()
    assert torch.equal(out[r1][:, 1], p.output[r1][:, 1])  # head 1 is in neither profile's heads
    assert not torch.equal(out[r1], p.output[r1])


def test_engine_serves_every_rule(monkeypatch):
    """Every rule of the configuration is served by the engine (spans included); a rule missing
    from ENGINE_RULES is refused at start and by runtime control, naming the profile."""
    from act_plugin.config import ACTConfigError, ACTEngineConfig
    from act_plugin.vllm import rule_support
    from act_plugin.vllm.config_source import read_engine_settings
    from act_plugin.vllm.worker_state import WorkerState

    spans = {"profiles": {"emph": {"rule": "spans", "heads": "1:*"}}, "default": None}
    read_engine_settings({"act": spans})
    WorkerState().check(ACTEngineConfig.from_any(spans))
    read_engine_settings({"act": {"rule": "first_token", "scale": 2, "heads": "1:*"}})
    monkeypatch.setattr(rule_support, "ENGINE_RULES", ("act", "first_token"))
    with pytest.raises(ACTConfigError, match="runtime control: profile 'emph' uses rule 'spans', which the vLLM"):
        WorkerState().check(ACTEngineConfig.from_any(spans))


def test_step_plan_sorts_rule_arms_apart():
    """first_token rows go to rule_groups; act rows stay in groups (as in an act-only step)."""
    import numpy as np

    pytest.importorskip("vllm")
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from act_plugin.vllm.plan import build_step_plan

    state, _, act_arm, zt_arm = _calibrator_and_arms()
    q_lens, seq_lens = [1, 1, 1, 4], [9, 5, 7, 4]
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=sl, num_reqs=4,
        num_actual_tokens=int(qsl[-1]), max_query_len=4, max_seq_len=9,
        block_table_tensor=torch.arange(16, dtype=torch.int32).view(4, 4),
        slot_mapping=torch.zeros(7, dtype=torch.long),
        seq_lens_cpu_upper_bound=sl.clone(),
    )
    state.arms.update({0: act_arm, 1: zt_arm, 2: act_arm, 3: zt_arm})
    plan = build_step_plan(state, common, torch.device("cpu"), head_size=32, max_heads=4)
    assert [(g.arm.profile, g.query_start.tolist()) for g in plan.groups] == [("act", [0, 2])]
    assert sorted((g.arm.profile, g.query_start.tolist()) for g in plan.rule_groups) == [("zt", [1]), ("zt", [3])]
    assert plan.covers_step
    # a profile removed at runtime stays in force for its running requests (retired)
    state.configure(type(state.engine_cfg).from_any({"profiles": {"act": act_arm.config.to_dict()}}))
    assert state.other_rules_in_force()
    from act_plugin.vllm.worker_state import WorkerState

    state = WorkerState(engine_cfg=state.engine_cfg, tp=state.tp)  # act profiles only
    state.arms.update({0: act_arm, 2: act_arm})
    plan = build_step_plan(state, common, torch.device("cpu"), head_size=32, max_heads=4)
    assert not state.other_rules_in_force() and plan.rule_groups == []
    assert [g.query_start.tolist() for g in plan.groups] == [[0, 2]]
