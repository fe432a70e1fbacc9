"""The ``first_token`` rule (ZeroTuning) in Triton: the native output and the row LSE suffice.

The rule's key set is one key, the sequence's position 0, so with ``p0 = exp(scale q.k0 -
lse)`` and the rest mass ``N`` the shared epilogue of :mod:`act_plugin.rules` is::

    O' = (gamma p0 v0 + (O - p0 v0)) / (gamma p0 + N)

One program per (sequence, calibrated head, block of rows) reads the rows' queries and
native outputs, the one key ``k0`` and value ``v0`` of the sequence, and:

* ``lse`` given (the native backend's row log-sum-exp, ``[T, H]`` float32 view, natural
  log or base 2 with ``lse_base2``): ``p0`` from one dot product per row, ``N = 1 - p0``.
  O(1) per row: no key sweep.
* no ``lse``: one K-only pass over the rows' visible keys (online max) gives the row's
  normaliser and, summed apart, the mass on key 0 and on the rest (``N`` summed directly).

Cancellation: ``O - p0 v0`` loses the bits of ``O`` where ``p0`` is close to 1, and the
epilogue multiplies that absolute error (about ``ulp(O)``) by ``1 / (gamma p0 + N)`` --
at most ``1 / min(gamma, 1)``: never amplified for ``gamma >= 1``, up to ``1/gamma`` for
``gamma < 1``. So, as ACT's recompute cut, a block holding an active row whose
denominator ``gamma p0 + N`` is below ``recompute_below`` (default per output dtype,
:data:`act_plugin.kernels.cpu.RECOMPUTE_BELOW`: 1/16 for float32 outputs, 1/2 for 16-bit
ones) sweeps all its keys and values instead and computes ``(gamma p0 v0 + sum_{j>0} p_j
v_j) / (gamma p0 + N)`` with every part summed apart (exact; the LSE cancels out).

Rows are left as they are (not written) where the rule leaves them: ``gamma == 1``, key 0
outside the row's window, or ``p0 == 0``. Chunked prefill (rows after cached keys), decode
rows and windows follow from positions: sequence ``g``'s rows are its last ``query_len``
positions. No host synchronisation: the grid comes from shapes and ``max_query_len``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from act_plugin.kernels.cpu import RECOMPUTE_BELOW
from act_plugin.kernels.triton_act import _qk_fp32
from act_plugin.kernels.triton_prefill import _key_range, _pv, _rows, _scores

__all__ = ["first_token_triton"]


@triton.jit
def _first_kv(k_ptr, v_ptr, bt_ptr, g, kvh, d, dmask, sk0, sk1, sk3, sv0, sv1, sv3, sbt0):
    """Key and value of the sequence's position 0 (float32, ``[BLOCK_D]``)."""
    blk = tl.load(bt_ptr + g * sbt0).to(tl.int64)
    k0 = tl.load(k_ptr + blk * sk0 + kvh * sk1 + d * sk3, mask=dmask, other=0.0).to(tl.float32)
    v0 = tl.load(v_ptr + blk * sv0 + kvh * sv1 + d * sv3, mask=dmask, other=0.0).to(tl.float32)
    return k0, v0


