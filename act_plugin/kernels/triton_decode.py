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
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from act_plugin.core import NONSINK_EPS

# Candidate slots per (query head, split). A split holds fewer than 1/tau candidates, so
# tau >= 1/(MAX_CAND - 1) can never overflow; smaller tau takes the exact fallback where
# a split really holds more.
MAX_CAND = 32
# Candidates are kept with a small margin below the threshold (ln-space), so that the
# reduce's float comparison p > tau never meets a key the split has already dropped.
CAND_MARGIN = 1e-3
_NO_TAU = 1.0e30  # tau <= 0: every key is a candidate (ln-threshold -inf)


def candidate_slots(tau: float) -> int:
    """Slots per (query head, split) for threshold ``tau``: a power of two holding
    ``floor(1/tau) + 1`` (the bound, plus the margin's rounding), at most MAX_CAND."""
    if not tau > 0.0:
        return MAX_CAND  # tau <= 0: every key is a candidate; overflow -> exact fallback
    need = int(math.floor(1.0 / tau)) + 1
    return min(MAX_CAND, max(2, triton.next_power_of_2(need)))


@triton.jit
def _zero():
    """A float32 scalar zero that loops may carry (a Python float may not change type)."""
    return tl.sum(tl.zeros([2], tl.float32), axis=0)


@triton.jit
def _group_heads(heads_ptr, num_cal, kvh, QPG: tl.constexpr, BLOCK_H: tl.constexpr, HS_P: tl.constexpr):
    """The query heads of KV head ``kvh`` (padded to BLOCK_H), their mask, and which of
    them are in the calibrated list ``heads``."""
    hh = tl.arange(0, BLOCK_H)
    hmask = hh < QPG
    h = kvh * QPG + hh
    c = tl.arange(0, HS_P)
    listed = tl.load(heads_ptr + c, mask=c < num_cal, other=-1)
    is_cal = tl.max((h[:, None] == listed[None, :]).to(tl.int32), axis=1) > 0
    return h, hmask, is_cal & hmask


