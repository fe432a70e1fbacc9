"""ACT under CUDA graphs, without a GPU: the
builders' declared graph support resolved by vLLM's own CompilationConfig, the device tables
a FULL graph reads (act_plugin.vllm.graph_plan) written from vLLM's CommonAttentionMetadata,
and what a captured layer launches (stand-in kernel). The CUDA backends' whole-layer decode
and FLASH_ATTN's native LSE are in test_vllm_cuda_backends.py. The kernel's per-row mode
itself is tested under Triton's interpreter (tests/test_kernels_triton_decode.py) and its
capture/replay on a GPU (tests/test_kernels_cuda.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.config import CompilationConfig, CUDAGraphMode  # noqa: E402
from vllm.config.compilation import CompilationMode  # noqa: E402
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata  # noqa: E402

import act_plugin.vllm.backends as backends  # noqa: E402
from act_plugin.config import ACTEngineConfig  # noqa: E402
from act_plugin.vllm.graph_plan import GRAPH_ATTR, GraphTables  # noqa: E402
from act_plugin.vllm.layer_calibrator import LayerCalibrator  # noqa: E402
from act_plugin.vllm.layer_support import ACTEngineError  # noqa: E402
from act_plugin.vllm.worker_state import Arm, TPSlice, WorkerState  # noqa: E402

L, H = 4, 8
PROFILES = {
    "a": {"beta": 0.4, "threshold": 0.1, "heads": {"1": [0, 3], "2": [5]}},
    "b": {"beta": 0.0, "threshold": 0.05, "heads": {"1": [7]}},
    "one": {"beta": 1.0, "heads": {"1": [2]}},  # beta 1 changes nothing
}
FIRST_TOKEN = {"rule": "first_token", "scale": 1.5, "heads": {"1": [1]}}


def _state(profiles=PROFILES) -> WorkerState:
    cfg = ACTEngineConfig.from_any({"profiles": profiles, "default": None})
    return WorkerState(engine_cfg=cfg, tp=TPSlice(0, H, L))


def _arm(state: WorkerState, name: str) -> Arm:
    return Arm(name, state.engine_cfg.profiles[name])


def _common(q_lens: list[int], seq_lens: list[int], req_idx=None, pad_to: int | None = None):
    """vLLM's CommonAttentionMetadata for a batch (padded rows: no query, no keys, as the V1
    runner pads a FULL graph's batch)."""
    n = len(q_lens)
    if pad_to is not None:
        q_lens = q_lens + [0] * (pad_to - n)
        seq_lens = seq_lens + [0] * (pad_to - n)
        n = pad_to
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=sl, num_reqs=n, num_actual_tokens=int(qsl[-1]),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), block_table_tensor=torch.arange(n * 4).view(n, 4),
        slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.long), seq_lens_cpu_upper_bound=sl,
        req_idx=None if req_idx is None else np.asarray(req_idx, dtype=np.int32),
    )


def _tables(state: WorkerState, max_rows: int = 6) -> GraphTables:
    return GraphTables(state, max_rows=max_rows, num_layers=L, num_heads=H, max_seq_len=4096, device="cpu")


# ----------------------------------------------------------------------------- graph tables
def test_tables_hold_each_rows_arm_and_each_arms_heads():
    state = _state()
    a, b, one = _arm(state, "a"), _arm(state, "b"), _arm(state, "one")
    state.arms.update({0: a, 1: b, 3: a, 4: one})  # slot 2: an uncalibrated request
    t = _tables(state)
    t.write_step(_common([1, 1, 1, 1, 1], [10, 20, 30, 40, 50]))
    rows = t.row_arm.tolist()
    assert rows[2] == -1 and rows[5] == -1  # uncalibrated row, row past the batch
    assert rows[0] == rows[3] != rows[1] and min(rows[0], rows[1], rows[4]) >= 0
    sa, sb, s1 = rows[0], rows[1], rows[4]
    assert t.beta[sa].item() == pytest.approx(0.4) and t.tau[sa].item() == pytest.approx(0.1)
    assert t.beta[sb].item() == 0.0 and t.tau[sb].item() == pytest.approx(0.05)
    flags = t.head_flags
    assert flags[sa, 1].nonzero().flatten().tolist() == [0, 3] and flags[sa, 2].nonzero().flatten().tolist() == [5]
    assert flags[sa, 0].sum() == 0 and flags[sa, 3].sum() == 0
    assert flags[sb, 1].nonzero().flatten().tolist() == [7] and flags[sb, 2].sum() == 0
    assert flags[s1].sum() == 0  # beta = 1: nothing to change, no head flagged
    view = t.row_arms(2)
    assert view.head_flags.shape == (t.slots, H) and view.head_flags.stride(1) == 1
    assert view.head_flags.data_ptr() == t.head_flags[:, 2].data_ptr()  # a view: a graph sees rewrites


