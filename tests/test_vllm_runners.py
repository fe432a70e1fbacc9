"""Both model runners without an engine: the runner decision of the config hook, the V1 and
Model Runner V2 routing adapters on vLLM's own data structures, the step plan's batch
position -> slot mapping, and the start-up guards. Cheap: no engine starts here."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality  # noqa: E402

from act_plugin.config import ACTEngineConfig  # noqa: E402
from act_plugin.config.vocabulary import normalize_request_value  # noqa: E402
from act_plugin.vllm import register  # noqa: E402
from act_plugin.vllm.plan import build_step_plan  # noqa: E402
from act_plugin.vllm.router import (  # noqa: E402
    V1_ROUTER_FQCN,
    V2_ROUTER_FQCN,
    ACTRequestRouter,
    ACTRequestRouterV2,
)
from act_plugin.vllm.worker_state import WorkerState, worker_state  # noqa: E402

PROFILES = {"a": {"beta": 0.4, "heads": "2-27:0,4"}, "b": {"beta": 0.2, "heads": {"3": [1]}}}


def _engine_config(smollm2_path, additional_config, use_v2: bool, monkeypatch):
    """A real VllmConfig built through vLLM's EngineArgs, with the runner choice forced."""
    import vllm.config.vllm as vllm_config_module
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: use_v2))
    # What a CUDA machine has; MRV2's config validation checks it (nothing here runs Triton).
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    register()
    args = EngineArgs(model=smollm2_path, dtype="float32", max_model_len=512, gpu_memory_utilization=0.1,
                      enforce_eager=True, additional_config=additional_config)
    return args.create_engine_config()


@pytest.mark.parametrize("use_v2", [True, False])
def test_config_hook_loads_the_router_of_the_runner_in_use(smollm2_path, monkeypatch, use_v2):
    from vllm.v1.worker.gpu.sample.logits_processor.loader import build_custom_logits_processors_params_validator

    cfg = _engine_config(smollm2_path, {"act": {"profiles": PROFILES, "default": None}}, use_v2, monkeypatch)
    procs = list(cfg.model_config.logits_processors)
    assert procs == [V2_ROUTER_FQCN if use_v2 else V1_ROUTER_FQCN]
    if use_v2:
        # The exact check Model Runner V2 runs at engine start (the reproduction):
        # it used to raise "ACTRequestRouter is not a subclass of ...LogitsProcessor".
        validate = build_custom_logits_processors_params_validator(procs)
        validate(vllm.SamplingParams(extra_args={"act": "a"}))
        with pytest.raises(Exception, match="unknown ACT profile 'zzz'"):
            validate(vllm.SamplingParams(extra_args={"act": "zzz"}))
    else:
        from vllm.v1.sample.logits_processor import build_logitsprocs  # noqa: F401  (V1 loader exists)


def test_v1_router_is_not_a_v2_processor():
    """Why the V2 router exists: MRV2's loader refuses the V1 interface outright."""
    from vllm.v1.worker.gpu.sample.logits_processor.loader import build_custom_logits_processors_params_validator

    with pytest.raises(ValueError, match="not a subclass"):
        build_custom_logits_processors_params_validator([V1_ROUTER_FQCN])


def test_act_false_ignores_act_config_env(smollm2_path, monkeypatch, tmp_path):
    """ACT_CONFIG in the environment must not calibrate an engine started with act: false."""
    cfg_file = tmp_path / "act.yaml"
    cfg_file.write_text("heads: '2-27:0,4'\n")
    monkeypatch.setenv("ACT_CONFIG", str(cfg_file))
    from act_plugin.vllm.config_source import read_engine_settings
    from act_plugin.vllm.frontend_state import frontend_state

    assert read_engine_settings({"act": False}) is None
    assert read_engine_settings({}).source == f"ACT_CONFIG={cfg_file}"
    cfg = _engine_config(smollm2_path, {"act": False}, False, monkeypatch)
    assert not cfg.model_config.logits_processors  # no router: vanilla engine
    assert frontend_state.engine_cfg is None and frontend_state.explicitly_off
    from act_plugin.vllm.router import validate_request

    with pytest.raises(ValueError, match="ACT is explicitly off"):
        validate_request(vllm.SamplingParams(extra_args={"act": "on"}))


