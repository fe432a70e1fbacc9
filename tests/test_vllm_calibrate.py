"""The per-layer calibrator the wrapped backends call (act_plugin.vllm.layer_calibrator), outside an
engine: its results against the dense reference, its per-layer caches (head indices per
profile content, the cache views per KV-cache tensor) and the opt-in host-time accounting."""

from __future__ import annotations

import types

import pytest
import torch

from act_plugin.config import ACTConfig, ACTEngineConfig
from act_plugin.kernels.cache_layout import cpu_attn_split
from act_plugin.kernels.testing import make_problem
from act_plugin.vllm.layer_calibrator import LayerCalibrator
from act_plugin.vllm.plan import SeqGroup, StepPlan
from act_plugin.vllm.profiling import per_kind, set_profiling, timer
from act_plugin.vllm.worker_state import Arm, TPSlice, WorkerState

H, HKV, D, LAYER = 4, 2, 32, 1


def _close(got: torch.Tensor, exp: torch.Tensor) -> bool:
    """The fused kernels' tolerance against dense core (tests/test_kernels.py)."""
    return (got - exp).abs().max().item() <= 2e-4 * exp.abs().max().item()


def _state(heads: list[int]) -> tuple[WorkerState, ACTConfig]:
    cfg = ACTEngineConfig.from_any({"profiles": {"act": {"heads": {LAYER: heads}, "beta": 0.3, "threshold": 0.1}}})
    return WorkerState(engine_cfg=cfg, tp=TPSlice(rank=0, num_heads=H, num_layers=4)), cfg.profiles["act"]


def _calibrator(state: WorkerState) -> LayerCalibrator:
    cal = LayerCalibrator(heads=state, num_heads=H, num_kv_heads=HKV, scale=D**-0.5, sliding_window=None,
                          kv_split=cpu_attn_split)
    cal.bind_layer(LAYER)
    return cal


def _step(problem, prof: ACTConfig, name: str = "act", covers_step: bool = False):
    group = SeqGroup(arm=Arm(name, prof), block_table=problem.block_table, seq_lens=problem.seq_lens,
                     query_start=problem.query_start, query_lens=problem.query_lens,
                     max_query_len=problem.max_query_len, max_seq_len=problem.max_seq_len)
    return types.SimpleNamespace(act_plan=StepPlan(groups=[group], covers_step=covers_step))


def _problem(heads: list[int], seed: int, query_lens=(1, 1, 5)):
    return make_problem([40, 23, 17], list(query_lens), num_heads=H, num_kv_heads=HKV, head_size=D,
                        heads=heads, seed=seed)


@pytest.mark.parametrize("query_lens", [(1, 1, 1), (1, 1, 5)], ids=["decode", "mixed"])
def test_layer_calibrator_matches_core(query_lens):
    state, prof = _state([0, 3])
    p = _problem([0, 3], seed=1, query_lens=query_lens)
    out = p.output.clone()
    _calibrator(state).apply(p.query, p.raw_cache, _step(p, prof), out.view(out.shape[0], -1))
    exp = p.expected(prof.beta, prof.threshold)
    assert _close(out, exp)
    assert not torch.equal(out, p.output)  # the sinks were there: calibration changed the heads


def test_layer_calibrator_caches_follow_the_cache_tensor_and_the_profile_content():
    state, prof = _state([0, 3])
    cal = _calibrator(state)
    a, b = _problem([0, 3], seed=2), _problem([0, 3], seed=3)  # same layout, other caches
    for p in (a, b, a):  # a new KV-cache tensor is never read through the views of the old one
        out = p.output.clone()
        cal.apply(p.query, p.raw_cache, _step(p, prof), out)
        assert _close(out, p.expected(prof.beta, prof.threshold))
    # A profile with the same name and other heads (a reconfiguration) gets its own heads.
    other = ACTConfig.from_any({"heads": {LAYER: [1]}, "beta": 0.3, "threshold": 0.1})
    state.configure(ACTEngineConfig.from_any({"profiles": {"act": other.to_dict()}}))
    p1 = _problem([1], seed=2)
    out = p1.output.clone()
    cal.apply(p1.query, p1.raw_cache, _step(p1, other), out)
    assert _close(out, p1.expected(other.beta, other.threshold))
    assert torch.equal(out[:, [0, 2, 3]], p1.output[:, [0, 2, 3]])  # heads 0 and 3 no longer touched


def test_arm_hash_is_the_profile_hash():
    _, prof = _state([0, 3])
    assert Arm("act", prof).hash == prof.hash
    assert Arm("act", prof) == Arm("act", prof.model_copy())


