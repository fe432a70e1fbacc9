"""Prefill calibration in Triton: a K-only column pass and a sparse correction.

The sinks of prefill rows come from column means over the call's rows, so the keys must be
looked at once more after the native attention, but not twice. Per (sequence, calibrated
head, block of rows):

1. Row log-sum-exp: taken from the native backend when it returns one (``lse``: FLASH_ATTN's
   ``softmax_lse`` is natural-log; FLASHINFER's base 2 unless told otherwise -- pass
   ``lse_base2``). Without one, :func:`_lse_kernel` computes it (a K-only pass, online max).
2. :func:`_colsum_kernel`: scores ``Q K^T`` (no V, no online max: the LSE is known), the
   column sums added atomically into a per-(sequence, head) buffer.
3. :func:`_correct_kernel`: the sinks are the columns whose mean over the rows that see
   them exceeds tau (position 0 never). Only tiles holding a sink load K and V, at the sink
   columns only: ``S`` and ``O_S`` of each row; then ``O' = beta*O_S + g*(O - O_S)`` on
   the native output, ``N = 1 - S``. ``O - O_S`` cancels where ``N`` is small (error
   ~ ulp(O)*(1-beta)*S/N), so a block holding a row with ``N < recompute_below`` sweeps all
   its keys instead, summing the sink and non-sink parts of ``P V`` and ``N`` separately
   (exact; what the previous kernels did for every row).

Chunked prefill (rows after cached keys) and sliding windows are handled by positions:
sequence ``g``'s rows are its last ``query_len`` positions. No host synchronisation.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from act_plugin.core import NONSINK_EPS


@triton.jit
def _rows(q_ptr, seq_lens_ptr, q_start_ptr, heads_ptr, g, hs, mb, ql, sq0, sq1, sq2, head_dim,
          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, QK_FP32: tl.constexpr):
    """Block ``mb`` of sequence ``g``'s rows for calibrated head ``hs``: lengths, positions,
    masks and the queries."""
    L = tl.load(seq_lens_ptr + g).to(tl.int32)
    row0 = tl.load(q_start_ptr + g).to(tl.int64)
    h = tl.load(heads_ptr + hs).to(tl.int64)
    first = L - ql
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = i < ql
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    q = tl.load(q_ptr + (row0 + i)[:, None] * sq0 + h * sq1 + d[None, :] * sq2,
                mask=rm[:, None] & dmask[None, :], other=0.0)
    if QK_FP32:
        q = q.to(tl.float32)
    return L, row0, h, first, i, rm, first + i, d, dmask, q


@triton.jit
def _key_range(L, first, mb, pos, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys the block's rows can see, ``[k_lo, k_end)`` (k_lo aligned to BLOCK_N), and each
    row's lowest visible position under the sliding window."""
    k_end = tl.minimum(L, first + (mb + 1) * BLOCK_M)
    k_lo = tl.where(window > 0, tl.maximum(first + mb * BLOCK_M - window + 1, 0), 0)
    k_lo = (k_lo // BLOCK_N) * BLOCK_N
    row_lo = tl.where(window > 0, pos - window + 1, 0)
    return k_lo, k_end, row_lo


@triton.jit
def _scores(q, k_ptr, bt_ptr, g, kvh, j, kmask, jm, d, dmask, rm, pos, row_lo, sk0, sk1, sk2, sk3, sbt0, sbt1,
            page, scale, PRECISION: tl.constexpr):
    """Scaled scores of the block's rows against keys ``j`` (K loaded where ``kmask``), -inf
    where a row cannot see the key (causal, window, padding); and the keys' cache blocks."""
    blk = tl.load(bt_ptr + g * sbt0 + (j // page) * sbt1, mask=kmask, other=0).to(tl.int64)
    kp = k_ptr + blk[None, :] * sk0 + kvh * sk1 + (j % page)[None, :] * sk2 + d[:, None] * sk3
    kt = tl.load(kp, mask=dmask[:, None] & kmask[None, :], other=0.0).to(q.dtype)
    s = tl.dot(q, kt, input_precision=PRECISION) * scale
    vis = rm[:, None] & jm[None, :] & (j[None, :] <= pos[:, None]) & (j[None, :] >= row_lo[:, None])
    return tl.where(vis, s, -float("inf")), blk


@triton.jit
def _pv(p, v_ptr, blk, kvh, j, vmask, d, dmask, sv0, sv1, sv2, sv3, page, QK_FP32: tl.constexpr):
    """``p @ V[j]`` (V loaded where ``vmask``), float32 accumulation: exact float32 products
    for float32 caches; 16-bit ones on tensor cores with p rounded to the cache dtype, as
    flash attention does."""
    vp = v_ptr + blk[:, None] * sv0 + kvh * sv1 + (j % page)[:, None] * sv2 + d[None, :] * sv3
    v = tl.load(vp, mask=vmask[:, None] & dmask[None, :], other=0.0)
    if QK_FP32:
        return tl.dot(p, v.to(tl.float32), input_precision="ieee")
    return tl.dot(p.to(v.dtype), v)


@triton.jit
def _sink_columns(col_ptr, gh, max_k, j, jm, first, ql, window, tau):
    """Which keys ``j`` are sinks: column mean over the call's rows that see them > tau."""
    i_lo = tl.maximum(j - first, 0)
    i_hi = tl.where(window > 0, tl.minimum(ql - 1, j + window - 1 - first), ql - 1)
    count = (i_hi - i_lo + 1).to(tl.float32)
    col = tl.load(col_ptr + gh * max_k + j, mask=jm, other=0.0)
    return jm & (count > 0) & (j != 0) & (col / tl.maximum(count, 1.0) > tau)


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, bt_ptr, seq_lens_ptr, q_start_ptr, q_lens_ptr, heads_ptr, kv_heads_ptr, lse_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, sbt1, slt, slh,
    num_sel, scale, window, page, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    QK_FP32: tl.constexpr,
):
    """Row log-sum-exp (natural log) when the native backend gives none."""
    gh = tl.program_id(0)
    mb = tl.program_id(1)
    g = gh // num_sel
    hs = gh % num_sel
    ql = tl.load(q_lens_ptr + g).to(tl.int32)
    if (ql > 1) & (mb * BLOCK_M < ql):
        L, row0, h, first, i, rm, pos, d, dmask, q = _rows(
            q_ptr, seq_lens_ptr, q_start_ptr, heads_ptr, g, hs, mb, ql, sq0, sq1, sq2, head_dim, BLOCK_M, BLOCK_D,
            QK_FP32)
        kvh = tl.load(kv_heads_ptr + hs).to(tl.int64)
        k_lo, k_end, row_lo = _key_range(L, first, mb, pos, window, BLOCK_M, BLOCK_N)
        m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        z = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(k_lo, k_end, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            jm = j < k_end
            s, _ = _scores(q, k_ptr, bt_ptr, g, kvh, j, jm, jm, d, dmask, rm, pos, row_lo,
                           sk0, sk1, sk2, sk3, sbt0, sbt1, page, scale, PRECISION)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            z = z * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new
        lse = m + tl.log(tl.where(rm, z, 1.0))
        tl.store(lse_ptr + (row0 + i) * slt + h * slh, lse, mask=rm)


@triton.jit
def _colsum_kernel(
    q_ptr, k_ptr, bt_ptr, seq_lens_ptr, q_start_ptr, q_lens_ptr, heads_ptr, kv_heads_ptr, lse_ptr, col_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, sbt1, slt, slh,
    num_sel, max_k, lse_scale, scale, window, page, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    QK_FP32: tl.constexpr,
):
    """Column sums of the probabilities (K only, the row LSE given)."""
    gh = tl.program_id(0)
    mb = tl.program_id(1)
    g = gh // num_sel
    hs = gh % num_sel
    ql = tl.load(q_lens_ptr + g).to(tl.int32)
    if (ql > 1) & (mb * BLOCK_M < ql):
        L, row0, h, first, i, rm, pos, d, dmask, q = _rows(
            q_ptr, seq_lens_ptr, q_start_ptr, heads_ptr, g, hs, mb, ql, sq0, sq1, sq2, head_dim, BLOCK_M, BLOCK_D,
            QK_FP32)
        kvh = tl.load(kv_heads_ptr + hs).to(tl.int64)
        lse = tl.load(lse_ptr + (row0 + i) * slt + h * slh, mask=rm, other=0.0).to(tl.float32) * lse_scale
        k_lo, k_end, row_lo = _key_range(L, first, mb, pos, window, BLOCK_M, BLOCK_N)
        for start in range(k_lo, k_end, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            jm = j < k_end
            s, _ = _scores(q, k_ptr, bt_ptr, g, kvh, j, jm, jm, d, dmask, rm, pos, row_lo,
                           sk0, sk1, sk2, sk3, sbt0, sbt1, page, scale, PRECISION)
            p = tl.exp(s - lse[:, None])
            tl.atomic_add(col_ptr + gh * max_k + j, tl.sum(p, axis=0), mask=jm)


@triton.jit
def _exact_block(q, k_ptr, v_ptr, bt_ptr, col_ptr, g, gh, kvh, lse, k_lo, k_end, first, ql, d, dmask, rm, pos,
                 row_lo, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1, max_k, scale, tau, window, page,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                 QK_FP32: tl.constexpr):
    """All keys of the block: sink and non-sink masses and outputs summed apart (no cancellation)."""
    S = tl.zeros([BLOCK_M], tl.float32)
    N = tl.zeros([BLOCK_M], tl.float32)
    o_s = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    o_n = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(k_lo, k_end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        jm = j < k_end
        s, blk = _scores(q, k_ptr, bt_ptr, g, kvh, j, jm, jm, d, dmask, rm, pos, row_lo,
                         sk0, sk1, sk2, sk3, sbt0, sbt1, page, scale, PRECISION)
        p = tl.exp(s - lse[:, None])
        sink = _sink_columns(col_ptr, gh, max_k, j, jm, first, ql, window, tau)
        ps = tl.where(sink[None, :], p, 0.0)
        S += tl.sum(ps, axis=1)
        N += tl.sum(p - ps, axis=1)
        o_s += _pv(ps, v_ptr, blk, kvh, j, jm, d, dmask, sv0, sv1, sv2, sv3, page, QK_FP32)
        o_n += _pv(p - ps, v_ptr, blk, kvh, j, jm, d, dmask, sv0, sv1, sv2, sv3, page, QK_FP32)
    return S, N, o_s, o_n


@triton.jit
def _correct_kernel(
    q_ptr, o_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, q_start_ptr, q_lens_ptr, heads_ptr, kv_heads_ptr,
    lse_ptr, col_ptr,
    sq0, sq1, sq2, so0, so1, so2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1, slt, slh,
    num_sel, max_k, lse_scale, scale, beta, tau, eps, cut, window, page, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    QK_FP32: tl.constexpr,
):
    """The sinks' share of each row from the sink columns only, and the epilogue on the
    native output; blocks with a row whose N is below the cut are computed exactly."""
    gh = tl.program_id(0)
    mb = tl.program_id(1)
    g = gh // num_sel
    hs = gh % num_sel
    ql = tl.load(q_lens_ptr + g).to(tl.int32)
    if (ql > 1) & (mb * BLOCK_M < ql):
        L, row0, h, first, i, rm, pos, d, dmask, q = _rows(
            q_ptr, seq_lens_ptr, q_start_ptr, heads_ptr, g, hs, mb, ql, sq0, sq1, sq2, head_dim, BLOCK_M, BLOCK_D,
            QK_FP32)
        kvh = tl.load(kv_heads_ptr + hs).to(tl.int64)
        lse = tl.load(lse_ptr + (row0 + i) * slt + h * slh, mask=rm, other=0.0).to(tl.float32) * lse_scale
        k_lo, k_end, row_lo = _key_range(L, first, mb, pos, window, BLOCK_M, BLOCK_N)
        S = tl.zeros([BLOCK_M], tl.float32)
        o_s = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(k_lo, k_end, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            jm = j < k_end
            sink = _sink_columns(col_ptr, gh, max_k, j, jm, first, ql, window, tau)
            if tl.max(sink.to(tl.int32), axis=0) > 0:  # only tiles with a sink read K and V, at sinks only
                s, blk = _scores(q, k_ptr, bt_ptr, g, kvh, j, sink, jm, d, dmask, rm, pos, row_lo,
                                 sk0, sk1, sk2, sk3, sbt0, sbt1, page, scale, PRECISION)
                ps = tl.where(sink[None, :], tl.exp(s - lse[:, None]), 0.0)
                S += tl.sum(ps, axis=1)
                o_s += _pv(ps, v_ptr, blk, kvh, j, sink, d, dmask, sv0, sv1, sv2, sv3, page, QK_FP32)
        N = 1.0 - S
        op = o_ptr + (row0 + i)[:, None] * so0 + h * so1 + d[None, :] * so2
        active = rm & (S > 0.0) & (N > eps)
        # 1 - S cannot tell a small N from one at or below eps: any small one is summed exactly
        if tl.max((rm & (S > 0.0) & (N < cut)).to(tl.int32), axis=0) > 0:
            S, N, o_s, o_n = _exact_block(
                q, k_ptr, v_ptr, bt_ptr, col_ptr, g, gh, kvh, lse, k_lo, k_end, first, ql, d, dmask, rm, pos, row_lo,
                sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1, max_k, scale, tau, window, page,
                BLOCK_M, BLOCK_D, BLOCK_N, PRECISION, QK_FP32)
            active = rm & (S > 0.0) & (N > eps)
        else:
            o_n = tl.load(op, mask=active[:, None] & dmask[None, :], other=0.0).to(tl.float32) - o_s
        factor = 1.0 + (1.0 - beta) * S / tl.where(active, N, 1.0)
        res = beta * o_s + factor[:, None] * o_n
        tl.store(op, res.to(o_ptr.dtype.element_ty), mask=active[:, None] & dmask[None, :])


def prefill_calibrate(
    query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads, *,
    scale: float, beta: float, threshold: float, window: int | None, max_query_len: int, max_seq_len: int,
    recompute_below: float, lse: torch.Tensor | None = None, lse_base2: bool = False, qk_fp32: bool,
    block_m: int = 64, block_n: int = 64,
) -> None:
    """Calibrate the prefill rows (``query_lens > 1``) of a group in place on ``output``.
    ``lse``: the native backend's row log-sum-exp as a ``[T, H]`` view (any strides;
    FLASH_ATTN's ``[H, T]`` ``softmax_lse`` passed transposed), float32; None: computed here."""
    G = block_table.shape[0]
    Hs = heads.shape[0]
    D = query.shape[-1]
    page = key_cache.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    win = int(window or 0)
    precision = "ieee" if qk_fp32 else "tf32"
    qs, ks, bts = query.stride(), key_cache.stride(), block_table.stride()
    grid = (G * Hs, triton.cdiv(max_query_len, block_m))
    const = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, QK_FP32=qk_fp32)
    lse_scale = math.log(2.0) if lse_base2 else 1.0
    if lse is None:
        lse = torch.empty(query.shape[0], query.shape[1], dtype=torch.float32, device=query.device)
        lse_scale = 1.0
        _lse_kernel[grid](
            query, key_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads, lse,
            *qs, *ks, *bts, *lse.stride(), Hs, float(scale), win, page, D, **const,
        )
    elif lse.dim() != 2 or lse.shape[0] < query.shape[0] or lse.shape[1] != query.shape[1]:
        raise ValueError(f"lse must be a [tokens, heads] view ({tuple(query.shape[:2])}), got {tuple(lse.shape)}")
    col = torch.zeros(G * Hs * max_seq_len, dtype=torch.float32, device=query.device)
    _colsum_kernel[grid](
        query, key_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads, lse, col,
        *qs, *ks, *bts, *lse.stride(), Hs, max_seq_len, lse_scale, float(scale), win, page, D, **const,
    )
    _correct_kernel[grid](
        query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads,
        lse, col, *qs, *output.stride(), *ks, *value_cache.stride(), *bts, *lse.stride(),
        Hs, max_seq_len, lse_scale, float(scale), float(beta), float(threshold), NONSINK_EPS, float(recompute_below),
        win, page, D, **const,
    )
