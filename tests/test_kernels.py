"""The paged calibration kernels (act_plugin.kernels) against the core maths.

Each problem is a group of sequences in a real backend layout (CPU_ATTN: keys stored
transposed per tile; FLASH_ATTN/TRITON_ATTN: K and V interleaved, padded head size), with
shuffled and padded block tables and rows of other requests in the flat query. The
expected answer is computed by :mod:`act_plugin.core` from the dense keys and values the
cache was filled with (no gather involved). The fused CPU kernel is compiled on first use
(about 30 s once per machine; cached in torch's extension directory).
"""

from __future__ import annotations

import logging
import zlib

import pytest
import torch

from act_plugin import kernels
from act_plugin.kernels import calibrate_paged, calibrate_paged_reference, cpu
from act_plugin.kernels.testing import LAYOUTS, make_problem

# max |error| allowed relative to max |o|: float32 statistics everywhere; 16-bit inputs and
# outputs add their rounding (the output-space form amplifies the native output's
# rounding by at most 1 + (1 - beta) * P_S / N, bounded by the recompute cut).
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}

SCENARIOS = {
    # name: (seq_lens, query_lens, window)
    "decode": ([37, 130, 5, 64], [1, 1, 1, 1], None),
    "prefill": ([40, 70], [40, 70], None),
    "prefill_with_cached_prefix": ([90, 33], [25, 1], None),  # mixed: a prefill and a decode row
    "mixed_window": ([60, 45, 20], [60, 1, 7], 9),
    "decode_window": ([100, 17], [1, 1], 16),
    # entries with no rows (a padded, fixed-size group, as CUDA-graph capture would use) do nothing
    "padded_group": ([40, 1, 66, 1], [1, 0, 12, 0], None),
}


@pytest.fixture(autouse=True)
def _fused_cpu(monkeypatch):
    monkeypatch.setenv("ACT_KERNEL", "cpu")
    monkeypatch.delenv("ACT_WHOLE_PREFILL", raising=False)  # the default: whole-layer prefill on
    if cpu.load() is None:  # pragma: no cover - a machine without a compiler
        pytest.fail(f"the fused CPU kernel did not build: {cpu._state.get('error')}")


def _run(p, beta, threshold, fn=calibrate_paged, **extra):
    return p.calibrated(fn, beta, threshold, **extra)


def _check(p, got, beta, threshold, dtype):
    err, scale, exp = p.error_vs_core(got, beta, threshold)
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} (scale {scale:.3g})"
    # the blocked core path gives the same answer as the dense one it is checked against
    blocked = p.expected(beta, threshold, blocked_elems=256)
    assert (blocked - exp).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_cpu_matches_core(layout, scenario, dtype):
    seq_lens, query_lens, window = SCENARIOS[scenario]
    p = make_problem(seq_lens, query_lens, layout=layout, dtype=dtype, window=window, sink_strength=1.5,
                     seed=zlib.crc32(f"{layout}{scenario}".encode()) % 1000)
    got = _run(p, 0.4, 0.1)
    assert not torch.equal(got, p.output), "the problem has sinks: something must change"
    _check(p, got, 0.4, 0.1, dtype)


@pytest.mark.parametrize("ratio", [1, 3, 4])  # query heads per KV head
@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_gqa_and_beta(ratio, beta):
    p = make_problem([50, 81, 9], [1, 30, 9], num_heads=2 * ratio, num_kv_heads=2, heads=list(range(2 * ratio)),
                     sink_strength=2.0, seed=ratio)
    _check(p, _run(p, beta, 0.08), beta, 0.08, torch.float32)


@pytest.mark.parametrize("strength", [3.0, 6.0, 12.0])
@pytest.mark.parametrize("cut", [None, 0.0, 1.01])
def test_rows_whose_nonsink_mass_vanishes(strength, cut):
    """Strong sinks: rows with tiny non-sink mass N (recomputed from all columns below the
    cut, left unchanged at N <= eps), checked against core whatever the cut."""
    p = make_problem([70, 40], [70, 1], sink_positions=(0, 2, 5), sink_strength=strength, seed=7)
    got = _run(p, 0.4, 0.1, recompute_below=cut)
    exp = p.expected(0.4, 0.1)
    # The output-space form on every row (cut 0) loses ~ulp(o)/N on rows with small N.
    tol = 2e-4 if cut != 0.0 else 2e-4 + (1e-3 if strength > 3 else 0.0)
    assert (got - exp).abs().max().item() <= tol * exp.abs().max().item()


