"""The split-K decode kernel (act_plugin.kernels.triton_decode) under Triton's interpreter.

Same arrangement as test_kernels_triton.py: the outer session runs this file's ``case``
tests in a fresh process with ``TRITON_INTERPRET=1`` (it must be set before triton is
imported). Shapes are tiny and ``split_len``/``block_n`` small, so that every row spans
several splits and tiles and the merge of splits, candidates handed back within a split
and the reduce are all exercised.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from act_plugin.kernels.testing import LAYOUTS, make_problem  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
case = pytest.mark.skipif(not INTERPRETED, reason="run under TRITON_INTERPRET=1 by test_decode_under_interpreter")
outer = pytest.mark.skipif(INTERPRETED, reason="the outer session runs this")

TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}
SPLIT = dict(block_n=16, split_len=32)


@outer
def test_decode_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
         "-W", "ignore::RuntimeWarning"],
        env=env, capture_output=True, text=True, timeout=1500,
    )
    print("interpreter run:", *res.stdout.strip().splitlines()[-1:])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and " failed" not in res.stdout


@pytest.fixture(scope="module")
def td():
    from triton.runtime.interpreter import InterpretedFunction

    import act_plugin.kernels.triton_decode as mod

    assert isinstance(mod._split_kernel, InterpretedFunction)
    return mod


def _decode(td, p, beta, threshold, *, whole, **extra):
    """Run the decode kernel; whole-layer mode starts from zeros in the group's rows (every
    head must be written), calibration mode from the native output. Returns (output, stats)."""
    out = p.output.clone()
    if whole:
        for g in range(len(p.seq_lens)):
            out[int(p.query_start[g])] = 0.0
    kw = {**SPLIT, **extra}
    stats = td.decode_split_k(
        p.query, out, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start,
        None if whole else p.query_lens, p.heads, scale=p.scale, beta=beta, threshold=threshold, window=p.window,
        max_seq_len=p.max_seq_len, whole=whole, **kw,
    )
    return out, stats


def _check(p, got, beta, threshold, dtype):
    err, scale, _ = p.error_vs_core(got, beta, threshold)
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} (scale {scale:.3g})"


@case
@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_matches_core(td, layout, dtype, whole):
    """Calibrated heads as core; in whole-layer mode the others equal plain attention (the
    native output the problem was built with) and the other requests' rows stay untouched."""
    p = make_problem([37, 130, 5], [1, 1, 1], layout=layout, dtype=dtype, sink_strength=1.5,
                     seed=zlib.crc32(f"{layout}{dtype}".encode()) % 1000)
    got, _ = _decode(td, p, 0.4, 0.1, whole=whole)
    assert not torch.equal(got, p.output)
    assert torch.equal(got[:2], p.output[:2])
    _check(p, got, 0.4, 0.1, dtype)


@case
@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_decode_gqa_and_beta(td, ratio, beta):
    H = 2 * ratio
    heads = [h for h in range(H) if h % 3 != 1]  # some heads of a KV group calibrated, some not
    p = make_problem([50, 97, 3], [1, 1, 1], num_heads=H, num_kv_heads=2, heads=heads, sink_strength=2.0, seed=ratio)
    for whole in (False, True):
        got, _ = _decode(td, p, beta, 0.08, whole=whole)
        _check(p, got, beta, 0.08, torch.float32)


@case
@pytest.mark.parametrize("window", [9, 40])
def test_decode_sliding_window(td, window):
    """Keys before the window are neither read nor sinks (sink position 3 falls out of it)."""
    p = make_problem([60, 130, 20], [1, 1, 1], window=window, sink_strength=1.5, sink_positions=(0, 3, 55), seed=4)
    for whole in (False, True):
        got, _ = _decode(td, p, 0.4, 0.1, whole=whole)
        _check(p, got, 0.4, 0.1, torch.float32)


@case
def test_decode_without_sinks(td):
    p = make_problem([45, 70], [1, 1], seed=11)
    got, _ = _decode(td, p, 0.4, 1.0, whole=False)
    assert torch.equal(got, p.output)  # calibration mode: nothing written
    got, _ = _decode(td, p, 0.4, 1.0, whole=True)
    assert (got - p.output).abs().max() <= 2e-5 * p.output.abs().max()  # plain attention everywhere


@case
@pytest.mark.parametrize("strength", [4.0, 12.0, 40.0])
def test_decode_rows_whose_nonsink_mass_vanishes(td, strength):
    """N summed directly from the splits (no O - O_S): exact whatever N, and rows with
    N <= eps left unchanged, as core."""
    p = make_problem([40, 130], [1, 1], sink_positions=(3,), sink_strength=strength, seed=7)
    for whole in (False, True):
        got, _ = _decode(td, p, 0.4, 0.1, whole=whole)
        _check(p, got, 0.4, 0.1, torch.float32)


