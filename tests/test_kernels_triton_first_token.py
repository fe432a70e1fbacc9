"""The first_token Triton kernel (act_plugin.kernels.triton_first_token) under Triton's
interpreter, against the dense rule reference (act_plugin.rules.rule_attention_dense).

Same arrangement as test_kernels_triton.py: the outer session runs this file's ``case``
tests in a fresh process with ``TRITON_INTERPRET=1`` (it must be set before triton is
imported). Shapes are small: the interpreter is slow.
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

from act_plugin.kernels.testing import LAYOUTS, make_problem, native_lse  # noqa: E402,F401 (native_lse: test_kernels_cuda)
from act_plugin.kernels.testing import expected_first_token as reference  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
case = pytest.mark.skipif(not INTERPRETED,
                          reason="run under TRITON_INTERPRET=1 by test_first_token_under_interpreter")
outer = pytest.mark.skipif(INTERPRETED, reason="the outer session runs this")

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
GAMMAS = torch.tensor([0.2, 3.0, 1.0, 8.0])  # mixed per head: < 1, > 1, 1 (unchanged)
SCENARIOS = {
    "decode": ([37, 130, 5], [1, 1, 1], None),
    "prefill": ([70, 40], [70, 40], None),
    "chunked_prefill": ([90, 50], [30, 50], None),  # rows after 60 cached keys
    "mixed_window": ([60, 45, 20], [60, 1, 7], 9),  # key 0 leaves the window: those rows stay native
    "padded_group": ([40, 1, 66, 1], [1, 0, 12, 0], None),
}


@outer
def test_first_token_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
         "-W", "ignore::RuntimeWarning"],
        env=env, capture_output=True, text=True, timeout=1100,
    )
    print("interpreter run:", *res.stdout.strip().splitlines()[-1:])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and " failed" not in res.stdout


@pytest.fixture(scope="module")
def ft():
    from triton.runtime.interpreter import InterpretedFunction

    import act_plugin.kernels.triton_first_token as mod

    assert isinstance(mod._first_token_kernel, InterpretedFunction)
    return mod


def _run(ft, p, gammas, **extra) -> torch.Tensor:
    out = p.output.clone()
    ft.first_token_triton(p.query, out, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start,
                          p.query_lens, p.heads, p.kv_heads, gammas, scale=p.scale, window=p.window,
                          max_query_len=p.max_query_len, max_seq_len=p.max_seq_len, **extra)
    return out


def _rel_err(p, got, gammas) -> float:
    exp = reference(p, gammas)
    return (got.to(torch.float32) - exp).abs().max().item() / exp.abs().max().item()


def _problem(scenario: str, layout: str, dtype: torch.dtype, **kw):
    seq_lens, query_lens, window = SCENARIOS[scenario]
    args = dict(layout=layout, dtype=dtype, window=window, num_heads=8, num_kv_heads=2, heads=[0, 3, 5, 6],
                sink_strength=1.5, seed=zlib.crc32(f"{layout}{scenario}".encode()) % 1000)
    return make_problem(seq_lens, query_lens, **{**args, **kw})


def _assert_untouched(p, out, gammas):
    """Heads not calibrated and gamma-1 heads, rows of other requests, and rows whose window
    has left key 0: bit for bit the native output."""
    untouched = torch.ones(out.shape[1], dtype=torch.bool)
    untouched[p.heads[gammas != 1.0]] = False
    assert torch.equal(out[:, untouched], p.output[:, untouched])
    assert torch.equal(out[:2], p.output[:2])
    if p.window is not None:
        for g in range(len(p.seq_lens)):
            L, ql, q0 = int(p.seq_lens[g]), int(p.query_lens[g]), int(p.query_start[g])
            far = [q0 + r for r in range(ql) if L - ql + r >= p.window]
            assert far and torch.equal(out[far], p.output[far])


@case
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_first_token_triton_matches_the_rule(ft, layout, scenario, dtype):
    """Own LSE (one K-only pass): GQA (heads over both KV heads), mixed gamma per head."""
    p = _problem(scenario, layout, dtype)
    out = _run(ft, p, GAMMAS)
    assert not torch.equal(out, p.output)
    assert _rel_err(p, out, GAMMAS) <= TOL[dtype]
    _assert_untouched(p, out, GAMMAS)


@case
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scenario", ["decode", "chunked_prefill", "mixed_window"])
@pytest.mark.parametrize("form", ["token_major", "head_major", "base2"])
def test_first_token_triton_with_the_native_lse(ft, layout, scenario, form):
    """The backend's LSE replaces the pass: [T, H], FLASH_ATTN's [H, T] passed transposed,
    and base 2 (FLASHINFER). Same result as the kernel's own LSE within float32 rounding."""
    p = _problem(scenario, layout, torch.float32)
    lse = native_lse(p)
    if form == "head_major":
        lse = lse.t().contiguous().t()
    if form == "base2":
        lse = lse / torch.log(torch.tensor(2.0))
    got = _run(ft, p, GAMMAS, lse=lse, lse_base2=form == "base2")
    assert _rel_err(p, got, GAMMAS) <= TOL[torch.float32]
    _assert_untouched(p, got, GAMMAS)
    own = _run(ft, p, GAMMAS)
    assert (got - own).abs().max() <= 1e-5 * own.abs().max()


