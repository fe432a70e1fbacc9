"""The ``first_token`` rule (ZeroTuning) over vLLM's paged KV cache, from the native output.

The rule's key set is one key, position 0, so its weighted values are ``O_K = p0 * v0`` and
the shared epilogue of :mod:`act_plugin.rules` needs only the row's attention on the first
token ``p0`` and its rest mass ``N``::

    O' = f * p0 * v0 + g * (O - p0 * v0),     f = gamma / (gamma p0 + N),   g = 1 / (gamma p0 + N)

``O`` is the native kernel's output (already computed for every head). Unlike ACT's output
form this does not lose precision when ``p0`` is close to 1: the denominator ``gamma p0 + N``
is at least ``min(gamma, 1)``, so the cancellation in ``O - p0 v0`` is never amplified by more
than ``1 / gamma``.

``p0 = exp(q.k0 * scale - lse)`` needs the row's log-sum-exp.

* CUDA tensors (or ``ACT_KERNEL=triton``): :mod:`act_plugin.kernels.triton_first_token`,
  which reads the paged cache in place; given the native backend's row LSE (``lse``) it
  needs one key and one value per row, without it one K-only pass per row. Rows where the
  epilogue's cancellation would be amplified (``gamma p0 + N`` below the recompute cut) are
  recomputed there from all keys.
* Elsewhere (the CPU backends hand no LSE over) this torch implementation computes it: one
  pass over the group's keys (no values: only ``v0`` is read), in blocks of rows so that
  memory holds one block of scores; ``N`` is summed directly over the other visible keys
  (not ``1 - p0``). Cost per call: the keys of the group's sequences gathered into a float32
  copy (as the ACT reference kernel does) and one ``q @ k^T``; about half the ACT reference's
  work (no value pass, no column statistics). A given ``lse`` is not used here.
"""

from __future__ import annotations

import os

import torch

from act_plugin.core import DEFAULT_BLOCK_ELEMS, visibility_mask
from act_plugin.kernels import KERNEL_ENV, _fused_dtypes, kernel_name
from act_plugin.kernels.cache_layout import gather_kv
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
    token_index, row_valid, q_pos, k_pos = padded_positions(
        seq_lens, query_start, query_lens, max_query_len, max_seq_len
    )
    G, Lq = token_index.shape
    H = query.shape[1]
    k = gather_kv(key_cache, block_table, max_seq_len, kv_heads).to(torch.float32)  # [G, Hs, Lk, D]
    v0 = gather_kv(value_cache, block_table[:, :1], 1, kv_heads)[:, :, 0].to(torch.float32)  # [G, Hs, D]
    q = query.index_select(0, token_index.reshape(-1)).view(G, Lq, H, -1)
    q = q.index_select(2, heads).permute(0, 2, 1, 3).to(torch.float32)  # [G, Hs, Lq, D]
    p0, rest = _first_token_mass(q, k.transpose(-1, -2), q_pos, k_pos, scale, window, max_block_elems)
    fac = FirstTokenRule(scale=gammas).factors(p0, rest)
    rows = token_index[row_valid]  # [R] flat rows of the group
    native = output.index_select(0, token_index.reshape(-1)).view(G, Lq, H, -1)
    native = native.index_select(2, heads).permute(0, 2, 1, 3)  # [G, Hs, Lq, D]
    cal = apply_factors_to_output(native, p0.unsqueeze(-1) * v0.unsqueeze(2), fac)
    output[rows.unsqueeze(1), heads.unsqueeze(0)] = cal.permute(0, 2, 1, 3)[row_valid].to(output.dtype)


def _use_triton(query: torch.Tensor, output: torch.Tensor, key_cache: torch.Tensor,
                value_cache: torch.Tensor) -> bool:
    """The Triton kernel where :func:`act_plugin.kernels.kernel_name` picks Triton (CUDA
    tensors, or ``ACT_KERNEL=triton``) and the four tensors share one of its dtypes. CPU
    tensors never ask (asking would build the CPU kernel, which this rule does not use)."""
    if query.device.type != "cuda" and os.environ.get(KERNEL_ENV, "").strip().lower() != "triton":
        return False
    return kernel_name(query.device) == "triton" and _fused_dtypes(query, output, key_cache, value_cache)


def _first_token_mass(q: torch.Tensor, kt: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
                      window: int | None, max_block_elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: attention on key 0 (``p0``) and on every other visible key (``N``, summed
    directly), from the exact row log-sum-exp; one block of rows' scores in memory at a time."""
    G, Hs, Lq, _ = q.shape
    Lk = kt.shape[-1]
    p0 = torch.zeros(G, Hs, Lq, dtype=torch.float32, device=q.device)
    rest = torch.zeros_like(p0)
    rows_per_block = max(1, max_block_elems // max(1, G * Hs * Lk))
    for r0 in range(0, Lq, rows_per_block):
        r1 = min(Lq, r0 + rows_per_block)
        vis = visibility_mask(q_pos[:, r0:r1], k_pos, window).unsqueeze(1)  # [G, 1, r, Lk]
        s = (torch.matmul(q[:, :, r0:r1], kt) * scale).masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        p = torch.exp(s - lse).masked_fill(~vis, 0.0)
        p0[:, :, r0:r1] = p[..., 0]
        rest[:, :, r0:r1] = p[..., 1:].sum(-1)
    return p0, rest