# ----------------------------------------------------------------------------- CUDA graphs
# (mode, what the config hook leaves): FULL graphs of decode steps stay (their layers read
# ACT's device tables, act_plugin.vllm.graph_plan); FULL graphs of mixed/prefill steps would
# bake in a stale host plan, so FULL becomes FULL_AND_PIECEWISE.
GRAPH_MODES = [
    ("FULL", "FULL_AND_PIECEWISE"), ("FULL_AND_PIECEWISE", "FULL_AND_PIECEWISE"),
    ("FULL_DECODE_ONLY", "FULL_DECODE_ONLY"), ("PIECEWISE", "PIECEWISE"), ("NONE", "NONE"),
]


def _on_cuda(monkeypatch, cuda: bool, rocm: bool = False) -> None:
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cuda_alike", lambda: cuda)
    monkeypatch.setattr(current_platform, "is_rocm", lambda: rocm)


@pytest.mark.parametrize(("mode", "kept"), GRAPH_MODES)
def test_full_cuda_graphs_stay_for_decode_steps(monkeypatch, mode, kept):
    from vllm.config import CompilationConfig, CUDAGraphMode

    from act_plugin.vllm.config_hook import _limit_cuda_graphs

    _on_cuda(monkeypatch, True)
    monkeypatch.delenv("ACT_KERNEL", raising=False)
    vllm_config = SimpleNamespace(compilation_config=CompilationConfig(cudagraph_mode=CUDAGraphMode[mode]))
    changed = _limit_cuda_graphs(vllm_config, ACTEngineConfig.from_any({"profiles": PROFILES, "default": None}))
    assert vllm_config.compilation_config.cudagraph_mode is CUDAGraphMode[kept]
    assert changed == ([] if mode == kept else [f"CUDA graphs {mode} -> {kept} (full graphs for decode steps only)"])


FIRST_TOKEN = {"rule": "first_token", "scale": 1.5, "heads": "2-27:*"}


