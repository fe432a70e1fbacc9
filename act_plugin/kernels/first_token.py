"""The ``first_token`` rule (ZeroTuning) over vLLM's paged KV cache, from the native output.

The rule's key set is one key, position 0, so its weighted values are ``O_K = p0 * v0`` and
the shared epilogue of :mod:`act_plugin.rules` needs only the row's attention on the first
token ``p0`` and its rest mass ``N``::

    O' = f * p0 * v0 + g * (O - p0 * v0),     f = gamma / (gamma p0 + N),   g = 1 / (gamma p0 + N)

``O`` is the native kernel's output (already computed for every head) and ``N = 1 - p0``.
``O - p0 v0`` cancels where ``p0`` is close to 1, and the epilogue multiplies that absolute
error (about ``ulp(O)``) by ``g = 1 / (gamma p0 + N)``: at most ``1 / min(gamma, 1)``, so never
amplified for ``gamma >= 1`` and up to ``1/gamma`` below. As ACT's recompute cut, rows whose
``gamma p0 + N`` is below ``RECOMPUTE_BELOW`` of the output dtype
(:data:`act_plugin.kernels.cpu.RECOMPUTE_BELOW`: 1/16 for float32, 1/2 for 16-bit outputs)
are recomputed from all keys and values with every part summed apart.

``p0 = exp(q.k0 * scale - lse)`` needs the row's log-sum-exp.

* CUDA tensors (or ``ACT_KERNEL=triton``): :mod:`act_plugin.kernels.triton_first_token`,
  which reads the paged cache in place; given the native backend's row LSE (``lse``) it
  needs one key and one value per row, without it one K-only pass per row.
* Elsewhere (the CPU backends hand no LSE over) this torch implementation computes it: the
  keys of the group's sequences gathered into a float32 copy (as the ACT reference kernel
  does), ``q @ k^T`` and the row log-sum-exp in blocks of rows (memory holds one block of
  scores), then only ``p0`` (no probability matrix; 0.56-0.62x the time of summing ``N``
  directly in prefill, about even in decode, where the gather dominates:
  ``benchmarks/first_token_cpu.py``). Values are gathered only for groups with a row to
  recompute. A given ``lse`` is not used here.
"""

from __future__ import annotations

import os

import torch

from act_plugin.core import DEFAULT_BLOCK_ELEMS, visibility_mask
from act_plugin.kernels import KERNEL_ENV, _fused_dtypes, kernel_name
from act_plugin.kernels.cache_layout import gather_kv
from act_plugin.kernels.cpu import RECOMPUTE_BELOW
from act_plugin.kernels.reference import padded_positions
from act_plugin.rules import FirstTokenRule, apply_factors_to_output

__all__ = ["first_token_paged"]


def first_token_paged(
    query: torch.Tensor,
    output: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    query_lens: torch.Tensor,
    heads: torch.Tensor,
    kv_heads: torch.Tensor,
    gammas: torch.Tensor,
    *,
    scale: float,
    window: int | None,
    max_query_len: int,
    max_seq_len: int,
    max_block_elems: int = DEFAULT_BLOCK_ELEMS,
    lse: torch.Tensor | None = None,
    lse_base2: bool = False,
) -> None:
    """Overwrite ``output[rows, heads]`` (the native output) with the first_token rule's.

    Arguments as :func:`act_plugin.kernels.calibrate_paged`'s, with ``gammas`` ``[Hs]`` float32
    (one gamma per calibrated head) in place of ``beta``/``threshold``. ``lse``/``lse_base2``:
    the native backend's row log-sum-exp (``[T, H]`` float32 view, natural log unless
    ``lse_base2``), used by the Triton kernel only; ``max_block_elems``: the torch path's
    score budget."""
    if heads.shape[0] == 0 or block_table.shape[0] == 0:
        return
    if _use_triton(query, output, key_cache, value_cache):
        from act_plugin.kernels.triton_first_token import first_token_triton  # triton: optional, CUDA only

        first_token_triton(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens,
                           heads, kv_heads, gammas, scale=scale, window=window, max_query_len=max_query_len,
                           max_seq_len=max_seq_len, lse=lse, lse_base2=lse_base2)
        return
    _first_token_torch(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads,
                       kv_heads, gammas, scale, window, max_query_len, max_seq_len, max_block_elems)