def test_profiling_accounts_only_when_switched_on():
    state, prof = _state([0, 3])
    cal = _calibrator(state)
    p = _problem([0, 3], seed=4, query_lens=(1, 1, 1))
    set_profiling(False)
    cal.apply(p.query, p.raw_cache, _step(p, prof), p.output.clone())
    assert timer.snapshot() == {}
    try:
        set_profiling(True)
        for _ in range(3):
            cal.apply(p.query, p.raw_cache, _step(p, prof), p.output.clone())
        mixed = _problem([0, 3], seed=4)
        cal.apply(mixed.query, mixed.raw_cache, _step(mixed, prof), mixed.output.clone())
        cal.apply(p.query, p.raw_cache, types.SimpleNamespace(act_plan=StepPlan()), p.output.clone())  # nothing to do
        snap = set_profiling(False)
    finally:
        set_profiling(False)
    assert snap["decode"]["calls"] == 3 and snap["prefill"]["calls"] == 1 and snap["decode"]["seconds"] > 0
    # no plan was built here (the metadata builder accounts those): the step count is 0
    assert per_kind(snap, "decode") == (snap["decode"]["seconds"], 0)
    assert timer.snapshot() == {} and not timer.enabled


def test_whole_layer_decode_computes_every_head_when_every_row_is_calibrated():
    state, prof = _state([0, 3])
    p = _problem([0, 3], seed=5, query_lens=(1, 1, 1))
    out = p.output.clone()
    rows = p.query_start.long()
    out[rows] = 0.0  # the native kernel did not run: every head must be written
    assert _calibrator(state).whole_layer(p.query, p.raw_cache, _step(p, prof, covers_step=True), out)
    assert _close(out, p.expected(prof.beta, prof.threshold))  # ACT on 0 and 3, plain attention on 1 and 2
    assert not torch.equal(out[rows][:, [0, 3]], p.output[rows][:, [0, 3]])


def test_whole_layer_computes_prefill_and_decode_rows_when_every_row_is_calibrated(monkeypatch):
    """A step with prefill rows (one of them after cached keys) and a decode row, every row
    calibrated: the CPU kernel's whole-layer prefill (the default) writes every head of every row."""
    monkeypatch.delenv("ACT_WHOLE_PREFILL", raising=False)
    state, prof = _state([0, 3])
    p = _problem([0, 3], seed=8, query_lens=(1, 9, 5))
    first = int(p.query_start.min())  # rows before it belong to other requests
    out = p.output.clone()
    out[first:] = 0.0  # the native kernel did not run: every head must be written
    assert _calibrator(state).whole_layer(p.query, p.raw_cache, _step(p, prof, covers_step=True), out)
    assert _close(out, p.expected(prof.beta, prof.threshold))  # ACT on 0 and 3, plain attention on 1 and 2
    assert torch.equal(out[:first], p.output[:first])
    assert not torch.equal(out[first:][:, [0, 3]], p.output[first:][:, [0, 3]])  # calibrated


@pytest.mark.parametrize("case", ["rows_without_act", "prefill_rows_reference_kernel", "prefill_rows_switched_off",
                                  "no_heads_in_layer"])
def test_whole_layer_declines_and_writes_nothing(case, monkeypatch):
    """The native kernel keeps the step where ACT may not compute all of it: rows of other
    arms (ACT off) in the step, prefill rows without a whole-layer prefill kernel (the torch
    reference: ``ACT_KERNEL=reference``; or switched off with ``ACT_WHOLE_PREFILL=0``), or no
    arm of the step calibrating this layer."""
    if case != "prefill_rows_switched_off":
        monkeypatch.delenv("ACT_WHOLE_PREFILL", raising=False)
    else:
        monkeypatch.setenv("ACT_WHOLE_PREFILL", "0")
    state, prof = _state([0, 3])
    if case == "no_heads_in_layer":
        other = ACTConfig.from_any({"heads": {LAYER + 1: [1]}, "beta": 0.3, "threshold": 0.1})
        state.configure(ACTEngineConfig.from_any({"profiles": {"act": prof.to_dict(), "other": other.to_dict()}}))
        prof = other
    if case == "prefill_rows_reference_kernel":
        monkeypatch.setenv("ACT_KERNEL", "reference")
    p = _problem([0, 3], seed=6, query_lens=(1, 1, 5) if case.startswith("prefill") else (1, 1, 1))
    out = p.output.clone()
    step = _step(p, prof, covers_step=case != "rows_without_act")
    assert not _calibrator(state).whole_layer(p.query, p.raw_cache, step, out)
    assert torch.equal(out, p.output)