@case
def test_decode_candidates_stay_within_the_bound(td):
    """At tau = 0.1 a split holds fewer than 10 candidates: no overflow anywhere."""
    assert td.candidate_slots(0.1) >= 10
    p = make_problem([200, 130, 64], [1, 1, 1], num_heads=4, num_kv_heads=1, heads=[0, 1, 2, 3], sink_strength=1.0,
                     sink_positions=(0, 3, 40, 41, 100), seed=8)
    got, stats = _decode(td, p, 0.4, 0.1, whole=True, split_len=64)
    assert stats[..., 3].max().item() == 0.0
    _check(p, got, 0.4, 0.1, torch.float32)


@case
@pytest.mark.parametrize("whole", [False, True])
def test_decode_candidate_overflow_falls_back_exactly(td, whole):
    """tau = 0.004: near-uniform rows put ~1/128 > tau on most keys of a 128-key split, more
    than the 32 slots: the overflow flag is set and the reduce recomputes those rows."""
    assert td.candidate_slots(0.004) == td.MAX_CAND
    p = make_problem([130, 140], [1, 1], sink_strength=0.3, seed=9)
    got, stats = _decode(td, p, 0.4, 0.004, whole=whole, split_len=128)
    assert stats[:, p.heads, :, 3].max().item() == 1.0
    _check(p, got, 0.4, 0.004, torch.float32)


@case
def test_decode_leaves_prefill_rows_of_a_mixed_group(td):
    """Calibration mode runs only the rows with query_len 1; the prefill kernels own the rest."""
    p = make_problem([60, 45, 20], [60, 1, 7], sink_strength=1.5, seed=10)
    got, _ = _decode(td, p, 0.4, 0.1, whole=False)
    r = int(p.query_start[1])
    assert torch.equal(got[:r], p.output[:r]) and torch.equal(got[r + 1 :], p.output[r + 1 :])
    assert not torch.equal(got[r], p.output[r])
    exp = p.expected(0.4, 0.1)
    assert (got[r] - exp[r]).abs().max() <= 2e-4 * exp.abs().max()


@case
def test_whole_layer_decode_equals_the_cpu_kernel(td):
    """The CUDA whole-layer entry has the CPU kernel's semantics (``decode_attention``)."""
    from act_plugin.kernels import cpu
    from act_plugin.kernels.triton_act import decode_attention_triton

    op = cpu.decode_attention_op()
    if op is None:
        pytest.skip("the CPU kernel is unavailable")
    p = make_problem([37, 130, 5], [1, 1, 1], num_heads=8, num_kv_heads=2, heads=[1, 2, 6], window=50,
                     sink_strength=1.5, seed=12)
    a, b = p.output.clone(), p.output.clone()
    args = (p.query, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start, p.heads, p.scale, 0.4, 0.1)
    op(p.query, a, *args[1:], 50, p.max_seq_len)
    decode_attention_triton(p.query, b, *args[1:], 50, p.max_seq_len, split_len=32)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


@case
def test_decode_launch_makes_no_host_sync(td, monkeypatch):
    """Grids from shapes and host ints; the wrapper only allocates its scratch (no reads)."""
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            assert all(type(x) is int for x in grid), grid
            return lambda *a, **k: launches.append((self.name, grid))

    for name in ("_split_kernel", "_reduce_kernel"):
        monkeypatch.setattr(td, name, Recorder(name))

    def forbid(name):
        def f(*a, **k):
            raise AssertionError(f"host sync: Tensor.{name}")

        return f

    p = make_problem([37, 130, 5, 64], [1, 1, 1, 1], sink_strength=1.5, seed=1)
    ops = []

    class Ops(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with monkeypatch.context() as m:
        for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, forbid(name))
        with Ops():
            _decode(td, p, 0.4, 0.1, whole=False, split_len=None)
    assert [n for n, _ in launches] == ["_split_kernel", "_reduce_kernel"]
    assert set(ops) <= {"aten.clone.default", "aten.empty.memory_format", "aten.view.default"}, ops


# Per-row mode (CUDA graphs): arms with different head sets, betas and taus (0.05 < 1/15:
# splits may overflow ROW_CAND slots and take the exact fallback).
ARMS = [([0, 3, 5], 0.4, 0.1), ([1, 2, 6, 7], 0.0, 0.05), ([4], 0.7, 0.2)]


