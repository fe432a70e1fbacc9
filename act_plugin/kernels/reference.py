"""Reference implementation of :func:`act_plugin.kernels.calibrate_paged`.

Gathers each sequence's keys and values from the paged cache into padded ``[G, Hs, L, D]``
tensors and calls :func:`act_plugin.core.act_attention_blocked`. Simple and device-agnostic;
the fused kernels are tested against it.
"""

from __future__ import annotations

import torch

from act_plugin.core import act_attention_blocked
from act_plugin.kernels.cache_layout import gather_kv


def padded_positions(
    seq_lens: torch.Tensor, query_start: torch.Tensor, query_lens: torch.Tensor, max_query_len: int, max_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``token_index [G, Lq]`` (rows of the flat query, clamped to 0 on padding),
    ``row_valid [G, Lq]``, ``q_pos [G, Lq]`` (-1 on padding) and ``k_pos [G, Lk]`` (-1 past
    each sequence's length) for a group padded to ``max_query_len`` rows and ``max_seq_len`` keys."""
    device = seq_lens.device
    ql = query_lens.long()
    kl = seq_lens.long()
    ar_q = torch.arange(max_query_len, device=device)
    row_valid = ar_q[None, :] < ql[:, None]
    token_index = (query_start.long()[:, None] + ar_q[None, :]).masked_fill(~row_valid, 0)
    q_pos = ((kl - ql)[:, None] + ar_q[None, :]).masked_fill(~row_valid, -1)
    ar_k = torch.arange(max_seq_len, device=device)
    k_pos = ar_k.expand(kl.shape[0], max_seq_len).masked_fill(ar_k[None, :] >= kl[:, None], -1)
    return token_index, row_valid, q_pos, k_pos


def calibrate_paged_reference(
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
    *,
    scale: float,
    beta: float,
    threshold: float,
    window: int | None,
    max_query_len: int,
    max_seq_len: int,
) -> None:
    token_index, row_valid, q_pos, k_pos = padded_positions(
        seq_lens, query_start, query_lens, max_query_len, max_seq_len
    )
    G, Lq = token_index.shape
    H = query.shape[1]
    k = gather_kv(key_cache, block_table, max_seq_len, kv_heads)
    v = gather_kv(value_cache, block_table, max_seq_len, kv_heads)
    q = query.index_select(0, token_index.reshape(-1)).view(G, Lq, H, -1)
    q = q.index_select(2, heads).permute(0, 2, 1, 3)  # [G, Hs, Lq, D]
    res = act_attention_blocked(q, k, v, q_pos, k_pos, scale=scale, beta=beta, threshold=threshold, window=window)
    cal = res.out.permute(0, 2, 1, 3).to(output.dtype)  # [G, Lq, Hs, D]
    rows = token_index[row_valid]
    output[rows.unsqueeze(1), heads.unsqueeze(0)] = cal[row_valid]
