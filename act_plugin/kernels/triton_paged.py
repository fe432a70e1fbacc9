"""The fused GPU kernels (Triton): the algorithms of the CPU kernel, for CUDA tensors.

* Decode (``query_len == 1``), one program per (sequence, calibrated head): sweep A over
  the row's keys (online max and sum), sweep B recomputes the probabilities, finds the
  sinks (``p > tau``, position 0 never, window respected), sums ``P_S`` and the non-sink
  mass ``N`` directly and gathers ``o_S`` from the sink columns of V only; then
  ``o' = beta*o_S + (1 + (1-beta)*P_S/N) * (o - o_S)`` on the native ``o``. Rows with
  ``N < recompute_below`` get a sweep C over all V columns instead (the output-space form
  cancels there); rows with ``N <= eps`` or without sinks are left as they are.
* Prefill, one program per (sequence, head, block of rows), two kernels: pass 1 sweeps the
  keys twice (row log-sum-exp, then column sums added atomically into a per-(sequence,
  head) buffer); pass 2 recomputes each block's probabilities, reads the sinks off the
  column means, and accumulates the sink and non-sink parts of ``P V`` separately, so the
  calibrated output is exact (no cancellation) and ``N`` is summed directly.

No device-to-host synchronisation: grids come from tensor shapes and the host-int bounds
``max_query_len``/``max_seq_len``; per-sequence lengths are loaded inside the kernels and
bound their loops. Scratch buffers are sized from the same host ints. Tested on CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1``, tests/test_kernels_triton.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from act_plugin.core import NONSINK_EPS
from act_plugin.kernels.cpu import RECOMPUTE_BELOW  # the same cut as the CPU kernel


@triton.jit
def _decode_kernel(
    q_ptr, o_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, q_start_ptr, q_lens_ptr, heads_ptr, kv_heads_ptr,
    sq0, sq1, sq2, so0, so1, so2,
    sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1,
    scale, beta, tau, cut, eps, window, page, head_dim,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0)
    hs = tl.program_id(1)
    ql = tl.load(q_lens_ptr + g)
    if ql == 1:
        L = tl.load(seq_lens_ptr + g).to(tl.int32)
        row = tl.load(q_start_ptr + g).to(tl.int64)
        h = tl.load(heads_ptr + hs).to(tl.int64)
        kvh = tl.load(kv_heads_ptr + hs).to(tl.int64)
        lo = tl.where(window > 0, tl.maximum(L - window, 0), 0)
        d = tl.arange(0, BLOCK_D)
        dmask = d < head_dim
        q = tl.load(q_ptr + row * sq0 + h * sq1 + d * sq2, mask=dmask, other=0.0).to(tl.float32) * scale

        # sweep A: softmax statistics
        m = tl.max(tl.full([BLOCK_N], -1.0e30, tl.float32), axis=0)
        z = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
        for start in range(lo, L, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            jm = j < L
            blk = tl.load(bt_ptr + g * sbt0 + (j // page) * sbt1, mask=jm, other=0).to(tl.int64)
            kp = k_ptr + blk[:, None] * sk0 + kvh * sk1 + (j % page)[:, None] * sk2 + d[None, :] * sk3
            k = tl.load(kp, mask=jm[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            s = tl.where(jm, tl.sum(k * q[None, :], axis=1), -float("inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            z = z * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
            m = m_new

        # sweep B: sinks, P_S, N and o_S (V read only at sink columns)
        sink_mass = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
        nonsink_mass = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
        o_s = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(lo, L, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            jm = j < L
            blk = tl.load(bt_ptr + g * sbt0 + (j // page) * sbt1, mask=jm, other=0).to(tl.int64)
            kp = k_ptr + blk[:, None] * sk0 + kvh * sk1 + (j % page)[:, None] * sk2 + d[None, :] * sk3
            k = tl.load(kp, mask=jm[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)
            p = tl.where(jm, tl.exp(s - m) / z, 0.0)
            sink = jm & (p > tau) & (j != 0)
            ps = tl.where(sink, p, 0.0)
            sink_mass += tl.sum(ps, axis=0)
            nonsink_mass += tl.sum(p - ps, axis=0)
            vp = v_ptr + blk[:, None] * sv0 + kvh * sv1 + (j % page)[:, None] * sv2 + d[None, :] * sv3
            v = tl.load(vp, mask=sink[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            o_s += tl.sum(ps[:, None] * v, axis=0)

        if (sink_mass > 0.0) & (nonsink_mass > eps):
            factor = 1.0 + (1.0 - beta) * sink_mass / nonsink_mass
            op = o_ptr + row * so0 + h * so1 + d * so2
            if nonsink_mass >= cut:
                o = tl.load(op, mask=dmask, other=0.0).to(tl.float32)
                res = beta * o_s + factor * (o - o_s)
            else:
                # sweep C: the output-space form would cancel; all V columns
                res = tl.zeros([BLOCK_D], dtype=tl.float32)
                for start in range(lo, L, BLOCK_N):
                    j = start + tl.arange(0, BLOCK_N)
                    jm = j < L
                    blk = tl.load(bt_ptr + g * sbt0 + (j // page) * sbt1, mask=jm, other=0).to(tl.int64)
                    kp = k_ptr + blk[:, None] * sk0 + kvh * sk1 + (j % page)[:, None] * sk2 + d[None, :] * sk3
                    k = tl.load(kp, mask=jm[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                    s = tl.sum(k * q[None, :], axis=1)
                    p = tl.where(jm, tl.exp(s - m) / z, 0.0)
                    sink = jm & (p > tau) & (j != 0)
                    w = tl.where(sink, beta * p, factor * p)
                    vp = v_ptr + blk[:, None] * sv0 + kvh * sv1 + (j % page)[:, None] * sv2 + d[None, :] * sv3
                    v = tl.load(vp, mask=jm[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                    res += tl.sum(w[:, None] * v, axis=0)
            tl.store(op, res.to(o_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _prefill_scores(q, k_ptr, bt_ptr, g, kvh, j, jm, d, dmask, rm, pos, row_lo, sk0, sk1, sk2, sk3, sbt0, sbt1,
                    page, scale, PRECISION: tl.constexpr):
    """Scaled scores of the block's rows against keys ``j``, -inf where a row cannot see
    the key (causal, sliding window, padding); also the keys' cache blocks."""
    blk = tl.load(bt_ptr + g * sbt0 + (j // page) * sbt1, mask=jm, other=0).to(tl.int64)
    kp = k_ptr + blk[None, :] * sk0 + kvh * sk1 + (j % page)[None, :] * sk2 + d[:, None] * sk3
    kt = tl.load(kp, mask=dmask[:, None] & jm[None, :], other=0.0).to(q.dtype)  # [BLOCK_D, BLOCK_N]
    s = tl.dot(q, kt, input_precision=PRECISION) * scale
    vis = rm[:, None] & jm[None, :] & (j[None, :] <= pos[:, None]) & (j[None, :] >= row_lo[:, None])
    return tl.where(vis, s, -float("inf")), blk


@triton.jit
def _prefill_rows(q_ptr, seq_lens_ptr, q_start_ptr, heads_ptr, kv_heads_ptr, g, hs, mb, ql, sq0, sq1, sq2, head_dim,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, QK_FP32: tl.constexpr):
    """The block of rows ``mb`` of sequence ``g`` for calibrated head ``hs``: lengths,
    positions, masks and the queries (shared by both prefill passes)."""
    L = tl.load(seq_lens_ptr + g).to(tl.int32)
    row0 = tl.load(q_start_ptr + g).to(tl.int64)
    h = tl.load(heads_ptr + hs).to(tl.int64)
    kvh = tl.load(kv_heads_ptr + hs).to(tl.int64)
    first = L - ql
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = i < ql
    pos = first + i
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    q = tl.load(q_ptr + (row0 + i)[:, None] * sq0 + h * sq1 + d[None, :] * sq2,
                mask=rm[:, None] & dmask[None, :], other=0.0)
    if QK_FP32:
        q = q.to(tl.float32)
    return L, row0, h, kvh, first, i, rm, pos, d, dmask, q


@triton.jit
def _prefill_key_range(L, first, mb, pos, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys the block's rows can see: ``[k_lo, k_end)`` (k_lo aligned to BLOCK_N) and each
    row's lowest visible position under the sliding window."""
    k_end = tl.minimum(L, first + (mb + 1) * BLOCK_M)
    k_lo = tl.where(window > 0, tl.maximum(first + mb * BLOCK_M - window + 1, 0), 0)
    k_lo = (k_lo // BLOCK_N) * BLOCK_N
    row_lo = tl.where(window > 0, pos - window + 1, 0)
    return k_lo, k_end, row_lo


@triton.jit
def _prefill_pass1(
    q_ptr, k_ptr, bt_ptr, seq_lens_ptr, q_start_ptr, q_lens_ptr, heads_ptr, kv_heads_ptr, lse_ptr, col_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, sbt1,
    num_sel, max_q, max_k, scale, window, page, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    QK_FP32: tl.constexpr,
):
    gh = tl.program_id(0)
    mb = tl.program_id(1)
    g = gh // num_sel
    hs = gh % num_sel
    ql = tl.load(q_lens_ptr + g).to(tl.int32)
    if (ql > 1) & (mb * BLOCK_M < ql):
        L, row0, h, kvh, first, i, rm, pos, d, dmask, q = _prefill_rows(
            q_ptr, seq_lens_ptr, q_start_ptr, heads_ptr, kv_heads_ptr, g, hs, mb, ql, sq0, sq1, sq2, head_dim,
            BLOCK_M, BLOCK_D, QK_FP32)
        k_lo, k_end, row_lo = _prefill_key_range(L, first, mb, pos, window, BLOCK_M, BLOCK_N)
        m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        z = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(k_lo, k_end, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            jm = j < k_end
            s, _ = _prefill_scores(q, k_ptr, bt_ptr, g, kvh, j, jm, d, dmask, rm, pos, row_lo,
                                   sk0, sk1, sk2, sk3, sbt0, sbt1, page, scale, PRECISION)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            z = z * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new
        lse = m + tl.log(tl.where(rm, z, 1.0))
        tl.store(lse_ptr + gh * max_q + i, lse, mask=rm)
        for start in range(k_lo, k_end, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            jm = j < k_end
            s, _ = _prefill_scores(q, k_ptr, bt_ptr, g, kvh, j, jm, d, dmask, rm, pos, row_lo,
                                   sk0, sk1, sk2, sk3, sbt0, sbt1, page, scale, PRECISION)
            p = tl.exp(s - lse[:, None])
            tl.atomic_add(col_ptr + gh * max_k + j, tl.sum(p, axis=0), mask=jm)


@triton.jit
def _prefill_pass2(
    q_ptr, o_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, q_start_ptr, q_lens_ptr, heads_ptr, kv_heads_ptr,
    lse_ptr, col_ptr,
    sq0, sq1, sq2, so0, so1, so2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1,
    num_sel, max_q, max_k, scale, beta, tau, eps, window, page, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    QK_FP32: tl.constexpr,
):
    gh = tl.program_id(0)
    mb = tl.program_id(1)
    g = gh // num_sel
    hs = gh % num_sel
    ql = tl.load(q_lens_ptr + g).to(tl.int32)
    if (ql > 1) & (mb * BLOCK_M < ql):
        L, row0, h, kvh, first, i, rm, pos, d, dmask, q = _prefill_rows(
            q_ptr, seq_lens_ptr, q_start_ptr, heads_ptr, kv_heads_ptr, g, hs, mb, ql, sq0, sq1, sq2, head_dim,
            BLOCK_M, BLOCK_D, QK_FP32)
        lse = tl.load(lse_ptr + gh * max_q + i, mask=rm, other=0.0)
        k_lo, k_end, row_lo = _prefill_key_range(L, first, mb, pos, window, BLOCK_M, BLOCK_N)
        sink_mass = tl.zeros([BLOCK_M], dtype=tl.float32)
        nonsink_mass = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_sink = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc_rest = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(k_lo, k_end, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            jm = j < k_end
            s, blk = _prefill_scores(q, k_ptr, bt_ptr, g, kvh, j, jm, d, dmask, rm, pos, row_lo,
                                     sk0, sk1, sk2, sk3, sbt0, sbt1, page, scale, PRECISION)
            p = tl.exp(s - lse[:, None])
            # column score: mean attention over the rows of this call that see key j
            i_lo = tl.maximum(j - first, 0)
            i_hi = tl.where(window > 0, tl.minimum(ql - 1, j + window - 1 - first), ql - 1)
            count = (i_hi - i_lo + 1).to(tl.float32)
            col = tl.load(col_ptr + gh * max_k + j, mask=jm, other=0.0)
            sink = jm & (count > 0) & (j != 0) & (col / tl.maximum(count, 1.0) > tau)
            ps = tl.where(sink[None, :], p, 0.0)
            pr = p - ps
            sink_mass += tl.sum(ps, axis=1)
            nonsink_mass += tl.sum(pr, axis=1)
            vp = v_ptr + blk[:, None] * sv0 + kvh * sv1 + (j % page)[:, None] * sv2 + d[None, :] * sv3
            v = tl.load(vp, mask=jm[:, None] & dmask[None, :], other=0.0)
            if QK_FP32:
                # float32 caches: exact float32 products (no TF32), as the reference
                v = v.to(tl.float32)
                acc_sink += tl.dot(ps, v, input_precision="ieee")
                acc_rest += tl.dot(pr, v, input_precision="ieee")
            else:
                # 16-bit caches: probabilities rounded to the cache dtype on tensor cores with
                # float32 accumulation, as flash attention does (float32 "ieee" dots run on
                # CUDA cores and cost ~10x); the sink masses above stay float32
                acc_sink += tl.dot(ps.to(v.dtype), v)
                acc_rest += tl.dot(pr.to(v.dtype), v)
        active = rm & (sink_mass > 0.0) & (nonsink_mass > eps)
        factor = 1.0 + (1.0 - beta) * sink_mass / tl.where(active, nonsink_mass, 1.0)
        res = beta * acc_sink + factor[:, None] * acc_rest
        op = o_ptr + (row0 + i)[:, None] * so0 + h * so1 + d[None, :] * so2
        tl.store(op, res.to(o_ptr.dtype.element_ty), mask=active[:, None] & dmask[None, :])


def calibrate_paged_triton(
    query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads, *,
    scale, beta, threshold, window, max_query_len, max_seq_len, recompute_below=None,
    block_n: int = 64, block_m: int = 64,
) -> None:
    """Same contract as :func:`act_plugin.kernels.calibrate_paged`; no host synchronisation."""
    G = block_table.shape[0]
    Hs = heads.shape[0]
    D = query.shape[-1]
    page = key_cache.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    cut = RECOMPUTE_BELOW.get(output.dtype, 1.0 / 16) if recompute_below is None else recompute_below
    win = int(window or 0)
    qs, os_, bts = query.stride(), output.stride(), block_table.stride()
    ks, vs = key_cache.stride(), value_cache.stride()
    _decode_kernel[(G, Hs)](
        query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads,
        *qs, *os_, *ks, *vs, *bts,
        float(scale), float(beta), float(threshold), float(cut), NONSINK_EPS, win, page, D,
        BLOCK_N=block_n, BLOCK_D=block_d,
    )
    if max_query_len <= 1:
        return
    # Scores: 16-bit q and k multiply natively (exact products, float32 accumulation);
    # float32 ones as float32 ("ieee", no TF32 rounding), so that the sinks match the
    # reference. Triton 3.9's interpreter computes bf16 tl.dot wrongly, so under it bf16
    # operands go through float32 too (the native 16-bit path is tested with float16).
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    qk_fp32 = query.dtype == torch.float32 or (interpreted and query.dtype == torch.bfloat16)
    precision = "ieee" if qk_fp32 else "tf32"
    lse = torch.empty(G * Hs * max_query_len, dtype=torch.float32, device=query.device)
    col = torch.zeros(G * Hs * max_seq_len, dtype=torch.float32, device=query.device)
    grid = (G * Hs, triton.cdiv(max_query_len, block_m))
    _prefill_pass1[grid](
        query, key_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads, lse, col,
        *qs, *ks, *bts, Hs, max_query_len, max_seq_len, float(scale), win, page, D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, QK_FP32=qk_fp32,
    )
    _prefill_pass2[grid](
        query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads,
        lse, col, *qs, *os_, *ks, *vs, *bts, Hs, max_query_len, max_seq_len,
        float(scale), float(beta), float(threshold), NONSINK_EPS, win, page, D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, QK_FP32=qk_fp32,
    )
