"""Device helpers of the split-K decode kernels (:mod:`act_plugin.kernels.triton_decode`):
tile loads, the candidate slots, the split statistics' store and merge, the exact fallback
row, and the per-row arm tables of the CUDA-graph mode. Kept apart so that the kernels'
file holds the two kernels and their launch."""

from __future__ import annotations

import triton
import triton.language as tl


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
def _row_group_heads(row_arm_ptr, arm_tau_ptr, flags_ptr, flag_stride, g, kvh, margin, QPG: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    """Per-row mode (CUDA graphs): the query heads of KV head ``kvh``, their mask, which of
    them row ``g``'s arm calibrates in this layer, and that arm's ln-candidate threshold.
    ``row_arm[g] < 0``: the row runs no arm (no head calibrated)."""
    hh = tl.arange(0, BLOCK_H)
    hmask = hh < QPG
    h = kvh * QPG + hh
    arm = tl.load(row_arm_ptr + g)
    on = arm >= 0
    safe = tl.where(on, arm, 0).to(tl.int64)  # slot 0 always exists: off rows read it and drop it
    flag = tl.load(flags_ptr + safe * flag_stride + h, mask=hmask, other=0)
    tau = tl.load(arm_tau_ptr + safe)
    log_tau = tl.where(tau > 0.0, tl.log(tl.maximum(tau, 1.0e-30)) - margin, -1.0e30)
    return h, hmask, (flag != 0) & hmask & on, log_tau


@triton.jit
def _row_arm(row_arm_ptr, arm_beta_ptr, arm_tau_ptr, flags_ptr, flag_stride, g, h):
    """Per-row mode: whether row ``g``'s arm calibrates head ``h`` in this layer, and its beta and tau."""
    arm = tl.load(row_arm_ptr + g)
    on = arm >= 0
    safe = tl.where(on, arm, 0).to(tl.int64)
    is_cal = on & (tl.load(flags_ptr + safe * flag_stride + h) != 0)
    return is_cal, tl.load(arm_beta_ptr + safe), tl.load(arm_tau_ptr + safe)