@pytest.mark.parametrize("why", ["first_token", "ACT_KERNEL=reference", "rocm"])
@pytest.mark.parametrize("mode", ["FULL", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"])
def test_full_cuda_graphs_are_lowered_where_act_cannot_run_in_them(monkeypatch, mode, why):
    """A first_token profile (computed on the host plan after attention), a kernel without a
    per-row mode, or ROCm: every mode with full graphs becomes PIECEWISE, and says why."""
    from vllm.config import CompilationConfig, CUDAGraphMode

    from act_plugin.vllm.config_hook import _limit_cuda_graphs

    _on_cuda(monkeypatch, True, rocm=why == "rocm")
    monkeypatch.delenv("ACT_KERNEL", raising=False)
    if why.startswith("ACT_KERNEL"):
        monkeypatch.setenv("ACT_KERNEL", "reference")
    profiles = {**PROFILES, "ft": FIRST_TOKEN} if why == "first_token" else PROFILES
    vllm_config = SimpleNamespace(compilation_config=CompilationConfig(cudagraph_mode=CUDAGraphMode[mode]))
    [changed] = _limit_cuda_graphs(vllm_config, ACTEngineConfig.from_any({"profiles": profiles, "default": None}))
    assert vllm_config.compilation_config.cudagraph_mode is CUDAGraphMode.PIECEWISE
    assert changed.startswith(f"CUDA graphs {mode} -> PIECEWISE (attention runs eagerly: ")
    assert {"first_token": "rule 'first_token'", "ACT_KERNEL=reference": "ACT_KERNEL=reference",
            "rocm": "CUDA only"}[why] in changed


@pytest.mark.parametrize("mode", [mode for mode, _ in GRAPH_MODES])
def test_cuda_graph_mode_is_left_alone_off_cuda(monkeypatch, mode):
    from vllm.config import CompilationConfig, CUDAGraphMode

    from act_plugin.vllm.config_hook import _limit_cuda_graphs

    _on_cuda(monkeypatch, False)
    vllm_config = SimpleNamespace(compilation_config=CompilationConfig(cudagraph_mode=CUDAGraphMode[mode]))
    assert _limit_cuda_graphs(vllm_config) == []
    assert vllm_config.compilation_config.cudagraph_mode is CUDAGraphMode[mode]


def test_graph_mode_change_is_logged_with_the_engine_settings(smollm2_path, monkeypatch, caplog):
    """Through the whole config hook, on a real engine config: the change is applied and named
    in the one "ACT on" line."""
    from vllm.config import CUDAGraphMode

    from act_plugin.vllm.config_hook import apply_engine_settings

    cfg = _engine_config(smollm2_path, {"act": {"profiles": PROFILES, "default": None}}, False, monkeypatch)
    cfg.compilation_config.cudagraph_mode = CUDAGraphMode.FULL
    _on_cuda(monkeypatch, True)
    monkeypatch.delenv("ACT_KERNEL", raising=False)
    with caplog.at_level("INFO", logger="act_plugin"):
        apply_engine_settings(cfg)
    assert cfg.compilation_config.cudagraph_mode is CUDAGraphMode.FULL_AND_PIECEWISE
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("act-plugin: ACT on")]
    assert "CUDA graphs FULL -> FULL_AND_PIECEWISE (full graphs for decode steps only)" in line


# ----------------------------------------------------------------------------- routing adapters
@pytest.fixture
def state():
    """The module-level worker state, configured with two profiles and restored afterwards."""
    saved = (worker_state.engine_cfg, dict(worker_state.arms), worker_state.preemptions, dict(worker_state.retired))
    worker_state.engine_cfg = ACTEngineConfig.from_any({"profiles": PROFILES, "default": "a"})
    worker_state.retired.clear()
    worker_state.readmitted.clear()
    yield worker_state
    worker_state.engine_cfg, arms, worker_state.preemptions, retired = saved
    worker_state.arms.clear()
    worker_state.arms.update(arms)
    worker_state.retired.clear()
    worker_state.retired.update(retired)


def _common(q_lens, seq_lens, req_idx=None, blocks_per_seq=4):
    n = len(q_lens)
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    bt = torch.arange(n * blocks_per_seq, dtype=torch.int32).view(n, blocks_per_seq) + 100
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=sl, num_reqs=n,
        num_actual_tokens=int(qsl[-1]), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        block_table_tensor=bt, slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.long),
        seq_lens_cpu_upper_bound=sl.clone(), req_idx=None if req_idx is None else np.asarray(req_idx),
    )


def _groups(plan):
    return {(g.arm.profile, g.max_query_len == 1): (g.query_start.tolist(), g.seq_lens.tolist(),
                                                     g.block_table[:, 0].tolist()) for g in plan.groups}