@case
@pytest.mark.parametrize("ratio", [1, 3, 4])
def test_first_token_triton_gqa_ratios(ft, ratio):
    """Every query head calibrated, each KV head shared by ``ratio`` of them, gammas below
    and above 1; 16-bit native LSE path included."""
    H = 2 * ratio
    p = make_problem([50, 41], [1, 41], num_heads=H, num_kv_heads=2, heads=list(range(H)), sink_strength=2.0,
                     dtype=torch.float16, seed=ratio)
    gammas = torch.linspace(0.3, 4.0, H)
    assert _rel_err(p, _run(ft, p, gammas), gammas) <= TOL[torch.float16]
    assert _rel_err(p, _run(ft, p, gammas, lse=native_lse(p)), gammas) <= TOL[torch.float16]


@case
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_lse", [False, True])
def test_first_token_triton_recomputes_where_p0_nears_one(ft, dtype, with_lse):
    """Key 0 takes nearly all the attention and gamma is small: ``O - p0 v0`` cancels and the
    epilogue multiplies the output's rounding by up to 1/gamma. The default cut sweeps those
    blocks exactly; forcing the epilogue everywhere (cut 0) shows the loss in 16-bit outputs
    and stays within the stated bound (ulp(O) / (gamma p0 + N)) in float32."""
    p = make_problem([40, 30], [40, 1], num_heads=4, num_kv_heads=2, heads=[0, 1, 2, 3], sink_positions=(0,),
                     sink_strength=3.0, dtype=dtype, seed=7)
    gammas = torch.tensor([0.05, 0.3, 2.0, 0.01])
    extra = dict(lse=native_lse(p)) if with_lse else {}
    assert _rel_err(p, _run(ft, p, gammas, **extra), gammas) <= TOL[dtype]
    forced = _rel_err(p, _run(ft, p, gammas, recompute_below=0.0, **extra), gammas)
    if dtype == torch.float32:
        assert forced <= 1e-4  # <= ~100 ulp (1/gamma = 100) of float32
    else:
        assert forced > TOL[dtype]  # the cut is what keeps 16-bit outputs within tolerance


@case
def test_first_token_triton_gamma_one_everywhere_changes_nothing(ft):
    p = _problem("prefill", "flash_attn", torch.float32)
    assert torch.equal(_run(ft, p, torch.ones(4)), p.output)


@case
def test_first_token_paged_routes_to_triton(ft, monkeypatch):
    """``ACT_KERNEL=triton`` sends CPU tensors to the Triton kernel (CUDA tensors go there by
    default) with the caller's LSE; without it the torch path runs. Both agree."""
    from act_plugin.kernels import first_token as mod

    p = _problem("mixed_window", "cpu_attn", torch.float32)
    lse = native_lse(p)
    calls = []
    real = ft.first_token_triton

    def spy(*a, **k):
        calls.append(k["lse"] is lse)
        return real(*a, **k)

    monkeypatch.setattr(ft, "first_token_triton", spy)

    def paged(**extra):
        out = p.output.clone()
        mod.first_token_paged(p.query, out, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start,
                              p.query_lens, p.heads, p.kv_heads, GAMMAS, scale=p.scale, window=p.window,
                              max_query_len=p.max_query_len, max_seq_len=p.max_seq_len, **extra)
        return out

    monkeypatch.delenv("ACT_KERNEL", raising=False)
    torch_out = paged(lse=lse)
    assert calls == []
    monkeypatch.setenv("ACT_KERNEL", "triton")
    triton_out = paged(lse=lse)
    assert calls == [True]
    assert (triton_out - torch_out).abs().max() <= 2e-5 * torch_out.abs().max()


@case
def test_first_token_triton_makes_no_host_sync(ft, monkeypatch):
    """The grid comes from shapes and host ints; the wrapper only converts gammas."""
    p = _problem("chunked_prefill", "flash_attn", torch.float32)
    lse = native_lse(p)
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            assert all(type(x) is int for x in grid), grid
            return lambda *a, **k: launches.append(k["HAS_LSE"])

    monkeypatch.setattr(ft, "_first_token_kernel", Recorder())

    def forbid(name):
        def f(*a, **k):
            raise AssertionError(f"host sync: Tensor.{name}")

        return f

    with monkeypatch.context() as m:
        for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, forbid(name))
        _run(ft, p, GAMMAS)
        _run(ft, p, GAMMAS, lse=lse)
    assert launches == [False, True]


@outer
@pytest.mark.slow
def test_first_token_kernel_compiles_for_cuda():
    """Ahead-of-time compile for sm_90 (bf16 caches, both LSE modes) with Triton's bundled
    ptxas: type and layout errors that the interpreter does not see. No GPU needed."""
    code = r"""
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from act_plugin.kernels.triton_first_token import _first_token_kernel as fn
for has_lse in (False, True):
    const = dict(HAS_LSE=has_lse, BLOCK_M=16, BLOCK_N=64, BLOCK_D=128, PRECISION="tf32", QK_FP32=False)
    sig = {}
    for n in inspect.signature(fn.fn).parameters:
        if n in const: sig[n] = "constexpr"
        elif n in ("q_ptr", "o_ptr", "k_ptr", "v_ptr"): sig[n] = "*bf16"
        elif n in ("lse_ptr", "gamma_ptr"): sig[n] = "*fp32"
        elif n in ("bt_ptr", "seq_lens_ptr"): sig[n] = "*i32"
        elif n.endswith("_ptr"): sig[n] = "*i64"
        elif n in ("scale", "cut", "lse_scale"): sig[n] = "fp32"
        else: sig[n] = "i32"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
    assert "cubin" in k.asm
    print("compiled", has_lse)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled") == 2