def test_tables_are_rewritten_in_place_for_each_step():
    """Same tensors every step (a graph captured their addresses); rows of the previous,
    larger batch are reset; prefill rows and rows of other rules run no arm; MRV2's req_idx
    maps batch positions to request slots."""
    state = _state({**PROFILES, "ft": FIRST_TOKEN})
    state.arms.update({0: _arm(state, "a"), 1: _arm(state, "b"), 2: _arm(state, "ft"), 5: _arm(state, "a")})
    t = _tables(state)
    ptr = t.row_arm.data_ptr()
    t.write_step(_common([1] * 6, [9] * 6))
    assert (t.row_arm >= 0).tolist() == [True, True, False, False, False, True]
    t.write_step(_common([1, 7, 1], [9, 9, 9], req_idx=[5, 0, 1]))  # position 1 is a prefill row
    assert t.row_arm.data_ptr() == ptr
    slot_a = t.row_arm[0].item()
    assert t.row_arm.tolist() == [slot_a, -1, t.row_arm[2].item(), -1, -1, -1] and t.row_arm[2].item() >= 0
    t.write_step(_common([1, 1], [9, 9], pad_to=4))  # a graph's padded batch: padding runs no arm
    assert t.row_arm.tolist()[2:] == [-1] * 4


def test_a_slot_is_reused_only_from_arms_without_rows_in_the_step():
    state = _state({f"p{i}": {"beta": 0.1 * i, "heads": {"1": [i]}} for i in range(1, 6)})
    arms = {i: _arm(state, f"p{i + 1}") for i in range(5)}
    t = _tables(state, max_rows=3)
    state.arms.update({0: arms[0], 1: arms[1], 2: arms[2]})
    t.write_step(_common([1, 1, 1], [5, 5, 5]))
    first = t.row_arm.tolist()
    assert sorted(first) == [0, 1, 2]
    state.arms.clear()
    state.arms.update({0: arms[3], 1: arms[1], 2: arms[4]})  # p2 stays, two new arms take the others' slots
    t.write_step(_common([1, 1, 1], [5, 5, 5]))
    rows = t.row_arm.tolist()
    assert rows[1] == first[1] and sorted(rows) == [0, 1, 2]
    for pos, arm in ((0, arms[3]), (1, arms[1]), (2, arms[4])):
        slot = rows[pos]
        assert t.beta[slot].item() == pytest.approx(arm.config.beta)
        assert t.head_flags[slot, 1].nonzero().flatten().tolist() == list(arm.config.heads[1])
    # a new arm met before an arm of the step that holds the first slot does not take that slot
    held = {slot: pos for pos, slot in enumerate(rows)}
    first_slot_arm = arms[{0: 3, 1: 1, 2: 4}[held[0]]]
    state.arms.clear()
    state.arms.update({0: arms[0], 1: first_slot_arm, 2: arms[2]})  # p1 and p3 come back: no free slot
    t.write_step(_common([1, 1, 1], [5, 5, 5]))
    again = t.row_arm.tolist()
    assert again[1] == 0 and sorted(again) == [0, 1, 2]
    for pos, arm in ((0, arms[0]), (1, first_slot_arm), (2, arms[2])):
        assert t.beta[again[pos]].item() == pytest.approx(arm.config.beta)