@triton.jit
def _own_masses(q, k_ptr, bt_ptr, g, kvh, k_lo, k_end, d, dmask, rm, pos, row_lo, sk0, sk1, sk2, sk3, sbt0, sbt1,
                page, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One K-only pass (online max): the row LSE, and the masses on key 0 and on the others
    (summed apart, so ``N`` does not come from ``1 - p0``)."""
    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    z0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    zr = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(k_lo, k_end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        jm = j < k_end
        s, _ = _scores(q, k_ptr, bt_ptr, g, kvh, j, jm, jm, d, dmask, rm, pos, row_lo,
                       sk0, sk1, sk2, sk3, sbt0, sbt1, page, scale, PRECISION)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        e = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        first = (j == 0)[None, :]
        z0 = z0 * alpha + tl.sum(tl.where(first, e, 0.0), axis=1)
        zr = zr * alpha + tl.sum(tl.where(first, 0.0, e), axis=1)
        m = m_new
    z = tl.where(rm, z0 + zr, 1.0)
    return m + tl.log(z), z0 / z, zr / z


@triton.jit
def _exact_rows(q, k_ptr, v_ptr, bt_ptr, g, kvh, lse, gamma, v0, k_lo, k_end, d, dmask, rm, pos, row_lo,
                sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1, page, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                QK_FP32: tl.constexpr):
    """All keys and values of the block's rows: ``p0``, ``N`` and ``sum_{j>0} p_j v_j`` apart,
    the rule's output without ``O - p0 v0`` (any error in ``lse`` cancels in the ratio)."""
    p0 = tl.zeros([BLOCK_M], tl.float32)
    n = tl.zeros([BLOCK_M], tl.float32)
    o_n = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(k_lo, k_end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        jm = j < k_end
        s, blk = _scores(q, k_ptr, bt_ptr, g, kvh, j, jm, jm, d, dmask, rm, pos, row_lo,
                         sk0, sk1, sk2, sk3, sbt0, sbt1, page, scale, PRECISION)
        p = tl.exp(s - lse[:, None])
        first = (j == 0)[None, :]
        p0 += tl.sum(tl.where(first, p, 0.0), axis=1)
        pr = tl.where(first, 0.0, p)
        n += tl.sum(pr, axis=1)
        o_n += _pv(pr, v_ptr, blk, kvh, j, jm, d, dmask, sv0, sv1, sv2, sv3, page, QK_FP32)
    w0 = gamma * p0
    den = tl.where(rm & (w0 + n > 0.0), w0 + n, 1.0)
    return (w0[:, None] * v0[None, :] + o_n) / den[:, None]


@triton.jit
def _first_token_kernel(
    q_ptr, o_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, q_start_ptr, q_lens_ptr, heads_ptr, kv_heads_ptr, gamma_ptr,
    lse_ptr,
    sq0, sq1, sq2, so0, so1, so2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1, slt, slh,
    num_sel, lse_scale, scale, cut, window, page, head_dim,
    HAS_LSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, QK_FP32: tl.constexpr,
):
    """The rule on one block of one sequence's rows for one calibrated head."""
    gh = tl.program_id(0)
    mb = tl.program_id(1)
    g = gh // num_sel
    hs = gh % num_sel
    ql = tl.load(q_lens_ptr + g).to(tl.int32)
    gamma = tl.load(gamma_ptr + hs).to(tl.float32)
    if (mb * BLOCK_M < ql) & (gamma != 1.0):
        L, row0, h, first, i, rm, pos, d, dmask, q = _rows(
            q_ptr, seq_lens_ptr, q_start_ptr, heads_ptr, g, hs, mb, ql, sq0, sq1, sq2, head_dim, BLOCK_M, BLOCK_D,
            QK_FP32)
        k_lo, k_end, row_lo = _key_range(L, first, mb, pos, window, BLOCK_M, BLOCK_N)
        sees0 = rm & (row_lo <= 0)  # key 0 inside the row's window
        if tl.max(sees0.to(tl.int32), axis=0) > 0:
            kvh = tl.load(kv_heads_ptr + hs).to(tl.int64)
            k0, v0 = _first_kv(k_ptr, v_ptr, bt_ptr, g, kvh, d, dmask, sk0, sk1, sk3, sv0, sv1, sv3, sbt0)
            if HAS_LSE:
                lse = tl.load(lse_ptr + (row0 + i) * slt + h * slh, mask=rm, other=0.0).to(tl.float32) * lse_scale
                s0 = tl.sum(q.to(tl.float32) * k0[None, :], axis=1) * scale
                p0 = tl.where(sees0, tl.exp(s0 - lse), 0.0)
                n = 1.0 - p0
            else:
                lse, p0, n = _own_masses(q, k_ptr, bt_ptr, g, kvh, k_lo, k_end, d, dmask, rm, pos, row_lo,
                                         sk0, sk1, sk2, sk3, sbt0, sbt1, page, scale, BLOCK_M, BLOCK_N, PRECISION)
                p0 = tl.where(sees0, p0, 0.0)
            active = sees0 & (p0 > 0.0)
            den = gamma * p0 + n
            op = o_ptr + (row0 + i)[:, None] * so0 + h * so1 + d[None, :] * so2
            wmask = active[:, None] & dmask[None, :]
            if tl.max((active & (den < cut)).to(tl.int32), axis=0) > 0:
                res = _exact_rows(q, k_ptr, v_ptr, bt_ptr, g, kvh, lse, gamma, v0, k_lo, k_end, d, dmask, rm, pos,
                                  row_lo, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, sbt1, page, scale,
                                  BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, QK_FP32)
            else:
                o = tl.load(op, mask=wmask, other=0.0).to(tl.float32)
                pv0 = p0[:, None] * v0[None, :]
                res = (gamma * pv0 + (o - pv0)) / tl.where(active, den, 1.0)[:, None]
            tl.store(op, res.to(o_ptr.dtype.element_ty), mask=wmask)


def first_token_triton(
    query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads, gammas,
    *, scale: float, window: int | None, max_query_len: int, max_seq_len: int, lse: torch.Tensor | None = None,
    lse_base2: bool = False, recompute_below: float | None = None, block_n: int = 64,
) -> None:
    """Overwrite ``output[rows, heads]`` with the first_token rule's output, in place.

    Arguments as :func:`act_plugin.kernels.first_token.first_token_paged`'s (``gammas``:
    ``[Hs]``, one per calibrated head, on the device). ``lse``: the native row log-sum-exp as
    a ``[T, H]`` float32 view (any strides; FLASH_ATTN's ``[H, T]`` ``softmax_lse`` passed
    transposed), base 2 with ``lse_base2``; None: one K-only pass computes it.
    ``recompute_below``: blocks with an active row whose ``gamma p0 + N`` is below it sweep
    all keys (module docstring); default per output dtype."""
    G = block_table.shape[0]
    Hs = heads.shape[0]
    if G == 0 or Hs == 0 or max_query_len <= 0:
        return
    if gammas.shape != (Hs,):
        raise ValueError(f"gammas must hold one gamma per calibrated head ({Hs}), got {tuple(gammas.shape)}")
    if lse is not None and (lse.dim() != 2 or lse.shape[0] < query.shape[0] or lse.shape[1] != query.shape[1]):
        raise ValueError(f"lse must be a [tokens, heads] view ({tuple(query.shape[:2])}), got {tuple(lse.shape)}")
    cut = RECOMPUTE_BELOW.get(output.dtype, 1.0 / 16) if recompute_below is None else float(recompute_below)
    gam = gammas.to(device=query.device, dtype=torch.float32)
    D = query.shape[-1]
    block_m = 16 if max_query_len <= 16 else 64  # decode rows: the smallest tl.dot block
    qk_fp32 = _qk_fp32(query.dtype)
    grid = (G * Hs, triton.cdiv(max_query_len, block_m))
    lse_arg = query if lse is None else lse  # not read without an lse
    lse_strides = (0, 0) if lse is None else lse.stride()
    _first_token_kernel[grid](
        query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads, gam,
        lse_arg, *query.stride(), *output.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
        *lse_strides, Hs, math.log(2.0) if lse_base2 else 1.0, float(scale), cut, int(window or 0),
        key_cache.shape[2], D,
        HAS_LSE=lse is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
        PRECISION="ieee" if qk_fp32 else "tf32", QK_FP32=qk_fp32,
    )