def test_v2_router_and_plan_map_batch_positions_to_slots(state):
    """MRV2: add_request keys the arm by request slot; the step's req_idx (batch position ->
    slot, as vLLM passes it in CommonAttentionMetadata) picks each row's arm."""
    req_states = SimpleNamespace(prompt_len=SimpleNamespace(np=np.array([5, 7, 3, 9, 4])),
                                 prefill_len=SimpleNamespace(np=np.array([5, 7, 3, 9, 4])))
    router = ACTRequestRouterV2(None, req_states)
    assert router.add_request(3, vllm.SamplingParams(extra_args={"act": "b"})) is False  # never touches logits
    router.add_request(0, vllm.SamplingParams())  # no value: the default profile 'a'
    router.add_request(4, vllm.SamplingParams(extra_args={"act": "off"}))
    router.add_request(1, vllm.SamplingParams(extra_args={"act": 1}))  # HTTP true -> default
    assert state.runner == "v2"
    assert set(state.arms) == {0, 1, 3}
    # Batch order differs from slot order: positions 0..3 hold slots 4, 3, 0, 1.
    common = _common(q_lens=[1, 6, 1, 3], seq_lens=[10, 6, 20, 3], req_idx=[4, 3, 0, 1])
    plan = build_step_plan(state, common, torch.device("cpu"), head_size=64, max_heads=9)
    assert _groups(plan) == {
        ("b", False): ([1], [6], [104]),          # slot 3 at position 1 (prefill)
        ("a", True): ([7], [20], [108]),          # slot 0 at position 2 (decode)
        ("a", False): ([8], [3], [112]),          # slot 1 at position 3 (prefill)
    }
    assert not plan.covers_step  # slot 4 (position 0) runs without ACT
    # A recycled slot is overwritten, never inherited.
    router.add_request(3, vllm.SamplingParams(extra_args={"act": "off"}))
    assert 3 not in state.arms


RULE_PROFILES = {
    "a": {"beta": 0.4, "heads": "2-27:0,4"},
    "zt": {"rule": "first_token", "scale": 1.5, "heads": "2-27:*"},
    "zth": {"rule": "first_token", "scale": {"2-14:*": 1.8, "15-27:0,4,8": 0.4}},
}


def _rule_groups(plan):
    """(profile, decode) -> (query starts, seq lens, first block, gamma of layer 15 head 4)."""
    return {(g.arm.profile, g.max_query_len == 1): (g.query_start.tolist(), g.seq_lens.tolist(),
                                                     g.block_table[:, 0].tolist(), g.arm.config.head_scales(15, [4]))
            for g in plan.rule_groups}


def test_v2_router_and_plan_sort_rule_arms_by_slot(state):
    """MRV2 with act, first_token (scalar and per-head gamma) and off requests at scattered
    slots: each batch row lands in the group of its slot's arm (act rows in ``groups``,
    first_token rows in ``rule_groups`` with their profile's gammas), and rows follow their
    slot when the step's req_idx order changes."""
    state.engine_cfg = ACTEngineConfig.from_any({"profiles": RULE_PROFILES, "default": None})
    state.version += 1  # as configure() does: the per-version caches (rules in force) start anew
    try:
        req_states = SimpleNamespace(prompt_len=SimpleNamespace(np=np.full(12, 4)),
                                     prefill_len=SimpleNamespace(np=np.full(12, 4)))
        router = ACTRequestRouterV2(None, req_states)
        for slot, value in ((7, "a"), (2, "zt"), (5, "zth"), (0, "off"), (9, "zt"), (11, None)):
            sp = vllm.SamplingParams(extra_args={} if value is None else {"act": value})
            assert router.add_request(slot, sp) is False
        assert {s: a.profile for s, a in state.arms.items()} == {7: "a", 2: "zt", 5: "zth", 9: "zt"}
        assert state.other_rules_in_force()
        # positions 0..5 hold slots 5, 9, 0, 2, 7, 11; zt's rows (positions 1 and 3) are not adjacent
        common = _common(q_lens=[1, 1, 4, 1, 6, 1], seq_lens=[30, 12, 4, 8, 6, 9], req_idx=[5, 9, 0, 2, 7, 11])
        plan = build_step_plan(state, common, torch.device("cpu"), head_size=64, max_heads=9)
        assert _groups(plan) == {("a", False): ([7], [6], [116])}
        assert _rule_groups(plan) == {
            ("zth", True): ([0], [30], [100], [0.4]),
            ("zt", True): ([1, 6], [12, 8], [104, 112], [1.5]),
        }
        assert all(g.arm.rule == "first_token" for g in plan.rule_groups)
        assert not plan.covers_step  # slots 0 (off) and 11 (no value, no default) run without ACT
        # Next step: the runner orders the batch differently; the off and uncalibrated requests left.
        common = _common(q_lens=[1, 1, 1, 1], seq_lens=[9, 31, 13, 7], req_idx=[2, 5, 7, 9])
        plan = build_step_plan(state, common, torch.device("cpu"), head_size=64, max_heads=9)
        assert _groups(plan) == {("a", True): ([2], [13], [108])}
        assert _rule_groups(plan) == {
            ("zt", True): ([0, 3], [9, 7], [100, 112], [1.5]),
            ("zth", True): ([1], [31], [104], [0.4]),
        }
        assert plan.covers_step and plan.rule_groups  # every row calibrated, but not all by ACT
        # A recycled slot takes its new occupant's arm: slot 9 now runs act.
        router.add_request(9, vllm.SamplingParams(extra_args={"act": "a"}))
        plan = build_step_plan(state, common, torch.device("cpu"), head_size=64, max_heads=9)
        assert _groups(plan) == {("a", True): ([2, 3], [13, 7], [108, 112])}
        assert _rule_groups(plan) == {("zt", True): ([0], [9], [100], [1.5]),
                                      ("zth", True): ([1], [31], [104], [0.4])}
    finally:
        state.arms.clear()
        state.version += 1  # the fixture restores the act-only profiles: drop the caches of these