# ----------------------------------------------------------------------------- a captured layer
class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


def _calibrator(state, monkeypatch, rows_kernel):
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.bind_decode_rows", lambda *a: rows_kernel)
    cal = LayerCalibrator(heads=state, num_heads=H, num_kv_heads=2, scale=0.125, sliding_window=None,
                          kv_split=lambda kv: (kv[..., :16], kv[..., 16:]))
    cal.bind_layer(2)
    return cal


def test_a_captured_layer_launches_the_per_row_kernel_on_vllms_persistent_tensors(monkeypatch):
    state = _state()
    t = _tables(state, max_rows=8)
    rec = _Recorder()
    cal = _calibrator(state, monkeypatch, rec)
    common = _common([1, 1], [5, 9], pad_to=4)
    metadata = SimpleNamespace(**{GRAPH_ATTR: common})
    q, out, kv = torch.zeros(4, H, 16), torch.zeros(4, H * 16), torch.zeros(3, 2, 16, 32)
    cal.decode_in_graph(q, kv, metadata, out, t)
    [args] = rec.calls
    query, o, kc, vc, table, seq_lens, qsl, row_arms, scale, window, max_seq_len = args
    assert query is q and o.shape == (4, H, 16) and o.data_ptr() == out.data_ptr()
    assert kc.data_ptr() == kv.data_ptr() and vc.data_ptr() == kv[..., 16:].data_ptr()
    assert table.shape[0] == 4 and table.data_ptr() == common.block_table_tensor.data_ptr()
    assert seq_lens is common.seq_lens and qsl is common.query_start_loc
    assert row_arms.row_arm is t.row_arm and row_arms.head_flags.data_ptr() == t.head_flags[:, 2].data_ptr()
    assert (scale, window, max_seq_len) == (0.125, None, 4096)


def test_the_graph_kernel_is_compiled_before_a_capture_and_writes_nothing(monkeypatch):
    """Eager decode steps (vLLM runs each graph size eagerly just before capturing it) launch
    the per-row kernel once per batch size, with every row off."""
    state = _state()
    t = _tables(state, max_rows=8)
    rec = _Recorder()
    cal = _calibrator(state, monkeypatch, rec)
    q, out, kv = torch.zeros(4, H, 16), torch.zeros(4, H, 16), torch.zeros(3, 2, 16, 32)
    for sizes in ([1, 1], [1, 1], [1, 1, 1], [1, 1]):
        cal.warm_graph_kernel(q, kv, SimpleNamespace(**{GRAPH_ATTR: _common(sizes, [5] * len(sizes))}), out, t)
    cal.warm_graph_kernel(q, kv, SimpleNamespace(), out, t)  # not a decode step of full graphs: nothing
    assert [c[4].shape[0] for c in rec.calls] == [2, 3]
    for c in rec.calls:
        assert c[7].row_arm is t.row_off and bool((t.row_off == -1).all())


def test_a_captured_layer_refuses_what_it_cannot_calibrate(monkeypatch):
    state = _state()
    cal = _calibrator(state, monkeypatch, _Recorder())
    q, out, kv = torch.zeros(2, H, 16), torch.zeros(2, H, 16), torch.zeros(3, 2, 16, 32)
    decode = SimpleNamespace(**{GRAPH_ATTR: _common([1, 1], [5, 9])})
    with pytest.raises(RuntimeError, match="without ACT's graph tables"):
        cal.decode_in_graph(q, kv, decode, out, None)
    with pytest.raises(RuntimeError, match="prefill rows"):
        cal.decode_in_graph(q, kv, SimpleNamespace(**{GRAPH_ATTR: _common([1, 3], [5, 9])}), out, _tables(state))
    with pytest.raises(RuntimeError, match="exceeds the graph tables"):
        cal.decode_in_graph(q, kv, decode, out, _tables(state, max_rows=1))
    cal_none = _calibrator(state, monkeypatch, None)
    with pytest.raises(RuntimeError, match="no per-row decode kernel"):
        cal_none.decode_in_graph(q, kv, decode, out, _tables(state))