def test_vanishing_rows_are_left_unchanged():
    """A sink so strong that the non-sink mass is below float32 resolution: core leaves the
    row as it is, and so must the kernel (the native output, bit for bit)."""
    p = make_problem([30], [1], sink_positions=(4,), sink_strength=40.0, heads=[0], seed=3)
    got = _run(p, 0.4, 0.1)
    assert torch.equal(got, p.output)
    assert torch.allclose(p.expected(0.4, 0.1), p.output, atol=1e-5)  # core agrees: unchanged
    # ... while the same row with a weaker sink is calibrated
    p2 = make_problem([30], [1], sink_positions=(4,), sink_strength=2.0, heads=[0], seed=3)
    assert not torch.equal(_run(p2, 0.4, 0.1), p2.output)


@pytest.mark.parametrize("scenario", ["decode", "prefill", "mixed_window"])
def test_no_sinks_and_beta_one_change_nothing(scenario):
    seq_lens, query_lens, window = SCENARIOS[scenario]
    p = make_problem(seq_lens, query_lens, window=window, seed=11)
    assert torch.equal(_run(p, 0.4, 1.0), p.output)  # no key gets more than all the attention
    assert torch.equal(_run(p, 1.0, 0.1), p.output)


def test_only_calibrated_rows_and_heads_change():
    p = make_problem([64, 33, 20], [64, 1, 5], num_heads=6, num_kv_heads=3, heads=[1, 4], extra_rows=3,
                     sink_strength=2.0, seed=5)
    got = _run(p, 0.4, 0.1)
    untouched = [h for h in range(6) if h not in (1, 4)]
    assert torch.equal(got[:, untouched], p.output[:, untouched])
    assert torch.equal(got[:3], p.output[:3])  # rows of other requests
    assert not torch.equal(got[3:, [1, 4]], p.output[3:, [1, 4]])


@pytest.mark.parametrize("scenario", ["decode", "prefill", "mixed_window"])
def test_rows_with_scores_hundreds_apart(scenario):
    """Scores spread over hundreds within a row: each row's max must be the max over all its
    keys (those past the last 16-key stride, and key 11, a sink here, in the second 8-lane
    accumulator), or exp(s - max) overflows for the key it missed. Prompt lengths are not
    multiples of 16. (Both faults, planted one at a time, fail this test.)"""
    seq_lens, query_lens, window = SCENARIOS[scenario]
    p = make_problem(seq_lens, query_lens, window=window, sink_positions=(0, 11), sink_strength=1.5,
                     query_gain=200.0, seed=13)
    got = _run(p, 0.4, 0.1)
    assert torch.isfinite(got).all()
    _check(p, got, 0.4, 0.1, torch.float32)


