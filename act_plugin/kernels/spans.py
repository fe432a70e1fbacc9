"""The ``spans`` rule (PASTA) over vLLM's paged KV cache, from the native output.

The rule's key set ``K`` is the request's emphasised prompt tokens (token ranges the front end
mapped from the request's character spans, :mod:`act_plugin.vllm.request_spans`). With the
row's mass on them ``S``, the rest ``N`` and the spans' weighted values ``O_K``, the shared
epilogue of :mod:`act_plugin.rules` gives::

    O' = f * O_K + g * (O - O_K),     f = 1 / (S + alpha N),   g = alpha / (S + alpha N)

``O`` is the native kernel's output. ``g <= 1`` (``alpha <= 1``), so the cancellation in
``O - O_K`` when a row already attends almost only to the spans is never amplified; ``O_K``,
which ``f`` (up to ``1 / alpha``) multiplies, is summed directly from the probabilities.

``S``, ``N`` and ``O_K`` need the row's log-sum-exp, which the backends calibrated on CPU hand
none over, so this torch implementation computes it: one pass over the group's keys in blocks
of rows (memory holds one block of scores), and the values of the keys from the group's first
span start to its last span end only (generated tokens are never emphasised, so their values
are never read). Cost per call: the group's keys gathered into a float32 copy (as the
first_token path), the span region's values, one ``q @ k^T`` and one ``p_K @ v_K``.
"""

from __future__ import annotations

import torch

from act_plugin.core import DEFAULT_BLOCK_ELEMS, visibility_mask
from act_plugin.kernels.cache_layout import gather_kv
from act_plugin.kernels.reference import padded_positions
from act_plugin.rules import SpanRule, apply_factors_to_output

__all__ = ["emphasised_positions", "spans_paged"]


def emphasised_positions(span_ranges: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Bool ``[G, Lk]``: key positions ``k_pos [G, Lk]`` (-1 = padding) inside one of the
    sequence's token ranges ``span_ranges [G, R, 2]`` (half-open; ``(0, 0)`` pads)."""
    start = span_ranges[..., 0].unsqueeze(-1)  # [G, R, 1]
    end = span_ranges[..., 1].unsqueeze(-1)
    k = k_pos.unsqueeze(1)  # [G, 1, Lk]
    return ((k >= start) & (k < end) & (k >= 0)).any(dim=1)


def spans_paged(
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
    span_ranges: torch.Tensor,
    *,
    alpha: float,
    scale: float,
    window: int | None,
    max_query_len: int,
    max_seq_len: int,
    max_block_elems: int = DEFAULT_BLOCK_ELEMS,
) -> None:
    """Overwrite ``output[rows, heads]`` (the native output) with the spans rule's.

    Arguments as :func:`act_plugin.kernels.calibrate_paged`'s, with ``span_ranges`` ``[G, R, 2]``
    int64 (each sequence's emphasised token ranges ``[start, end)``, padded with ``(0, 0)``)
    and ``alpha`` in place of ``beta``/``threshold``."""
    if heads.shape[0] == 0 or block_table.shape[0] == 0 or alpha == 1.0:
        return
    token_index, row_valid, q_pos, k_pos = padded_positions(
        seq_lens, query_start, query_lens, max_query_len, max_seq_len
    )
    emph = emphasised_positions(span_ranges.to(k_pos.device), k_pos)  # [G, Lk]
    cols = emph.any(dim=0).nonzero()
    if cols.numel() == 0:
        return  # no sequence of the group has an emphasised key: every row stays as it is
    lo, hi = int(cols[0]), int(cols[-1]) + 1  # the group's span region [lo, hi)
    G, Lq = token_index.shape
    H = query.shape[1]
    k = gather_kv(key_cache, block_table, max_seq_len, kv_heads).to(torch.float32)  # [G, Hs, Lk, D]
    v_span = _gather_region(value_cache, block_table, lo, hi, kv_heads)  # [G, Hs, hi - lo, D]
    q = query.index_select(0, token_index.reshape(-1)).view(G, Lq, H, -1)
    q = q.index_select(2, heads).permute(0, 2, 1, 3).to(torch.float32)  # [G, Hs, Lq, D]
    set_mass, rest_mass, set_out = _span_mass(q, k.transpose(-1, -2), v_span, emph, lo, q_pos, k_pos, scale,
                                              window, max_block_elems)
    fac = SpanRule(emphasised=emph, alpha=alpha).factors(set_mass, rest_mass)
    rows = token_index[row_valid]  # [R] flat rows of the group
    native = output.index_select(0, token_index.reshape(-1)).view(G, Lq, H, -1)
    native = native.index_select(2, heads).permute(0, 2, 1, 3)  # [G, Hs, Lq, D]
    cal = apply_factors_to_output(native, set_out, fac)
    output[rows.unsqueeze(1), heads.unsqueeze(0)] = cal.permute(0, 2, 1, 3)[row_valid].to(output.dtype)


def _gather_region(cache: torch.Tensor, block_table: torch.Tensor, lo: int, hi: int,
                   kv_heads: torch.Tensor) -> torch.Tensor:
    """float32 ``[G, Hs, hi - lo, D]``: positions ``[lo, hi)`` of each sequence, reading only
    the blocks that hold them."""
    bs = cache.shape[2]
    first_block = lo // bs
    got = gather_kv(cache, block_table[:, first_block:], hi - first_block * bs, kv_heads)
    return got[:, :, lo - first_block * bs:].to(torch.float32)


def _span_mass(q: torch.Tensor, kt: torch.Tensor, v_span: torch.Tensor, emph: torch.Tensor, lo: int,
               q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float, window: int | None,
               max_block_elems: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: attention on the emphasised keys (``S``), on every other visible key (``N``,
    summed directly) and the emphasised keys' weighted values (``O_K``), from the exact row
    log-sum-exp; one block of rows' scores in memory at a time."""
    G, Hs, Lq, D = q.shape
    Lk = kt.shape[-1]
    hi = lo + v_span.shape[2]
    set_mass = torch.zeros(G, Hs, Lq, dtype=torch.float32, device=q.device)
    rest_mass = torch.zeros_like(set_mass)
    set_out = torch.zeros(G, Hs, Lq, D, dtype=torch.float32, device=q.device)
    on_set = emph.view(G, 1, 1, Lk)
    rows_per_block = max(1, max_block_elems // max(1, G * Hs * Lk))
    for r0 in range(0, Lq, rows_per_block):
        r1 = min(Lq, r0 + rows_per_block)
        vis = visibility_mask(q_pos[:, r0:r1], k_pos, window).unsqueeze(1)  # [G, 1, r, Lk]
        s = (torch.matmul(q[:, :, r0:r1], kt) * scale).masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        p = torch.exp(s - lse).masked_fill(~vis, 0.0)
        p_set = p.masked_fill(~on_set, 0.0)
        set_mass[:, :, r0:r1] = p_set.sum(-1)
        rest_mass[:, :, r0:r1] = p.masked_fill(on_set, 0.0).sum(-1)
        set_out[:, :, r0:r1] = torch.matmul(p_set[..., lo:hi], v_span)
    return set_mass, rest_mass, set_out