def _first_token_torch(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads,
                       kv_heads, gammas, scale, window, max_query_len, max_seq_len, max_block_elems) -> None:
    """The torch path: ``p0`` from the exact row LSE, the epilogue on the native output, and
    the rows whose epilogue would amplify the output's rounding (``gamma p0 + N`` below the
    recompute cut) recomputed from all keys and values."""
    token_index, row_valid, q_pos, k_pos = padded_positions(
        seq_lens, query_start, query_lens, max_query_len, max_seq_len
    )
    G, Lq = token_index.shape
    H = query.shape[1]
    kt = gather_kv(key_cache, block_table, max_seq_len, kv_heads).to(torch.float32).transpose(-1, -2)  # [G,Hs,D,Lk]
    v0 = gather_kv(value_cache, block_table[:, :1], 1, kv_heads)[:, :, 0].to(torch.float32)  # [G, Hs, D]
    q = query.index_select(0, token_index.reshape(-1)).view(G, Lq, H, -1)
    q = q.index_select(2, heads).permute(0, 2, 1, 3).to(torch.float32)  # [G, Hs, Lq, D]
    lse, p0 = _lse_and_first_mass(q, kt, q_pos, k_pos, scale, window, max_block_elems)
    fac = FirstTokenRule(scale=gammas).factors(p0, 1.0 - p0)
    rows = token_index[row_valid]  # [R] flat rows of the group
    native = output.index_select(0, token_index.reshape(-1)).view(G, Lq, H, -1)
    native = native.index_select(2, heads).permute(0, 2, 1, 3)  # [G, Hs, Lq, D]
    cal = apply_factors_to_output(native, p0.unsqueeze(-1) * v0.unsqueeze(2), fac)
    # g = 1 / (gamma p0 + N) multiplies the native output's rounding (cancellation in O - p0 v0)
    redo = fac.active & (fac.g * RECOMPUTE_BELOW.get(output.dtype, 1.0 / 16) > 1.0)
    if bool(redo.any()):  # a host sync; this path serves CPU tensors (and the reference on GPU)
        v = gather_kv(value_cache, block_table, max_seq_len, kv_heads).to(torch.float32)  # [G, Hs, Lk, D]
        gam = torch.as_tensor(gammas, dtype=torch.float32, device=q.device).view(1, -1, 1)
        exact = _exact_output(q, kt, v, v0, lse, gam, q_pos, k_pos, scale, window, max_block_elems)
        cal = torch.where(redo.unsqueeze(-1), exact, cal)
    output[rows.unsqueeze(1), heads.unsqueeze(0)] = cal.permute(0, 2, 1, 3)[row_valid].to(output.dtype)


def _use_triton(query: torch.Tensor, output: torch.Tensor, key_cache: torch.Tensor,
                value_cache: torch.Tensor) -> bool:
    """The Triton kernel where :func:`act_plugin.kernels.kernel_name` picks Triton (CUDA
    tensors, or ``ACT_KERNEL=triton``) and the four tensors share one of its dtypes. CPU
    tensors never ask (asking would build the CPU kernel, which this rule does not use)."""
    if query.device.type != "cuda" and os.environ.get(KERNEL_ENV, "").strip().lower() != "triton":
        return False
    return kernel_name(query.device) == "triton" and _fused_dtypes(query, output, key_cache, value_cache)


def _row_blocks(G: int, Hs: int, Lq: int, Lk: int, max_block_elems: int):
    """Row ranges whose ``[G, Hs, rows, Lk]`` scores fit the budget."""
    rows_per_block = max(1, max_block_elems // max(1, G * Hs * Lk))
    return [(r0, min(Lq, r0 + rows_per_block)) for r0 in range(0, Lq, rows_per_block)]


def _masked_scores(q, kt, q_pos, k_pos, r0, r1, scale, window) -> tuple[torch.Tensor, torch.Tensor]:
    vis = visibility_mask(q_pos[:, r0:r1], k_pos, window).unsqueeze(1)  # [G, 1, r, Lk]
    return (torch.matmul(q[:, :, r0:r1], kt) * scale).masked_fill(~vis, float("-inf")), vis


def _lse_and_first_mass(q: torch.Tensor, kt: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
                        window: int | None, max_block_elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the exact log-sum-exp and the attention on key 0, ``p0 = exp(s0 - lse)`` (no
    probability matrix: ``N = 1 - p0``); one block of rows' scores in memory at a time."""
    G, Hs, Lq, _ = q.shape
    lse = torch.zeros(G, Hs, Lq, dtype=torch.float32, device=q.device)
    p0 = torch.zeros_like(lse)
    for r0, r1 in _row_blocks(G, Hs, Lq, kt.shape[-1], max_block_elems):
        s, vis = _masked_scores(q, kt, q_pos, k_pos, r0, r1, scale, window)
        blk = torch.logsumexp(s, dim=-1).clamp_min(torch.finfo(torch.float32).min)
        lse[:, :, r0:r1] = blk
        p0[:, :, r0:r1] = torch.exp(s[..., 0] - blk).masked_fill(~vis[..., 0], 0.0)
    return lse, p0


def _exact_output(q, kt, v, v0, lse, gam, q_pos, k_pos, scale, window, max_block_elems) -> torch.Tensor:
    """``(gamma p0 v0 + sum_{j>0} p_j v_j) / (gamma p0 + N)`` with every part summed apart
    (no ``O - p0 v0``): ``[G, Hs, Lq, D]``; rows the rule leaves alone are not meaningful."""
    G, Hs, Lq, _ = q.shape
    out = torch.zeros(G, Hs, Lq, v.shape[-1], dtype=torch.float32, device=q.device)
    for r0, r1 in _row_blocks(G, Hs, Lq, kt.shape[-1], max_block_elems):
        s, vis = _masked_scores(q, kt, q_pos, k_pos, r0, r1, scale, window)
        p = torch.exp(s - lse[:, :, r0:r1, None]).masked_fill(~vis, 0.0)
        w0 = gam * p[..., 0]
        den = w0 + p[..., 1:].sum(-1)
        num = w0.unsqueeze(-1) * v0.unsqueeze(2) + torch.matmul(p[..., 1:], v[:, :, 1:])
        out[:, :, r0:r1] = num / torch.where(den > 0, den, torch.ones_like(den)).unsqueeze(-1)
    return out