def test_v2_router_counts_resumed_requests(state):
    req_states = SimpleNamespace(prompt_len=SimpleNamespace(np=np.array([5, 5])),
                                 prefill_len=SimpleNamespace(np=np.array([5, 9])))
    router = ACTRequestRouterV2(None, req_states)
    before = state.preemptions
    router.add_request(0, vllm.SamplingParams(extra_args={"act": "a"}))
    router.add_request(1, vllm.SamplingParams(extra_args={"act": "a"}))  # came back with 4 output tokens
    assert state.preemptions == before + 1


def test_v1_router_follows_batch_updates(state):
    router = ACTRequestRouter(None, torch.device("cpu"), False)
    assert state.runner == "v1"
    sp = lambda v: vllm.SamplingParams(extra_args={} if v is None else {"act": v})  # noqa: E731
    before = state.preemptions
    router.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, sp("b"), [1, 2], []), (1, sp(None), [1], []), (2, sp("off"), [1], [])]))
    assert {i: a.profile for i, a in state.arms.items()} == {0: "b", 1: "a"}
    router.update_state(BatchUpdate(batch_size=3, removed=[0], added=[(0, sp("a"), [1], [7, 8])],
                                    moved=[(0, 2, MoveDirectionality.SWAP)]))
    # row 0 got a re-added 'a' request (prompt [1], outputs [7, 8]), then rows 0 and 2 swapped
    assert {i: a.profile for i, a in state.arms.items()} == {1: "a", 2: "a"}
    assert state.preemptions == before and state.readmitted == {2: 1}
    # its next step recomputes all 3 tokens in one prefill: it was preempted
    build_step_plan(state, _common(q_lens=[1, 1, 3], seq_lens=[4, 9, 3]), torch.device("cpu"), head_size=64,
                    max_heads=9)
    assert state.preemptions == before + 1 and not state.readmitted
    # a request that only sat out a step (pipeline micro-batches) comes back decoding: not counted
    router.update_state(BatchUpdate(batch_size=3, removed=[1], added=[(1, sp("a"), [1, 2], [5])], moved=[]))
    build_step_plan(state, _common(q_lens=[1, 1, 1], seq_lens=[4, 4, 9]), torch.device("cpu"), head_size=64,
                    max_heads=9)
    assert state.preemptions == before + 1 and not state.readmitted
    router.update_state(BatchUpdate(batch_size=2, removed=[], added=[],
                                    moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert sorted(state.arms) == [0, 1]
    # V1: batch position i is persistent row i
    plan = build_step_plan(state, _common(q_lens=[1, 1], seq_lens=[4, 9]), torch.device("cpu"), head_size=64,
                           max_heads=9)
    assert _groups(plan) == {("a", True): ([0, 1], [4, 9], [100, 104])}
    assert plan.covers_step and plan.is_decode_only  # a layer may compute this step whole


def test_running_request_keeps_its_arm_across_reconfiguration(state):
    """A profile removed at runtime keeps serving requests admitted before the removal."""
    router = ACTRequestRouterV2(None, SimpleNamespace())
    router.add_request(0, vllm.SamplingParams(extra_args={"act": "b"}))
    state.configure(ACTEngineConfig.from_any({"profiles": {"c": PROFILES["a"]}, "default": None}))
    assert state.arms[0].profile == "b" and 3 in state.calibrated_layers()
    # A request the front end validated just before the removal still gets 'b'.
    router.add_request(1, vllm.SamplingParams(extra_args={"act": "b"}))
    assert state.arms[1].config == ACTEngineConfig.from_any({"profiles": PROFILES}).profiles["b"]


def test_plan_splits_groups_to_bound_transient_memory(state, monkeypatch):
    monkeypatch.setenv("ACT_MAX_TRANSIENT_MB", "1")
    router = ACTRequestRouter(None, torch.device("cpu"), False)
    router.update_state(BatchUpdate(batch_size=4, removed=[], moved=[],
                                    added=[(i, vllm.SamplingParams(extra_args={"act": "a"}), [1], []) for i in range(4)]))
    # 2 (K,V) * 9 heads * 64 dims * 4 bytes = 4.5 KiB per key: 1 MiB holds 227 keys of padding.
    plan = build_step_plan(state, _common(q_lens=[1] * 4, seq_lens=[100, 100, 100, 150]), torch.device("cpu"),
                           head_size=64, max_heads=9)
    assert [g.query_start.tolist() for g in plan.groups] == [[0, 1], [2], [3]]


def test_http_booleans_read_as_booleans():
    assert normalize_request_value(1) is True and normalize_request_value(0) is False
    assert normalize_request_value(2) == 2 and normalize_request_value("a") == "a"
    cfg = ACTEngineConfig.from_any({"profiles": PROFILES, "default": "a"})
    assert cfg.resolve_request(normalize_request_value(1)) == "a"
    assert cfg.resolve_request(normalize_request_value(0)) is None


# ----------------------------------------------------------------------------- guards
def test_unwrapped_backend_is_refused_when_act_is_on():
    from vllm.config import VllmConfig, set_current_vllm_config

    from act_plugin.vllm import BACKEND_WRAPPERS
    from act_plugin.vllm.layer_support import ACTEngineError, check_backend_choice

    sel = SimpleNamespace(attn_type="decoder", use_mla=False)
    flex = "vllm.v1.attention.backends.flex_attention.FlexAttentionBackend"
    act_cfg = VllmConfig(additional_config={"act": {"heads": {"3": [1]}}})
    with set_current_vllm_config(act_cfg):
        with pytest.raises(ACTEngineError, match=r"FlexAttentionBackend.*--attention-backend CPU_ATTN\|FLASHINFER\|FLASH_ATTN\|TRITON_ATTN"):
            check_backend_choice(flex, sel)
        check_backend_choice(BACKEND_WRAPPERS["FLASH_ATTN"], sel)  # wrapped: fine
        check_backend_choice(flex, SimpleNamespace(attn_type="encoder_only", use_mla=False))  # judged per layer
    with set_current_vllm_config(VllmConfig(additional_config={"act": False})):
        check_backend_choice(flex, sel)  # ACT off: none of our business


def test_profiles_touching_unsupported_layers_are_refused():
    """The capability table, as the start-up check and runtime reconfiguration apply it."""
    from act_plugin.vllm.layer_support import ACTEngineError, check_profiles_against_layers

    def row(layer, **kw):
        base = {"layer_name": f"model.layers.{layer}.self_attn.attn", "layer": layer, "kind": "attention",
                "attn_type": "decoder", "backend": "CPU_ATTN", "impl": "ACTImpl", "calibrator": True, "unsupported": []}
        return {**base, **kw}

    rows = [row(0), row(1, unsupported=["it uses logit soft-capping"]), row(2, calibrator=False, backend="FLEX_ATTENTION")]
    check_profiles_against_layers(ACTEngineConfig.from_any({"heads": {"0": [1]}}), rows)
    with pytest.raises(ACTEngineError, match="layer 1 .*logit soft-capping"):
        check_profiles_against_layers(ACTEngineConfig.from_any({"heads": {"1": [1]}}), rows)
    with pytest.raises(ACTEngineError, match="layer 2 .*FLEX_ATTENTION.*does not wrap.*--attention-backend"):
        check_profiles_against_layers(ACTEngineConfig.from_any({"heads": {"2": [1]}}), rows)
    with pytest.raises(ACTEngineError, match="layer 3: the model registers no attention layer"):
        check_profiles_against_layers(ACTEngineConfig.from_any({"heads": {"3": [1]}}), rows)
    # A state holding these rows refuses the same profile at runtime, changing nothing.
    st = WorkerState(layers=rows)
    st.engine_cfg = ACTEngineConfig.from_any({"heads": {"0": [1]}})
    with pytest.raises(ACTEngineError):
        st.configure(ACTEngineConfig.from_any({"heads": {"1": [1]}}))
    assert st.engine_cfg == ACTEngineConfig.from_any({"heads": {"0": [1]}})


# ----------------------------------------------------------------------------- runtime control
class _FakeEngine:
    """Answers collective_rpc like workers; the first act_set_config can be made to fail."""

    def __init__(self, fail_first_set=False, is_async=False):
        self.cfg = {"profiles": {"a": {"heads": {"1": [0]}}}, "default": None}
        self.fail_first_set, self.is_async, self.calls = fail_first_set, is_async, []

    def _answer(self, method, args):
        self.calls.append(method)
        if method == "act_set_config":
            if self.fail_first_set and self.calls.count("act_set_config") == 1:
                raise RuntimeError("worker 1 failed")
            self.cfg = args[0]
        return [self.cfg if method != "act_check_config" else None]

    def collective_rpc(self, method, args=()):
        if self.is_async:
            async def later():
                return self._answer(method, args)
            return later()
        return self._answer(method, args)


def test_control_rolls_back_and_guards_the_front_end(monkeypatch):
    import asyncio

    from act_plugin.vllm import control
    from act_plugin.vllm.frontend_state import frontend_state

    monkeypatch.setattr(control, "_act_on", lambda engine: True)
    monkeypatch.setattr(control, "_validated", lambda engine, cfg: ACTEngineConfig.from_any(cfg))
    old = ACTEngineConfig.from_any({"profiles": {"a": {"heads": {"1": [0]}}}, "default": None})
    monkeypatch.setattr(frontend_state, "engine_cfg", old)
    new = {"profiles": {"x": {"heads": {"2": [1]}}}, "default": "x"}

    eng = _FakeEngine(fail_first_set=True)
    with pytest.raises(RuntimeError, match="worker 1 failed"):
        control.set_act_config(eng, new)
    assert eng.calls == ["act_get_config", "act_check_config", "act_set_config", "act_set_config"]  # rolled back
    assert ACTEngineConfig.from_any(eng.cfg) == old and frontend_state.engine_cfg == old

    eng = _FakeEngine(is_async=True)
    with pytest.raises(TypeError, match="await control.aset_act_config"):
        control.set_act_config(eng, new)
    assert eng.calls == [] and frontend_state.engine_cfg == old  # nothing reached the workers
    got = asyncio.run(control.aset_act_config(eng, new))
    assert got.default == "x" and frontend_state.engine_cfg == got
    assert set(asyncio.run(control.aget_act_config(eng)).profiles) == {"x"}
