"""The Triton kernels compiled for and run on a CUDA GPU, against the dense reference
(:mod:`act_plugin.core`, float32 on the CPU). Needs only torch with CUDA and Triton (no
vLLM): skipped on machines without a CUDA device. The interpreter tests
(``test_kernels_triton.py``) check the same cases on the CPU in CI."""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from act_plugin.kernels import calibrate_paged, kernel_name  # noqa: E402
from act_plugin.kernels.testing import LAYOUTS, make_problem, problem_to  # noqa: E402

TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}
SCENARIOS = {
    "decode": ([37, 130, 5], [1, 1, 1], None),
    "decode_long": ([2048, 700, 1500, 33], [1, 1, 1, 1], None),
    "prefill": ([70, 40], [70, 40], None),
    "prefill_long": ([1100, 513], [1100, 200], None),
    "mixed_window": ([60, 45, 20], [60, 1, 7], 9),
    "padded_group": ([40, 1, 66, 1], [1, 0, 12, 0], None),
}


def _run_cuda(p, beta, threshold):
    out = p.calibrated(calibrate_paged, beta, threshold)
    torch.cuda.synchronize()
    return out


def _check(p_cpu, got, beta, threshold, dtype):
    err, scale, _ = p_cpu.error_vs_core(got, beta, threshold)
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} (scale {scale:.3g})"


def test_cuda_tensors_use_triton():
    assert kernel_name(torch.device("cuda")) == "triton"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_on_cuda_matches_core(layout, scenario, dtype):
    seq_lens, query_lens, window = SCENARIOS[scenario]
    p = make_problem(seq_lens, query_lens, layout=layout, dtype=dtype, window=window, sink_strength=1.5,
                     head_size=64, seed=zlib.crc32(f"{layout}{scenario}".encode()) % 1000)
    got = _run_cuda(problem_to(p, "cuda"), 0.4, 0.1)
    assert not torch.equal(got.cpu(), p.output)
    _check(p, got, 0.4, 0.1, dtype)


@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_triton_on_cuda_gqa_and_beta(ratio, beta):
    p = make_problem([50, 41, 300], [1, 41, 1], num_heads=2 * ratio, num_kv_heads=2,
                     heads=list(range(2 * ratio)), sink_strength=2.0, seed=ratio)
    _check(p, _run_cuda(problem_to(p, "cuda"), beta, 0.08), beta, 0.08, torch.float32)


@pytest.mark.parametrize("strength", [4.0, 12.0, 40.0])
def test_triton_on_cuda_rows_whose_nonsink_mass_vanishes(strength):
    p = make_problem([40, 30], [40, 1], sink_positions=(3,), sink_strength=strength, seed=7)
    _check(p, _run_cuda(problem_to(p, "cuda"), 0.4, 0.1), 0.4, 0.1, torch.float32)


def test_triton_decode_on_cuda_under_a_cuda_graph():
    """The decode launch captures into a CUDA graph and replays with new lengths written in
    place (what piecewise/full decode graphs need: no host sync, no allocation)."""
    p = problem_to(make_problem([200, 90, 33], [1, 1, 1], sink_strength=1.5, head_size=64, seed=3), "cuda")
    out = p.output.clone()
    args = list(p.args())
    args[1] = out
    kw = p.kwargs(0.4, 0.1)
    calibrate_paged(*args, **kw)  # compile outside the capture
    out.copy_(p.output)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calibrate_paged(*args, **kw)
    out.copy_(p.output)
    graph.replay()
    torch.cuda.synchronize()
    eager = p.output.clone()
    args2 = list(p.args())
    args2[1] = eager
    calibrate_paged(*args2, **kw)
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert not torch.equal(out, p.output)