@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("seq_len, query_len", [(300, 300), (333, 301)])
def test_prompt_longer_than_one_row_block(seq_len, query_len, window):
    """Prefill rows in several blocks (pass 1 is blocked over rows, 60 at a time, over keys
    packed in panels of 16): bands that start inside a panel (windows), a last panel cut
    short, a last row block not a multiple of the 6-row tile, rows after cached keys."""
    p = make_problem([seq_len], [query_len], num_heads=2, num_kv_heads=1, heads=[0, 1], block_size=32,
                     sink_strength=1.5, window=window, seed=2)
    _check(p, _run(p, 0.4, 0.1), 0.4, 0.1, torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_equals_reference(layout):
    p = make_problem([48, 100, 7], [1, 20, 7], layout=layout, window=12, sink_strength=1.5, seed=9)
    got = _run(p, 0.3, 0.1)
    ref = _run(p, 0.3, 0.1, fn=calibrate_paged_reference)
    assert (got - ref).abs().max().item() <= 2e-4 * ref.abs().max().item()


def test_reference_is_forced_by_env(monkeypatch):
    monkeypatch.setenv("ACT_KERNEL", "reference")
    assert kernels.kernel_name(torch.device("cpu")) == "reference"
    monkeypatch.setenv("ACT_KERNEL", "auto")
    assert kernels.kernel_name(torch.device("cpu")) == "cpu"
    monkeypatch.setenv("ACT_KERNEL", "bogus")
    with pytest.raises(ValueError):
        kernels.kernel_name(torch.device("cpu"))


def test_unavailable_kernel_falls_back_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(kernels, "_cpu_op", None)
    monkeypatch.setenv("ACT_KERNEL_NO_BUILD", "1")
    monkeypatch.setenv("ACT_KERNEL", "auto")
    p = make_problem([40, 9], [1, 9], sink_strength=1.5, seed=4)
    with caplog.at_level(logging.WARNING, logger="act_plugin.kernels"):
        got = [_run(p, 0.4, 0.1) for _ in range(3)]
    lines = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    ref = _run(p, 0.4, 0.1, fn=calibrate_paged_reference)
    assert all(torch.equal(g, ref) for g in got)
    monkeypatch.setenv("ACT_KERNEL", "cpu")
    with pytest.raises(RuntimeError, match="unavailable"):
        kernels.kernel_name(torch.device("cpu"))


class _NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op; ops that read device data on the host are failures."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "_to_copy", "to.", "copy_")

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_decode_path_makes_no_host_sync(monkeypatch):
    """The decode path reads lengths on the device: no .item()/.cpu()/.tolist(), no scalar
    reads, no data-dependent shapes, no copies -- one call of the fused kernel, which goes
    straight to C++ (its module function): not a single ATen op."""
    p = make_problem([37, 130, 5, 64], [1, 1, 1, 1], sink_strength=1.5, seed=1)
    out = p.output.clone()
    args = list(p.args())
    args[1] = out
    calls = []

    def forbid(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"host sync: Tensor.{name}")

        return f

    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    mode = _NoHostSync()
    with mode:
        calibrate_paged(*args, **p.kwargs(0.4, 0.1))
    monkeypatch.undo()
    assert calls == []
    assert mode.ops == [], mode.ops
    assert not torch.equal(out, p.output)  # and it did calibrate
    # the guard does catch a syncing implementation
    mode2 = _NoHostSync()
    with mode2:
        args[1] = p.output.clone()
        calibrate_paged_reference(*args, **p.kwargs(0.4, 0.1))
    assert any(any(s in op for s in _NoHostSync.SYNCING) for op in mode2.ops)


# ----------------------------------------------------------------------------- whole-layer decode
def _whole_layer(p, heads: list[int], beta: float, threshold: float) -> torch.Tensor:
    """The layer's decode rows computed by the whole-layer kernel alone (every head)."""
    decode = kernels.bind_decode_attention(p.query, p.output, p.key_cache, p.value_cache)
    assert decode is not None
    out = p.output.clone()
    rows = p.query_start.long()
    out[rows] = 0  # every head of every decode row must be written
    decode(p.query, out, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start,
           torch.tensor(heads, dtype=torch.long), p.scale, beta, threshold, p.window, p.max_seq_len)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ratio,heads,window", [(1, [0], None), (3, [0, 4], None), (4, [1, 2, 7], 16), (3, [], None)])
def test_whole_layer_decode_matches_native_and_core(layout, dtype, ratio, heads, window):
    """Every head of the decode rows in one pass: uncalibrated heads equal plain attention
    (the native result within rounding), calibrated heads equal core's ACT; rows of other
    requests are not touched."""
    H = 2 * ratio
    p = make_problem([37, 130, 5, 64, 300], [1] * 5, num_heads=H, num_kv_heads=2, layout=layout, dtype=dtype,
                     heads=heads or [0], window=window, extra_rows=2, sink_strength=1.5,
                     seed=zlib.crc32(f"{layout}{ratio}{dtype}".encode()) % 1000)
    got = _whole_layer(p, heads, 0.4, 0.1)
    exp = p.expected(0.4, 0.1) if heads else p.output.to(torch.float32)
    err = (got.to(torch.float32) - exp).abs().max().item()
    assert err <= TOL[dtype] * exp.abs().max().item(), f"max error {err:.3g}"
    assert torch.equal(got[:2], p.output[:2])  # rows of other requests
    if heads:
        assert not torch.equal(got[:, heads], p.output[:, heads])  # the sinks were calibrated


@pytest.mark.parametrize("beta,threshold", [(1.0, 0.1), (0.4, 1.0), (0.0, 0.1)])
def test_whole_layer_decode_beta_and_threshold_edges(beta, threshold):
    """beta 1 and no sinks: plain attention on every head; beta 0: sinks removed (core)."""
    p = make_problem([60, 17, 90], [1, 1, 1], num_heads=6, num_kv_heads=2, heads=[0, 3], sink_strength=2.0, seed=8)
    got = _whole_layer(p, [0, 3], beta, threshold)
    exp = p.expected(beta, threshold)
    assert (got - exp).abs().max().item() <= 2e-4 * exp.abs().max().item()
    if beta == 1.0 or threshold == 1.0:
        assert (got - p.output).abs().max().item() <= 2e-6 * p.output.abs().max().item()


def test_whole_layer_decode_leaves_vanishing_rows_plain():
    """Non-sink mass below float32 resolution: the row keeps plain attention (core agrees)."""
    p = make_problem([30], [1], sink_positions=(4,), sink_strength=40.0, heads=[0], seed=3)
    got = _whole_layer(p, [0], 0.4, 0.1)
    assert (got - p.output).abs().max().item() <= 1e-6 * p.output.abs().max().item()
    assert torch.allclose(p.expected(0.4, 0.1), p.output, atol=1e-5)


@pytest.mark.parametrize("bind,query_len", [("bind_decode_attention", 1), ("bind_layer_attention", 20)])
def test_whole_layer_kernels_are_unavailable_where_they_cannot_run(monkeypatch, bind, query_len):
    p = make_problem([20], [query_len], seed=1)
    monkeypatch.setenv("ACT_KERNEL", "reference")
    assert getattr(kernels, bind)(p.query, p.output, p.key_cache, p.value_cache) is None
    monkeypatch.setenv("ACT_KERNEL", "cpu")
    assert getattr(kernels, bind)(p.query, p.output.double(), p.key_cache, p.value_cache) is None
    if bind == "bind_layer_attention":  # on by default, off with ACT_WHOLE_PREFILL=0
        assert getattr(kernels, bind)(p.query, p.output, p.key_cache, p.value_cache) is not None
        monkeypatch.setenv("ACT_WHOLE_PREFILL", "1")
        assert getattr(kernels, bind)(p.query, p.output, p.key_cache, p.value_cache) is not None
        monkeypatch.setenv("ACT_WHOLE_PREFILL", "0")
        assert getattr(kernels, bind)(p.query, p.output, p.key_cache, p.value_cache) is None
        monkeypatch.setenv("ACT_WHOLE_PREFILL", "yes")  # neither: an error naming the setting, never a guess
        with pytest.raises(ValueError, match="ACT_WHOLE_PREFILL='yes'"):
            getattr(kernels, bind)(p.query, p.output, p.key_cache, p.value_cache)


# ----------------------------------------------------------------------------- whole-layer prefill (CPU)
def _layer_attention(p, heads: list[int], beta: float, threshold: float) -> torch.Tensor:
    """The step's rows computed by the CPU whole-layer kernel alone (every head, any rows)."""
    layer = kernels.bind_layer_attention(p.query, p.output, p.key_cache, p.value_cache)
    assert layer is not None
    out = p.output.clone()
    first = int(p.query_start.min())
    out[first:] = 0  # every head of every row of the step must be written
    layer(p.query, out, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start, p.query_lens,
          torch.tensor(heads, dtype=torch.long), p.scale, beta, threshold, p.window, p.max_seq_len)
    return out


LAYER_SCENARIOS = {
    **SCENARIOS,
    # several 60-row blocks and several row chunks per head, a window cutting into panels,
    # rows after cached keys, a decode row in the same call
    "long_prompts": ([333, 260, 90], [301, 260, 1], 37),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scenario", list(LAYER_SCENARIOS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_whole_layer_prefill_matches_native_and_core(layout, scenario, dtype):
    """Every head of prefill and decode rows: uncalibrated heads equal plain attention (the
    native result within rounding), calibrated heads equal core's ACT; rows of other requests
    are not touched."""
    seq_lens, query_lens, window = LAYER_SCENARIOS[scenario]
    p = make_problem(seq_lens, query_lens, num_heads=6, num_kv_heads=2, layout=layout, dtype=dtype, heads=[1, 4],
                     window=window, sink_strength=1.5, seed=zlib.crc32(f"L{layout}{scenario}".encode()) % 1000)
    got = _layer_attention(p, [1, 4], 0.4, 0.1)
    exp = p.expected(0.4, 0.1)
    err = (got.to(torch.float32) - exp).abs().max().item()
    assert err <= TOL[dtype] * exp.abs().max().item(), f"max error {err:.3g}"
    first = int(p.query_start.min())
    assert torch.equal(got[:first], p.output[:first])  # rows of other requests
    if int(p.query_lens.sum()):
        assert not torch.equal(got[first:, [1, 4]], p.output[first:, [1, 4]])  # the sinks were calibrated


@pytest.mark.parametrize("ratio,heads", [(1, [0]), (4, [1, 2, 7]), (3, [])])
@pytest.mark.parametrize("head_size", [32, 40, 128])  # 40: a head size that is not a multiple of 32
def test_whole_layer_prefill_gqa_head_sizes_and_no_heads(ratio, heads, head_size):
    """GQA ratios, head sizes the 32-wide output tile does not divide, and no calibrated head
    (then every head is plain attention: the native result within float rounding)."""
    p = make_problem([70, 131], [70, 50], num_heads=2 * ratio, num_kv_heads=2, head_size=head_size,
                     heads=heads or [0], sink_strength=2.0, seed=ratio + head_size)
    got = _layer_attention(p, heads, 0.4, 0.1)
    exp = p.expected(0.4, 0.1) if heads else p.output
    assert (got - exp).abs().max().item() <= 2e-4 * exp.abs().max().item()


@pytest.mark.parametrize("strength", [3.0, 6.0, 12.0])
def test_whole_layer_prefill_rows_whose_nonsink_mass_vanishes(strength):
    """Strong sinks: rows whose non-sink mass is below the recompute cut are recomputed in
    full (checked against core, as the separate pass is)."""
    p = make_problem([70, 40], [70, 12], sink_positions=(0, 2, 5), sink_strength=strength, seed=7)
    got = _layer_attention(p, [0, 2], 0.4, 0.1)
    exp = p.expected(0.4, 0.1)
    assert (got - exp).abs().max().item() <= 2e-4 * exp.abs().max().item()


def test_whole_layer_prefill_leaves_vanishing_rows_plain():
    """Rows whose non-sink mass is below float32 resolution keep plain attention (core agrees)."""
    p = make_problem([30], [30], sink_positions=(4,), sink_strength=40.0, heads=[0], seed=3)
    got = _layer_attention(p, [0], 0.4, 0.1)
    assert (got - p.output).abs().max().item() <= 1e-5 * p.output.abs().max().item()
    assert torch.allclose(p.expected(0.4, 0.1), p.output, atol=1e-5)


def test_whole_layer_prefill_equals_native_plus_separate_pass():
    """The whole-layer kernel and the native kernel followed by the separate calibration pass
    give the same step (float32: within rounding)."""
    p = make_problem([333, 90], [301, 90], num_heads=6, num_kv_heads=3, heads=[0, 4], window=None,
                     sink_strength=1.5, seed=21)
    separate = _run(p, 0.4, 0.1)
    whole = _layer_attention(p, [0, 4], 0.4, 0.1)
    assert (whole - separate).abs().max().item() <= 1e-5 * separate.abs().max().item()


def test_whole_layer_prefill_result_does_not_depend_on_the_batch_or_threads():
    """A request's rows come out bit for bit the same alone in the step or with others, and with
    one thread or two: its units (and so the grouping of its column sums) depend on its own
    length only, and their partial sums are added in a fixed order."""
    p = make_problem([700, 300, 40], [700, 300, 40], num_heads=6, num_kv_heads=2, heads=[1, 4], sink_strength=1.5,
                     seed=31)
    layer = kernels.bind_layer_attention(p.query, p.output, p.key_cache, p.value_cache)
    assert layer is not None

    def run(n: int, threads: int) -> torch.Tensor:
        out = p.output.clone()
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            layer(p.query, out, p.key_cache, p.value_cache, p.block_table[:n], p.seq_lens[:n], p.query_start[:n],
                  p.query_lens[:n], p.heads, p.scale, 0.4, 0.1, p.window, p.max_seq_len)
        finally:
            torch.set_num_threads(before)
        return out

    first = slice(int(p.query_start[0]), int(p.query_start[0]) + 700)
    alone, batched, one_thread = run(1, 2), run(3, 2), run(3, 1)
    assert torch.equal(alone[first], batched[first])
    assert torch.equal(batched, one_thread)
    exp = p.expected(0.4, 0.1)
    assert (batched - exp).abs().max().item() <= 2e-4 * exp.abs().max().item()