@triton.jit
def _key_tile(k_ptr, bt_ptr, g, kvh, j, jm, d, dmask, sk0, sk1, sk2, sk3, sbt0, sbt1, page):
    """Keys ``j`` of sequence ``g`` transposed (``[BLOCK_D, BLOCK_N]``) and their cache blocks."""
    blk = tl.load(bt_ptr + g * sbt0 + (j // page) * sbt1, mask=jm, other=0).to(tl.int64)
    kp = k_ptr + blk[None, :] * sk0 + kvh * sk1 + (j % page)[None, :] * sk2 + d[:, None] * sk3
    return tl.load(kp, mask=dmask[:, None] & jm[None, :], other=0.0), blk


@triton.jit
def _value_rows(v_ptr, bt_ptr, g, kvh, idx, mask, d, dmask, sv0, sv1, sv2, sv3, sbt0, sbt1, page):
    """V rows at key positions ``idx`` -> float32, zero where masked; ``idx``/``mask`` carry a
    trailing unit dimension that broadcasts against ``d``/``dmask`` (the head dimension)."""
    safe = tl.where(mask, idx, 0)
    blk = tl.load(bt_ptr + g * sbt0 + (safe // page) * sbt1, mask=mask, other=0).to(tl.int64)
    vp = v_ptr + blk * sv0 + kvh * sv1 + (safe % page) * sv2 + d * sv3
    return tl.load(vp, mask=mask & dmask, other=0.0).to(tl.float32)


@triton.jit
def _hand_back(cand_s, cand_i, thr, m_new, l_nc, acc, v_ptr, bt_ptr, g, kvh, d, dmask,
               sv0, sv1, sv2, sv3, sbt0, sbt1, page, CAND: tl.constexpr):
    """Candidates now at or below the running threshold can never be sinks: their mass
    and values go back to the non-candidate sums, and their slots are freed."""
    drop = (cand_i >= 0) & (cand_s <= thr[:, None])
    if tl.max(drop.to(tl.int32)) > 0:
        w = tl.where(drop, tl.exp(cand_s - m_new[:, None]), 0.0)
        l_nc += tl.sum(w, axis=1)
        slots = tl.arange(0, CAND)
        for c in range(CAND):  # one slot at a time: [BLOCK_H, BLOCK_D] V rows, not [BLOCK_H, CAND, BLOCK_D]
            at = slots[None, :] == c
            idx = tl.sum(tl.where(at, cand_i, 0), axis=1)
            wc = tl.sum(tl.where(at, w, 0.0), axis=1)
            dc = tl.max((at & drop).to(tl.int32), axis=1) > 0
            v = _value_rows(v_ptr, bt_ptr, g, kvh, idx[:, None], dc[:, None], d[None, :], dmask[None, :],
                            sv0, sv1, sv2, sv3, sbt0, sbt1, page)
            acc += wc[:, None] * v
        cand_i = tl.where(drop, -1, cand_i)
    return cand_i, l_nc, acc


@triton.jit
def _insert(new, s, j, cand_s, cand_i, overflow, CAND: tl.constexpr):
    """Move the keys flagged ``new`` ([BLOCK_H, BLOCK_N]) into free candidate slots, one per
    row and iteration; a key that finds no free slot sets the row's overflow flag."""
    slots = tl.arange(0, CAND)
    rounds = tl.max(tl.sum(new.to(tl.int32), axis=1))
    for _ in range(rounds):
        ms = tl.where(new, s, -float("inf"))
        best = tl.max(ms, axis=1)
        has = best > -float("inf")
        pick = tl.max(tl.where(new & (ms == best[:, None]), j[None, :], -1), axis=1)
        free = cand_i < 0
        slot = tl.min(tl.where(free, slots[None, :], CAND), axis=1)
        place = has[:, None] & (slots[None, :] == slot[:, None])
        cand_s = tl.where(place, best[:, None], cand_s)
        cand_i = tl.where(place, pick[:, None], cand_i)
        overflow = tl.maximum(overflow, (has & (slot >= CAND)).to(tl.int32))
        new = new & (j[None, :] != pick[:, None])
    return cand_s, cand_i, overflow


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, q_start_ptr, q_lens_ptr, heads_ptr,
    stat_ptr, acc_ptr, cs_ptr, ci_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1,
    num_heads, num_cal, num_splits, split_len, scale, log_tau, window, page, head_dim,
    QPG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAND: tl.constexpr, HS_P: tl.constexpr, WHOLE: tl.constexpr, HAS_QLENS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
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
def _store_split(stat_ptr, acc_ptr, cs_ptr, ci_ptr, g, h, hmask, sp, num_heads, num_splits, m, l_all, l_nc,
                 overflow, acc, cand_s, cand_i, d, dmask, BLOCK_D: tl.constexpr, CAND: tl.constexpr):
    """Scratch layout, per (sequence, query head, split): 4 stats (m, l_all, l_nc,
    overflow), the ``[D]`` partial output, ``CAND`` candidate scores and key indices."""
    cell = ((g * num_heads + h) * num_splits + sp).to(tl.int64)
    tl.store(stat_ptr + cell * 4 + 0, m, mask=hmask)
    tl.store(stat_ptr + cell * 4 + 1, l_all, mask=hmask)
    tl.store(stat_ptr + cell * 4 + 2, l_nc, mask=hmask)
    tl.store(stat_ptr + cell * 4 + 3, overflow.to(tl.float32), mask=hmask)
    tl.store(acc_ptr + cell[:, None] * BLOCK_D + d[None, :], acc, mask=hmask[:, None] & dmask[None, :])
    c = tl.arange(0, CAND)
    tl.store(cs_ptr + cell[:, None] * CAND + c[None, :], cand_s, mask=hmask[:, None])
    tl.store(ci_ptr + cell[:, None] * CAND + c[None, :], cand_i, mask=hmask[:, None])


@triton.jit
def _global_lse(stat_ptr, base, num_splits):
    """Merge the splits' (max, sum) into the row's log-sum-exp; and whether any split overflowed."""
    m = _zero() - 1.0e30
    for sp in range(num_splits):
        m = tl.maximum(m, tl.load(stat_ptr + (base + sp) * 4))
    total = _zero()
    overflow = _zero()
    for sp in range(num_splits):
        ms = tl.load(stat_ptr + (base + sp) * 4)
        total += tl.load(stat_ptr + (base + sp) * 4 + 1) * tl.exp(ms - m)
        overflow = tl.maximum(overflow, tl.load(stat_ptr + (base + sp) * 4 + 3))
    return m + tl.log(total), overflow > 0.0


@triton.jit
def _exact_row(q_ptr, k_ptr, v_ptr, bt_ptr, g, row, h, kvh, lo, L, lse, tau, scale, d, dmask,
               sq0, sq1, sq2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1, page,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The overflow fallback: the row's sink and non-sink masses and outputs from all its
    keys (a second pass over K and V for this row only)."""
    q = tl.load(q_ptr + row * sq0 + h * sq1 + d * sq2, mask=dmask, other=0.0).to(tl.float32)
    S = _zero()
    N = _zero()
    o_s = tl.zeros([BLOCK_D], tl.float32)
    o_n = tl.zeros([BLOCK_D], tl.float32)
    for start in range(lo, L, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        jm = j < L
        kt, blk = _key_tile(k_ptr, bt_ptr, g, kvh, j, jm, d, dmask, sk0, sk1, sk2, sk3, sbt0, sbt1, page)
        s = tl.sum(kt.to(tl.float32) * q[:, None], axis=0) * scale
        p = tl.where(jm, tl.exp(s - lse), 0.0)
        sink = jm & (p > tau) & (j != 0)
        ps = tl.where(sink, p, 0.0)
        S += tl.sum(ps, axis=0)
        N += tl.sum(p - ps, axis=0)
        v = _value_rows(v_ptr, bt_ptr, g, kvh, j[:, None], jm[:, None], d[None, :], dmask[None, :],
                        sv0, sv1, sv2, sv3, sbt0, sbt1, page)
        o_s += tl.sum(ps[:, None] * v, axis=0)
        o_n += tl.sum((p - ps)[:, None] * v, axis=0)
    return S, N, o_s, o_n


@triton.jit
def _reduce_kernel(
    q_ptr, o_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, q_start_ptr, q_lens_ptr, heads_ptr,
    stat_ptr, acc_ptr, cs_ptr, ci_ptr,
    sq0, sq1, sq2, so0, so1, so2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1,
    num_heads, num_cal, num_splits, scale, beta, tau, eps, window, page, head_dim,
    QPG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAND: tl.constexpr, HS_P: tl.constexpr,
    WHOLE: tl.constexpr, HAS_QLENS: tl.constexpr,
):
    g = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.arange(0, HS_P)
    listed = tl.load(heads_ptr + c, mask=c < num_cal, other=-1)
    is_cal = tl.max((listed == h).to(tl.int32), axis=0) > 0
    run = is_cal
    if WHOLE:
        run = g >= 0
    if HAS_QLENS:
        run = run & (tl.load(q_lens_ptr + g) == 1)
    if run:
        kvh = h // QPG
        L = tl.load(seq_lens_ptr + g).to(tl.int32)
        row = tl.load(q_start_ptr + g).to(tl.int64)
        lo = tl.where(window > 0, tl.maximum(L - window, 0), 0)
        d = tl.arange(0, BLOCK_D)
        dmask = d < head_dim
        base = ((g * num_heads + h) * num_splits).to(tl.int64)
        lse, overflow = _global_lse(stat_ptr, base, num_splits)
        tau_h = tl.where(is_cal, tau, 2.0)  # uncalibrated heads: no sinks (p <= 1)
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
            S, N, o_s, o_n = _exact_row(q_ptr, k_ptr, v_ptr, bt_ptr, g, row, h, kvh, lo, L, lse, tau, scale, d, dmask,
                                        sq0, sq1, sq2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1, page,
                                        BLOCK_N, BLOCK_D)
        active = is_cal & (S > 0.0) & (N > eps)
        factor = 1.0 + (1.0 - beta) * S / tl.where(active, N, 1.0)
        res = tl.where(active, beta * o_s + factor * o_n, o_s + o_n)
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
    block_n: int = 64, split_len: int | None = None,
) -> torch.Tensor | None:
    """Launch the split and reduce kernels for the decode rows of a group (rows with
    ``query_lens == 1``; every row when ``query_lens`` is None). ``whole``: write every head
    of those rows (uncalibrated heads: plain attention); else only the calibrated heads'
    changed rows. ``split_len`` (a multiple of ``block_n``) overrides the split planning.
    Returns the per-split statistics ``[G, H, splits, 4]`` (max, sum, non-candidate sum,
    overflow flag; rows and heads the kernels skipped hold garbage) for tests, or None when
    there was nothing to launch."""
    G = block_table.shape[0]
    H, D = query.shape[1], query.shape[2]
    Hkv = key_cache.shape[1]
    if G == 0 or (heads.shape[0] == 0 and not whole):
        return None
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({Hkv})")
    qpg = H // Hkv
    span = min(max_seq_len, window) if window else max_seq_len
    if split_len is None:
        num_splits, split_len = plan_splits(G, Hkv, span, block_n, _target_programs(query.device))
    else:
        num_splits = triton.cdiv(max(1, span), split_len)
    cand = candidate_slots(float(threshold))
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
    common = (block_table, seq_lens, query_start, qlens, heads, stats, acc, cand_s, cand_i)
    _split_kernel[(G, Hkv, num_splits)](
        query, key_cache, value_cache, *common,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
        H, heads.shape[0], num_splits, split_len, float(scale), float(log_tau), win, key_cache.shape[2], D,
        QPG=qpg, BLOCK_H=max(16, triton.next_power_of_2(qpg)), BLOCK_N=block_n, BLOCK_D=block_d, CAND=cand,
        HS_P=hs_p, WHOLE=whole, HAS_QLENS=query_lens is not None, DOT_FP32=dot_fp32,
    )
    _reduce_kernel[(G, H)](
        query, output, key_cache, value_cache, *common,
        *query.stride(), *output.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
        H, heads.shape[0], num_splits, float(scale), float(beta), float(threshold), NONSINK_EPS, win,
        key_cache.shape[2], D,
        QPG=qpg, BLOCK_N=block_n, BLOCK_D=block_d, CAND=cand, HS_P=hs_p, WHOLE=whole,
        HAS_QLENS=query_lens is not None,
    )
    return stats.view(G, H, num_splits, 4)
