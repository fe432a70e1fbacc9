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


# --- the split-K whole-layer decode and the native-LSE prefill -------------------------------------------


def _whole_layer(p, beta, threshold):
    """The whole-layer decode on CUDA through bind_decode_attention, from zeroed group rows."""
    from act_plugin.kernels import bind_decode_attention

    out = p.output.clone()
    out[p.query_start] = 0.0
    decode = bind_decode_attention(p.query, out, p.key_cache, p.value_cache)
    assert decode is not None
    decode(p.query, out, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start, p.heads, p.scale,
           beta, threshold, p.window, p.max_seq_len)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lens", [[37, 130, 5], [2048, 700, 1500, 33], [9000]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_whole_layer_decode_on_cuda_matches_core(layout, lens, dtype):
    """Every head written: calibrated ones as core, the others as plain attention."""
    p = make_problem(lens, [1] * len(lens), layout=layout, dtype=dtype, num_heads=8, num_kv_heads=2,
                     heads=[0, 3, 5], sink_strength=1.5, head_size=64, window=None, seed=len(lens))
    got = _whole_layer(problem_to(p, "cuda"), 0.4, 0.1)
    _check(p, got, 0.4, 0.1, dtype)


@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("threshold", [0.1, 0.004])
def test_whole_layer_decode_on_cuda_windows_and_overflow(window, threshold):
    """Sliding windows; and tau 0.004, where a split can hold more candidates than its
    slots (the exact fallback)."""
    p = make_problem([3000, 257, 64], [1, 1, 1], num_heads=12, num_kv_heads=4, heads=list(range(0, 12, 2)),
                     sink_strength=0.8, head_size=128, window=window, seed=5)
    _check(p, _whole_layer(problem_to(p, "cuda"), 0.4, threshold), 0.4, threshold, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_on_cuda_with_the_native_lse(dtype):
    """FLASH_ATTN's LSE layout ([H, T], passed transposed) replaces the kernel's own pass."""
    p = make_problem([1100, 300], [1100, 100], dtype=dtype, head_size=64, sink_strength=1.5, seed=21)
    c = problem_to(p, "cuda")
    lse = torch.full((c.query.shape[1], c.query.shape[0]), float("-inf"), device="cuda")  # [H, T]
    for g, k in enumerate(p.keys):
        L, ql, q0 = int(p.seq_lens[g]), int(p.query_lens[g]), int(p.query_start[g])
        H = c.query.shape[1]
        q = c.query[q0 : q0 + ql].transpose(0, 1).float()
        kf = k.cuda().float().repeat_interleave(H // k.shape[0], 0)
        s = q @ kf.transpose(-1, -2) * p.scale
        vis = torch.arange(L, device="cuda")[None] <= torch.arange(L - ql, L, device="cuda")[:, None]
        lse[:, q0 : q0 + ql] = torch.logsumexp(s.masked_fill(~vis, float("-inf")), -1)
    out = c.output.clone()
    args = list(c.args())
    args[1] = out
    calibrate_paged(*args, **c.kwargs(0.4, 0.1), lse=lse.t())
    torch.cuda.synchronize()
    _check(p, out, 0.4, 0.1, dtype)


def test_whole_layer_decode_graph_replays_another_batch():
    """Captured once, replayed after a different batch (other lengths, block tables, queries,
    cache contents; same shapes) was written into the captured buffers: equal to eager."""
    from act_plugin.kernels import bind_decode_attention

    a = problem_to(make_problem([200, 90, 33], [1, 1, 1], sink_strength=1.5, head_size=64, seed=3), "cuda")
    b = problem_to(make_problem([33, 200, 90], [1, 1, 1], sink_strength=1.5, head_size=64, seed=4), "cuda")
    assert a.raw_cache.shape == b.raw_cache.shape and a.block_table.shape == b.block_table.shape
    out = torch.zeros_like(a.output)
    decode = bind_decode_attention(a.query, out, a.key_cache, a.value_cache)
    assert decode is not None

    def step():
        decode(a.query, out, a.key_cache, a.value_cache, a.block_table, a.seq_lens, a.query_start, a.heads, a.scale,
               0.4, 0.1, None, 200)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for dst, src in ((a.raw_cache, b.raw_cache), (a.query, b.query), (a.block_table, b.block_table),
                     (a.seq_lens, b.seq_lens)):
        dst.copy_(src)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    eager = torch.zeros_like(b.output)
    decode(b.query, eager, b.key_cache, b.value_cache, b.block_table, b.seq_lens, b.query_start, b.heads, b.scale,
           0.4, 0.1, None, 200)
    torch.cuda.synchronize()
    rows = b.query_start
    assert torch.equal(out[rows], eager[rows])
    assert not torch.equal(eager[rows], torch.zeros_like(eager[rows]))


# --- first_token (ZeroTuning) from the native output ---------------------------------------------------------

FT_GAMMAS = [0.2, 3.0, 1.0, 8.0]  # per head: < 1, > 1, 1 (unchanged)
FT_TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _first_token_cuda(c, gammas, **extra):
    from act_plugin.kernels.first_token import first_token_paged

    out = c.output.clone()
    first_token_paged(c.query, out, c.key_cache, c.value_cache, c.block_table, c.seq_lens, c.query_start,
                      c.query_lens, c.heads, c.kv_heads, torch.tensor(gammas, device="cuda"), scale=c.scale,
                      window=c.window, max_query_len=c.max_query_len, max_seq_len=c.max_seq_len, **extra)
    torch.cuda.synchronize()
    return out


def _first_token_err(p, got, gammas) -> float:
    from test_kernels_triton_first_token import reference

    exp = reference(p, torch.tensor(gammas))
    return (got.cpu().to(torch.float32) - exp).abs().max().item() / exp.abs().max().item()


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scenario", ["decode_long", "prefill_long", "mixed_window", "padded_group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_first_token_on_cuda_matches_the_rule(layout, scenario, dtype, with_lse):
    """The Triton first_token kernel (chosen for CUDA tensors) with the native LSE (one key and
    value per row) and without (its own K-only pass), against the dense rule on the CPU."""
    from test_kernels_triton_first_token import native_lse

    seq_lens, query_lens, window = SCENARIOS[scenario]
    p = make_problem(seq_lens, query_lens, layout=layout, dtype=dtype, window=window, num_heads=8, num_kv_heads=2,
                     heads=[0, 3, 5, 6], sink_strength=1.5, head_size=64,
                     seed=zlib.crc32(f"ft{layout}{scenario}".encode()) % 1000)
    c = problem_to(p, "cuda")
    extra = dict(lse=native_lse(p).cuda()) if with_lse else {}
    got = _first_token_cuda(c, FT_GAMMAS, **extra)
    assert not torch.equal(got.cpu(), p.output)
    assert _first_token_err(p, got, FT_GAMMAS) <= FT_TOL[dtype]
    assert torch.equal(got[:, [1, 2, 4, 5, 7]].cpu(), p.output[:, [1, 2, 4, 5, 7]])  # gamma-1 and other heads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_token_on_cuda_recomputes_where_p0_nears_one(dtype):
    """Key 0 takes nearly all the attention and gamma is small: the blocks below the cut are
    swept exactly (the epilogue alone loses the tolerance in bf16: see the interpreter test)."""
    from test_kernels_triton_first_token import native_lse

    p = make_problem([400, 300], [400, 1], num_heads=4, num_kv_heads=2, heads=[0, 1, 2, 3], sink_positions=(0,),
                     sink_strength=3.0, dtype=dtype, head_size=64, seed=7)
    gammas = [0.05, 0.3, 2.0, 0.01]
    c = problem_to(p, "cuda")
    assert _first_token_err(p, _first_token_cuda(c, gammas), gammas) <= FT_TOL[dtype]
    assert _first_token_err(p, _first_token_cuda(c, gammas, lse=native_lse(p).cuda()), gammas) <= FT_TOL[dtype]


def test_first_token_decode_on_cuda_under_a_cuda_graph():
    """With the native LSE the decode launch captures into a CUDA graph (no host sync) and a
    replay equals the eager call."""
    from test_kernels_triton_first_token import native_lse

    from act_plugin.kernels.first_token import first_token_paged

    p = make_problem([200, 90, 33], [1, 1, 1], num_heads=8, num_kv_heads=2, heads=[0, 3, 5, 6], sink_strength=1.5,
                     head_size=64, seed=3)
    c = problem_to(p, "cuda")
    lse = native_lse(p).cuda()
    gammas = torch.tensor(FT_GAMMAS, device="cuda")
    out = c.output.clone()

    def step():
        first_token_paged(c.query, out, c.key_cache, c.value_cache, c.block_table, c.seq_lens, c.query_start,
                          c.query_lens, c.heads, c.kv_heads, gammas, scale=c.scale, window=None, max_query_len=1,
                          max_seq_len=200, lse=lse)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out.copy_(c.output)
    graph.replay()
    torch.cuda.synchronize()
    eager = _first_token_cuda(c, FT_GAMMAS, lse=lse)
    assert torch.equal(out, eager)
    assert not torch.equal(out, c.output)

def _padded(p, pad: int):
    """The batch as a FULL CUDA graph sees it: ``pad`` extra rows without keys (block table
    row of zeros, query row 0: another request's row, which must stay untouched)."""
    import dataclasses

    z = torch.zeros(pad, dtype=torch.int32, device=p.seq_lens.device)
    return dataclasses.replace(
        p, block_table=torch.cat([p.block_table, torch.zeros_like(p.block_table[:1]).repeat(pad, 1)]),
        seq_lens=torch.cat([p.seq_lens, z.to(p.seq_lens.dtype)]),
        query_start=torch.cat([p.query_start, z.to(p.query_start.dtype)]),
    )


def _row_tables(arms, row_arm, num_heads, device="cuda"):
    """Per-row tables as the engine keeps them (act_plugin.vllm.graph_plan): [slots, layers,
    heads] flags of which layer 1 is the one under test."""
    from act_plugin.kernels import RowArms

    flags = torch.zeros(4, 3, num_heads, dtype=torch.int8)
    beta, tau = torch.ones(4), torch.ones(4)
    for slot, (heads, b, t) in arms.items():
        flags[slot, 1, heads] = 1
        beta[slot], tau[slot] = b, t
    return RowArms(torch.tensor(row_arm + [-1] * (8 - len(row_arm)), dtype=torch.int32, device=device),
                   beta.to(device), tau.to(device), flags.to(device)[:, 1])


@pytest.mark.parametrize("whole", [False, True])
def test_per_row_decode_graph_replays_another_batch_and_other_arms(whole):
    """A decode step captured once (per-row kernel reading the persistent arm tables) and
    replayed after another batch (lengths, block tables, queries, cache) and other arms
    (other rows, betas, taus, head sets; an uncalibrated row; a padding row) were written in
    place: equal to the eager launch on that batch, and to core on each arm's heads."""
    import dataclasses

    from act_plugin.kernels import bind_decode_rows

    H, G = 8, 5
    mk = dict(num_heads=H, num_kv_heads=2, sink_strength=1.5, head_size=64)
    a_cpu = make_problem([200, 90, 33, 150, 64], [1] * G, seed=31, **mk)
    b_cpu = make_problem([33, 150, 200, 64, 90], [1] * G, seed=32, **mk)
    a, b = _padded(problem_to(a_cpu, "cuda"), 1), _padded(problem_to(b_cpu, "cuda"), 1)
    assert a.raw_cache.shape == b.raw_cache.shape and a.block_table.shape == b.block_table.shape
    arms_a = {0: ([0, 3, 5], 0.4, 0.1), 1: ([1, 2, 6, 7], 0.0, 0.05), 2: ([4], 0.7, 0.2)}
    arms_b = {0: ([0, 3, 5], 0.4, 0.1), 1: ([6], 0.2, 0.3), 2: ([1, 2, 3, 4], 0.5, 0.08)}
    rows_b = [2, -1, 1, 0, 2, -1]
    tables = _row_tables(arms_a, [0, 1, -1, 2, 0, -1], H)
    out = a.output.clone()
    rows_kernel = bind_decode_rows(a.query, out, a.key_cache, a.value_cache)
    assert rows_kernel is not None
    bound = 256  # the graph's length bound (vLLM: max_model_len)

    def step(p, o, t):
        rows_kernel(p.query, o, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start, t, p.scale,
                    None, bound, whole)

    step(a, out, tables)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(a, out, tables)
    new = _row_tables(arms_b, rows_b, H)
    for dst, src in ((a.raw_cache, b.raw_cache), (a.query, b.query), (a.block_table, b.block_table),
                     (a.seq_lens, b.seq_lens), (tables.row_arm, new.row_arm), (tables.beta, new.beta),
                     (tables.tau, new.tau), (tables.head_flags, new.head_flags)):
        dst.copy_(src)
    start = b.output.clone()
    if whole:
        start[b.query_start[:G]] = 0.0
    out.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    eager = start.clone()
    step(b, eager, _row_tables(arms_b, rows_b, H))
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert torch.equal(out[:2].cpu(), b_cpu.output[:2])  # other requests' rows (the padding row's query row)
    rows = [int(r) for r in b_cpu.query_start]
    for slot, (heads, beta, tau) in arms_b.items():
        mine = [rows[g] for g in range(G) if rows_b[g] == slot]
        heads_t = torch.tensor(heads)
        core = dataclasses.replace(b_cpu, heads=heads_t, kv_heads=heads_t // (H // 2)).expected(beta, tau)
        err = (out[mine].cpu().float() - core[mine]).abs().max().item()
        assert err <= TOL[torch.float32] * core.abs().max().item(), (slot, err)
    off = rows[1]
    if whole:
        assert (out[off].cpu() - b_cpu.output[off]).abs().max() <= 1e-4 * b_cpu.output.abs().max()
    else:
        assert torch.equal(out[off].cpu(), b_cpu.output[off])
