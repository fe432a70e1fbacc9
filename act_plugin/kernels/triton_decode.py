"""Split-K (flash-decoding) decode attention with ACT, in Triton: one pass over K and V.

Decode rows see their keys once, so a key's column score is its probability ``p_j`` and a
sink is a key with ``p_j > tau`` (position 0 never). The keys of a row are cut into splits,
one program per (sequence, KV head, split) computing every query head of that KV head
(GQA: K and V are read once for the group). A split keeps, per query head:

* its running maximum ``m``, the sum of all its ``exp(s - m)`` (``l_all``) and that of its
  non-candidate keys (``l_nc``), and the non-candidate part of ``P V`` (``acc``);
* the *candidates*: keys whose probability against the split's running log-sum-exp is
  above tau. The running log-sum-exp never exceeds the global one, so every global sink is
  a candidate when it is read, and a candidate that falls to ``p <= tau`` as the running
  sum grows can never become a sink again: it is handed back to ``l_nc``/``acc`` (its V row
  re-read). Candidates always have ``p > tau`` against one normaliser, so a split holds
  fewer than ``1/tau`` of them: ``CAND`` slots (``candidate_slots(tau)``) suffice. Where
  tau is so small that they might not (more than :data:`MAX_CAND`), a key that finds no
  free slot sets the row's overflow flag and the reduce recomputes that row exactly from
  all its keys: slower, never wrong.

The reduce (one program per (sequence, query head)) merges the splits' statistics into
the global log-sum-exp, resolves the candidates against it (``p > tau``: a sink), reads
only the candidates' V rows, and writes ``O' = beta*O_S + g*O_N`` with the non-sink part
``O_N`` and the mass ``N`` summed directly (``g = 1 + (1-beta) S/N``): no ``O - O_S``
cancellation, so no recompute cut. Rows without sinks or with ``N <= eps`` get plain
attention (whole-layer mode) or are not written (calibration mode).

Two modes, one kernel: ``whole`` computes every head of the layer for the decode rows
(uncalibrated heads: plain attention) and writes every row; calibration mode (``whole =
False``) runs only the KV heads that have a calibrated head and writes only the calibrated
rows that change, leaving the native output elsewhere. No host synchronisation: grids and
scratch sizes come from tensor shapes and the host bound ``max_seq_len``; per-row lengths
are read on the device and bound the loops.

Per-row mode (``row_arms``, for CUDA graphs): each row's arm (its calibrated heads in this
layer, beta and tau) is read on the device from persistent tables that the engine rewrites
in place every step, so a launch captured once replays for any mix of arms and uncalibrated
rows. The device helpers live in :mod:`act_plugin.kernels.triton_decode_tiles`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from act_plugin.core import NONSINK_EPS
from act_plugin.kernels.row_arms import RowArms
from act_plugin.kernels.triton_decode_tiles import (  # noqa: F401 (re-exported: kernels share them)
    _exact_row,
    _global_lse,
    _group_heads,
    _hand_back,
    _insert,
    _key_tile,
    _row_arm,
    _row_group_heads,
    _store_split,
    _value_rows,
    _zero,
)

# Candidate slots per (query head, split). A split holds fewer than 1/tau candidates, so
# tau >= 1/(MAX_CAND - 1) can never overflow; smaller tau takes the exact fallback where
# a split really holds more.
MAX_CAND = 32
# Candidates are kept with a small margin below the threshold (ln-space), so that the
# reduce's float comparison p > tau never meets a key the split has already dropped.
CAND_MARGIN = 1e-3
_NO_TAU = 1.0e30  # tau <= 0: every key is a candidate (ln-threshold -inf)
# Per-row mode (CUDA graphs: the arms, so tau, are not known at capture): slots enough for
# tau >= 1/15; rows of smaller tau whose split holds more take the exact fallback.
ROW_CAND = 16
CAND_MARGIN_T: tl.constexpr = tl.constexpr(CAND_MARGIN)  # the same margin, inside the kernels


def candidate_slots(tau: float) -> int:
    """Slots per (query head, split) for threshold ``tau``: a power of two holding
    ``floor(1/tau) + 1`` (the bound, plus the margin's rounding), at most MAX_CAND."""
    if not tau > 0.0:
        return MAX_CAND  # tau <= 0: every key is a candidate; overflow -> exact fallback
    need = int(math.floor(1.0 / tau)) + 1
    return min(MAX_CAND, max(2, triton.next_power_of_2(need)))



@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, q_start_ptr, q_lens_ptr, heads_ptr,
    row_arm_ptr, arm_beta_ptr, arm_tau_ptr, flags_ptr, flag_stride,
    stat_ptr, acc_ptr, cs_ptr, ci_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1,
    num_heads, num_cal, num_splits, split_len, scale, log_tau, window, page, head_dim,
    QPG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAND: tl.constexpr, HS_P: tl.constexpr, WHOLE: tl.constexpr, HAS_QLENS: tl.constexpr,
    DOT_FP32: tl.constexpr, PER_ROW: tl.constexpr,
):
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    if PER_ROW:  # each row's arm from the tables (CUDA graphs): its heads and tau
        h, hmask, is_cal, log_tau = _row_group_heads(row_arm_ptr, arm_tau_ptr, flags_ptr, flag_stride, g, kvh,
                                                     CAND_MARGIN_T, QPG, BLOCK_H)
    else:
        h, hmask, is_cal = _group_heads(heads_ptr, num_cal, kvh, QPG, BLOCK_H, HS_P)
    decode = g >= 0
    if HAS_QLENS:
        decode = tl.load(q_lens_ptr + g) == 1
    if not WHOLE:
        decode = decode & (tl.max(is_cal.to(tl.int32)) > 0)  # calibration mode: only KV heads with calibrated heads
    if decode:
        L = tl.load(seq_lens_ptr + g).to(tl.int32)
        row = tl.load(q_start_ptr + g).to(tl.int64)
        lo = tl.where(window > 0, tl.maximum(L - window, 0), 0)
        k0 = lo + sp * split_len
        k1 = tl.minimum(L, k0 + split_len)
        d = tl.arange(0, BLOCK_D)
        dmask = d < head_dim
        q = tl.load(q_ptr + row * sq0 + h[:, None] * sq1 + d[None, :] * sq2, mask=hmask[:, None] & dmask[None, :],
                    other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        ltau = tl.where(is_cal, log_tau, 1.0e30)  # uncalibrated heads: no candidates
        m = tl.full([BLOCK_H], -1.0e30, tl.float32)
        l_all = tl.zeros([BLOCK_H], tl.float32)
        l_nc = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        cand_s = tl.full([BLOCK_H, CAND], -1.0e30, tl.float32)
        cand_i = tl.full([BLOCK_H, CAND], -1, tl.int32)
        overflow = tl.zeros([BLOCK_H], tl.int32)
        for start in range(k0, k1, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            jm = j < k1
            kt, blk = _key_tile(k_ptr, bt_ptr, g, kvh, j, jm, d, dmask, sk0, sk1, sk2, sk3, sbt0, sbt1, page)
            if DOT_FP32:
                s = tl.dot(q, kt.to(tl.float32), input_precision="ieee") * scale
            else:
                s = tl.dot(q, kt) * scale
            s = tl.where(jm[None, :], s, -float("inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            e = tl.exp(s - m_new[:, None])
            l_all = l_all * alpha + tl.sum(e, axis=1)
            thr = m_new + tl.log(l_all) + ltau  # ln(tau * running sum): the running candidate bound
            new = (s > thr[:, None]) & (j != 0)[None, :] & jm[None, :]
            e_nc = tl.where(new, 0.0, e)
            l_nc = l_nc * alpha + tl.sum(e_nc, axis=1)
            acc = acc * alpha[:, None]
            vp = v_ptr + blk[:, None] * sv0 + kvh * sv1 + (j % page)[:, None] * sv2 + d[None, :] * sv3
            v = tl.load(vp, mask=jm[:, None] & dmask[None, :], other=0.0)
            if DOT_FP32:
                acc += tl.dot(e_nc, v.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(e_nc.to(v.dtype), v)
            cand_i, l_nc, acc = _hand_back(cand_s, cand_i, thr, m_new, l_nc, acc, v_ptr, bt_ptr, g, kvh, d, dmask,
                                           sv0, sv1, sv2, sv3, sbt0, sbt1, page, CAND)
            cand_s, cand_i, overflow = _insert(new, s, j, cand_s, cand_i, overflow, CAND)
            m = m_new
        _store_split(stat_ptr, acc_ptr, cs_ptr, ci_ptr, g, h, hmask, sp, num_heads, num_splits, m, l_all, l_nc,
                     overflow, acc, cand_s, cand_i, d, dmask, BLOCK_D, CAND)



@triton.jit
def _reduce_kernel(
    q_ptr, o_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, q_start_ptr, q_lens_ptr, heads_ptr,
    row_arm_ptr, arm_beta_ptr, arm_tau_ptr, flags_ptr, flag_stride,
    stat_ptr, acc_ptr, cs_ptr, ci_ptr,
    sq0, sq1, sq2, so0, so1, so2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1,
    num_heads, num_cal, num_splits, scale, beta, tau, eps, window, page, head_dim,
    QPG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAND: tl.constexpr, HS_P: tl.constexpr,
    WHOLE: tl.constexpr, HAS_QLENS: tl.constexpr, PER_ROW: tl.constexpr,
):
    g = tl.program_id(0)
    h = tl.program_id(1)
    if PER_ROW:  # each row's arm from the tables (CUDA graphs): its heads, beta and tau
        is_cal, beta_r, tau_r = _row_arm(row_arm_ptr, arm_beta_ptr, arm_tau_ptr, flags_ptr, flag_stride, g, h)
    else:
        c = tl.arange(0, HS_P)
        listed = tl.load(heads_ptr + c, mask=c < num_cal, other=-1)
        is_cal = tl.max((listed == h).to(tl.int32), axis=0) > 0
        beta_r = beta
        tau_r = tau
    run = is_cal
    if WHOLE:
        run = g >= 0
    if HAS_QLENS:
        run = run & (tl.load(q_lens_ptr + g) == 1)
    if PER_ROW:  # rows a CUDA graph pads the batch with have no keys
        run = run & (tl.load(seq_lens_ptr + g) > 0)
    if run:
        kvh = h // QPG
        L = tl.load(seq_lens_ptr + g).to(tl.int32)
        row = tl.load(q_start_ptr + g).to(tl.int64)
        lo = tl.where(window > 0, tl.maximum(L - window, 0), 0)
        d = tl.arange(0, BLOCK_D)
        dmask = d < head_dim
        base = ((g * num_heads + h) * num_splits).to(tl.int64)
        lse, overflow = _global_lse(stat_ptr, base, num_splits)
        tau_h = tl.where(is_cal, tau_r, 2.0)  # uncalibrated heads: no sinks (p <= 1)
        slots = tl.arange(0, CAND)
        S = _zero()
        N = _zero()
        o_s = tl.zeros([BLOCK_D], tl.float32)
        o_n = tl.zeros([BLOCK_D], tl.float32)
        for sp in range(num_splits):
            cell = base + sp
            w = tl.exp(tl.load(stat_ptr + cell * 4) - lse)
            N += tl.load(stat_ptr + cell * 4 + 2) * w
            o_n += tl.load(acc_ptr + cell * BLOCK_D + d, mask=dmask, other=0.0) * w
            ci = tl.load(ci_ptr + cell * CAND + slots)
            valid = ci >= 0
            if tl.max(valid.to(tl.int32), axis=0) > 0:
                p = tl.where(valid, tl.exp(tl.load(cs_ptr + cell * CAND + slots) - lse), 0.0)
                sink = valid & (p > tau_h)
                ps = tl.where(sink, p, 0.0)
                S += tl.sum(ps, axis=0)
                N += tl.sum(p - ps, axis=0)
                v = _value_rows(v_ptr, bt_ptr, g, kvh, ci[:, None], valid[:, None], d[None, :], dmask[None, :],
                                sv0, sv1, sv2, sv3, sbt0, sbt1, page)
                o_s += tl.sum(ps[:, None] * v, axis=0)
                o_n += tl.sum((p - ps)[:, None] * v, axis=0)
        if overflow & is_cal:
            S, N, o_s, o_n = _exact_row(q_ptr, k_ptr, v_ptr, bt_ptr, g, row, h, kvh, lo, L, lse, tau_r, scale, d, dmask,
                                        sq0, sq1, sq2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1, page,
                                        BLOCK_N, BLOCK_D)
        active = is_cal & (S > 0.0) & (N > eps)
        factor = 1.0 + (1.0 - beta_r) * S / tl.where(active, N, 1.0)
        res = tl.where(active, beta_r * o_s + factor * o_n, o_s + o_n)
        op = o_ptr + row * so0 + h * so1 + d * so2
        keep = dmask & (tl.zeros([BLOCK_D], tl.int32) + active.to(tl.int32) > 0)
        if WHOLE:
            keep = dmask
        tl.store(op, res.to(o_ptr.dtype.element_ty), mask=keep)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8  # the interpreter: a few splits, enough to exercise the merge


_sms: dict = {}


def _sm_count(index: int) -> int:
    if index not in _sms:
        _sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sms[index]


def plan_splits(num_rows: int, kv_heads: int, span: int, block_n: int, target: int) -> tuple[int, int]:
    """``(num_splits, split_len)``: enough (sequence, KV head, split) programs to fill the
    device (``target``), splits a whole number of key tiles. Host integers only."""
    span = max(1, span)
    tiles = triton.cdiv(span, block_n)
    want = max(1, min(tiles, triton.cdiv(target, max(1, num_rows * kv_heads))))
    split_len = triton.cdiv(tiles, want) * block_n
    return triton.cdiv(span, split_len), split_len


def decode_split_k(
    query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, *,
    scale: float, beta: float, threshold: float, window: int | None, max_seq_len: int, whole: bool,
    block_n: int = 64, split_len: int | None = None, row_arms: RowArms | None = None, cand: int | None = None,
) -> torch.Tensor | None:
    """Launch the split and reduce kernels for the decode rows of a group (rows with
    ``query_lens == 1``; every row when ``query_lens`` is None). ``whole``: write every head
    of those rows (uncalibrated heads: plain attention); else only the calibrated heads'
    changed rows. ``split_len`` (a multiple of ``block_n``) overrides the split planning.
    ``row_arms``: per-row mode (rows without keys are skipped: a CUDA graph's padding);
    ``cand`` candidate slots per split (default: from ``threshold``, or :data:`ROW_CAND` per
    row). Returns the per-split statistics ``[G, H, splits, 4]`` (max, sum, non-candidate
    sum, overflow flag; rows and heads the kernels skipped hold garbage) for tests, or None
    when there was nothing to launch."""
    G = block_table.shape[0]
    H, D = query.shape[1], query.shape[2]
    Hkv = key_cache.shape[1]
    if G == 0 or (heads.shape[0] == 0 and not whole and row_arms is None):
        return None
    if row_arms is not None and (row_arms.head_flags.shape[1] != H or row_arms.head_flags.stride(1) != 1):
        raise ValueError(f"row_arms.head_flags must be [arms, {H}] with unit head stride")
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({Hkv})")
    qpg = H // Hkv
    span = min(max_seq_len, window) if window else max_seq_len
    if split_len is None:
        num_splits, split_len = plan_splits(G, Hkv, span, block_n, _target_programs(query.device))
    else:
        num_splits = triton.cdiv(max(1, span), split_len)
    if cand is None:
        cand = ROW_CAND if row_arms is not None else candidate_slots(float(threshold))
    block_d = max(16, triton.next_power_of_2(D))
    dev = query.device
    stats = torch.empty(G * H * num_splits * 4, dtype=torch.float32, device=dev)
    acc = torch.empty(G * H * num_splits * block_d, dtype=torch.float32, device=dev)
    cand_s = torch.empty(G * H * num_splits * cand, dtype=torch.float32, device=dev)
    cand_i = torch.empty(G * H * num_splits * cand, dtype=torch.int32, device=dev)
    hs_p = max(2, triton.next_power_of_2(max(1, heads.shape[0])))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    # float32 caches: exact float32 dots ("ieee"); 16-bit ones on tensor cores. Triton's
    # interpreter computes bf16 dots wrongly, so there they go through float32.
    dot_fp32 = query.dtype == torch.float32 or (interpreted and query.dtype == torch.bfloat16)
    log_tau = math.log(threshold) - CAND_MARGIN if threshold > 0 else -_NO_TAU
    qlens = query_lens if query_lens is not None else seq_lens
    win = int(window or 0)
    # the tables of the mode not in use are never read: any tensor stands in for them
    tables = (row_arms.row_arm, row_arms.beta, row_arms.tau, row_arms.head_flags, row_arms.head_flags.stride(0)) \
        if row_arms is not None else (seq_lens, seq_lens, seq_lens, seq_lens, 0)
    common = (block_table, seq_lens, query_start, qlens, heads, *tables, stats, acc, cand_s, cand_i)
    _split_kernel[(G, Hkv, num_splits)](
        query, key_cache, value_cache, *common,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
        H, heads.shape[0], num_splits, split_len, float(scale), float(log_tau), win, key_cache.shape[2], D,
        QPG=qpg, BLOCK_H=max(16, triton.next_power_of_2(qpg)), BLOCK_N=block_n, BLOCK_D=block_d, CAND=cand,
        HS_P=hs_p, WHOLE=whole, HAS_QLENS=query_lens is not None, DOT_FP32=dot_fp32, PER_ROW=row_arms is not None,
    )
    _reduce_kernel[(G, H)](
        query, output, key_cache, value_cache, *common,
        *query.stride(), *output.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
        H, heads.shape[0], num_splits, float(scale), float(beta), float(threshold), NONSINK_EPS, win,
        key_cache.shape[2], D,
        QPG=qpg, BLOCK_N=block_n, BLOCK_D=block_d, CAND=cand, HS_P=hs_p, WHOLE=whole,
        HAS_QLENS=query_lens is not None, PER_ROW=row_arms is not None,
    )
    return stats.view(G, H, num_splits, 4)