# ----------------------------------------------------------------------------- declared support
def _graph_env(monkeypatch, *, cuda=True, kernel="triton", state=None):
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cuda", lambda: cuda)
    monkeypatch.setattr(backends, "kernel_name", lambda device: kernel)
    monkeypatch.setattr(backends, "init_worker_state", lambda cfg: state or _state())
    return SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16),
                           compilation_config=CompilationConfig(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE))


@pytest.mark.parametrize(("native", "declared"), [
    (AttentionCGSupport.ALWAYS, AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE),
    (AttentionCGSupport.UNIFORM_BATCH, AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE),
    (AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE, AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE),
    (AttentionCGSupport.NEVER, AttentionCGSupport.NEVER),
])
def test_builders_declare_single_token_decode_graphs(monkeypatch, native, declared):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    cfg = _graph_env(monkeypatch)
    spec = SimpleNamespace(dtype=torch.bfloat16)
    monkeypatch.setattr(FlashAttentionMetadataBuilder, "_cudagraph_support", native)
    builder = backends.act_builder(FlashAttentionMetadataBuilder)
    assert builder.get_cudagraph_support(cfg, spec) is declared
    assert backends.graph_support(native, cfg, spec) is declared


@pytest.mark.parametrize("why", ["not cuda", "reference kernel", "fp8 cache", "first_token"])
def test_builders_declare_no_graphs_where_act_cannot_run_in_them(monkeypatch, caplog, why):
    cfg = _graph_env(monkeypatch, cuda=why != "not cuda", kernel="reference" if why == "reference kernel" else "triton",
                     state=_state({**PROFILES, "ft": FIRST_TOKEN}) if why == "first_token" else None)
    spec = SimpleNamespace(dtype=torch.uint8 if why == "fp8 cache" else torch.bfloat16)
    backends._graph_notes.clear()
    with caplog.at_level("WARNING", logger="act_plugin"):
        assert backends.graph_support(AttentionCGSupport.ALWAYS, cfg, spec) is AttentionCGSupport.NEVER
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("act-plugin: no FULL CUDA graphs around attention (PIECEWISE instead): ")
    caplog.clear()
    backends._graph_notes.clear()
    cfg.compilation_config.cudagraph_mode = CUDAGraphMode.NONE  # e.g. a CPU engine: nothing to say
    with caplog.at_level("WARNING", logger="act_plugin"):
        assert backends.graph_support(AttentionCGSupport.NEVER, cfg, spec) is AttentionCGSupport.NEVER
    assert not caplog.records


@pytest.mark.parametrize(("mode", "support", "decode_full", "mixed_full"), [
    ("FULL_AND_PIECEWISE", AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE, True, False),
    ("FULL_DECODE_ONLY", AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE, True, False),
    ("FULL", AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE, True, False),
    ("FULL_AND_PIECEWISE", AttentionCGSupport.NEVER, False, False),
])
def test_vllm_resolves_the_declared_support(mode, support, decode_full, mixed_full):
    """vLLM's own resolution (CompilationConfig.resolve_cudagraph_mode_and_sizes, as its model
    runners call it with the builders' weakest support): full graphs for decode steps only,
    none where an ACT builder declares NEVER."""
    comp = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode[mode])
    comp.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
    resolved = comp.resolve_cudagraph_mode_and_sizes(support, "ACTFlashAttentionBackend")
    assert (resolved.decode_mode() == CUDAGraphMode.FULL) is decode_full
    assert (resolved.mixed_mode() == CUDAGraphMode.FULL) is mixed_full
    assert resolved != CUDAGraphMode.NONE


def test_a_first_token_profile_is_refused_while_full_decode_graphs_run():
    state = _state()
    state.full_decode_graphs = True
    with pytest.raises(ACTEngineError, match="profile 'ft' uses rule 'first_token'.*cudagraph_mode=PIECEWISE"):
        state.check(ACTEngineConfig.from_any({"profiles": {**PROFILES, "ft": FIRST_TOKEN}, "default": None}))
    state.check(ACTEngineConfig.from_any({"profiles": PROFILES, "default": None}))  # act profiles: fine