def _row_tables(td, row_arm, H, dtype=torch.int8):
    flags = torch.zeros(len(ARMS) + 1, 3, H, dtype=dtype)  # [arms (one spare), layers, heads]: layer 1 is ours
    for a, (heads, _, _) in enumerate(ARMS):
        flags[a, 1, heads] = 1
    beta = torch.tensor([b for _, b, _ in ARMS] + [1.0], dtype=torch.float32)
    tau = torch.tensor([t for _, _, t in ARMS] + [1.0], dtype=torch.float32)
    return td.RowArms(torch.tensor(row_arm, dtype=torch.int32), beta, tau, flags[:, 1])


@case
@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_per_row_arms_equal_each_arm_alone(td, whole, dtype):
    """A batch mixing three arms, a row that runs no arm and a padding row (no keys, its query
    row another request's) equals each arm run alone, and core on each arm's heads; the row
    without an arm keeps the native output (calibration mode) or gets plain attention
    (whole-layer mode); the padding row and the other requests' rows are never written."""
    import dataclasses

    H = 8
    p = make_problem([37, 130, 5, 64, 90], [1, 1, 1, 1, 1], num_heads=H, num_kv_heads=2, dtype=dtype,
                     sink_strength=1.5, seed=21)
    row_arm = [0, 1, -1, 2, 0, -1]
    # the padding row a CUDA graph adds: no keys, block table row 0, query row 0 (another request's)
    pad = dataclasses.replace(
        p, block_table=torch.cat([p.block_table, torch.zeros_like(p.block_table[:1])]),
        seq_lens=torch.cat([p.seq_lens, torch.zeros(1, dtype=p.seq_lens.dtype)]),
        query_start=torch.cat([p.query_start, torch.zeros(1, dtype=p.query_start.dtype)]),
        query_lens=torch.cat([p.query_lens, torch.ones(1, dtype=p.query_lens.dtype)]),
    )
    base = p.output.clone()
    rows = [int(r) for r in p.query_start]
    if whole:
        base[rows] = 0.0
    got = base.clone()
    td.decode_split_k(
        pad.query, got, pad.key_cache, pad.value_cache, pad.block_table, pad.seq_lens, pad.query_start,
        None if whole else pad.query_lens, p.heads[:0], scale=p.scale, beta=1.0, threshold=1.0, window=None,
        max_seq_len=p.max_seq_len, whole=whole, row_arms=_row_tables(td, row_arm, H), **SPLIT,
    )
    assert torch.equal(got[:2], p.output[:2])  # other requests' rows, padding row's included
    tol = TOL[dtype]
    for a, (heads, beta, tau) in enumerate(ARMS):
        alone = base.clone()
        td.decode_split_k(
            p.query, alone, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start,
            None if whole else p.query_lens, torch.tensor(heads), scale=p.scale, beta=beta, threshold=tau,
            window=None, max_seq_len=p.max_seq_len, whole=whole, cand=td.ROW_CAND, **SPLIT,
        )
        arm_rows = [rows[g] for g, r in enumerate(row_arm[:5]) if r == a]
        scale = alone.abs().max().item()
        assert (got[arm_rows] - alone[arm_rows]).abs().max().item() <= 1e-6 * scale
        heads_t = torch.tensor(heads)
        core = dataclasses.replace(p, heads=heads_t, kv_heads=heads_t // (H // 2)).expected(beta, tau)
        assert (got[arm_rows].float() - core[arm_rows]).abs().max().item() <= tol * scale
    off = rows[2]
    if whole:
        plain = base.clone()
        td.decode_split_k(p.query, plain, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start,
                          None, p.heads[:0], scale=p.scale, beta=1.0, threshold=1.0, window=None,
                          max_seq_len=p.max_seq_len, whole=True, **SPLIT)
        assert torch.equal(got[off], plain[off])
        assert (got[off].float() - p.output[off].float()).abs().max().item() <= tol * p.output.abs().max().item()
    else:
        assert torch.equal(got[off], p.output[off])
        assert not torch.equal(got[rows[0]], p.output[rows[0]])  # calibrated rows did change


@case
def test_decode_per_row_arms_beta_one_and_empty_head_set(td):
    """An arm with no head in this layer, and a row with none, leave the native output bit for
    bit in calibration mode (a layer none of the step's arms calibrates)."""
    p = make_problem([37, 64], [1, 1], num_heads=8, num_kv_heads=2, sink_strength=1.5, seed=22)
    tables = _row_tables(td, [3, -1], 8)  # arm 3: the spare slot, no flags
    got = p.output.clone()
    td.decode_split_k(p.query, got, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start,
                      p.query_lens, p.heads[:0], scale=p.scale, beta=1.0, threshold=1.0, window=None,
                      max_seq_len=p.max_seq_len, whole=False, row_arms=tables, **SPLIT)
    assert torch.equal(got, p.output)
