"""Random paged-cache problems for the kernel tests and the micro-benchmark.

A :class:`PagedProblem` holds one group of sequences as vLLM would hand it to
:func:`act_plugin.kernels.calibrate_paged` (flat query rows, a native output, a paged K/V
cache in a backend's layout with a shuffled block table) together with the dense keys and
values it was built from, so that :meth:`PagedProblem.expected` can compute the answer
with :mod:`act_plugin.core` without going through any gather.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from act_plugin.core import act_attention_blocked, act_attention_dense
from act_plugin.kernels.cache_layout import cpu_attn_split, flash_attn_split
from act_plugin.rules import FirstTokenRule, rule_attention_dense

LAYOUTS = ("cpu_attn", "flash_attn")


@dataclass
class PagedProblem:
    query: torch.Tensor  # [T, H, D]
    output: torch.Tensor  # [T, H, D] native attention output (uncalibrated)
    key_cache: torch.Tensor  # [blocks, Hkv, block, D] view in the layout's strides
    value_cache: torch.Tensor
    block_table: torch.Tensor  # [G, nblk] int32
    seq_lens: torch.Tensor  # [G]
    query_start: torch.Tensor  # [G]
    query_lens: torch.Tensor  # [G]
    heads: torch.Tensor  # [Hs]
    kv_heads: torch.Tensor  # [Hs]
    max_query_len: int
    max_seq_len: int
    scale: float
    window: int | None
    keys: list  # per sequence [Hkv, L, D] (dense, the cache's dtype)
    values: list
    raw_cache: torch.Tensor  # the backend's own kv_cache tensor the two views read

    def args(self) -> tuple:
        return (self.query, self.output, self.key_cache, self.value_cache, self.block_table, self.seq_lens,
                self.query_start, self.query_lens, self.heads, self.kv_heads)

    def kwargs(self, beta: float, threshold: float) -> dict:
        return dict(scale=self.scale, beta=beta, threshold=threshold, window=self.window,
                    max_query_len=self.max_query_len, max_seq_len=self.max_seq_len)

    def calibrated(self, fn: Callable[..., None], beta: float, threshold: float, **extra: Any) -> torch.Tensor:
        """A copy of the native output calibrated in place by ``fn`` (a ``calibrate_paged``
        implementation); the problem itself is left unchanged."""
        out = self.output.clone()
        args = list(self.args())
        args[1] = out
        fn(*args, **self.kwargs(beta, threshold), **extra)
        return out

    def error_vs_core(self, got: torch.Tensor, beta: float, threshold: float) -> tuple[float, float, torch.Tensor]:
        """``(max abs error, max abs expected value, expected)`` of ``got`` (any device)
        against :meth:`expected` (dense core, float32)."""
        exp = self.expected(beta, threshold)
        err = (got.detach().cpu().to(torch.float32) - exp).abs().max().item()
        return err, exp.abs().max().item(), exp

    def expected(self, beta: float, threshold: float, blocked_elems: int | None = None) -> torch.Tensor:
        """float32 ``[T, H, D]``: the native output with the calibrated heads' rows replaced by
        :func:`act_attention_dense` (or ``act_attention_blocked`` with that block budget)."""
        out = self.output.to(torch.float32).clone()
        for g, (k, v) in enumerate(zip(self.keys, self.values)):
            L, ql, q0 = int(self.seq_lens[g]), int(self.query_lens[g]), int(self.query_start[g])
            if ql == 0:
                continue
            q = self.query[q0 : q0 + ql].index_select(1, self.heads).permute(1, 0, 2)[None]  # [1, Hs, ql, D]
            kk = k.index_select(0, self.kv_heads)[None]
            vv = v.index_select(0, self.kv_heads)[None]
            q_pos = torch.arange(L - ql, L)[None]
            k_pos = torch.arange(L)[None]
            if blocked_elems is None:
                res = act_attention_dense(
                    q, kk, vv, q_pos, k_pos, scale=self.scale, beta=beta, threshold=threshold, window=self.window
                )
            else:
                res = act_attention_blocked(
                    q, kk, vv, q_pos, k_pos, scale=self.scale, beta=beta, threshold=threshold, window=self.window,
                    max_block_elems=blocked_elems,
                )
            out[q0 : q0 + ql, self.heads] = res.out[0].permute(1, 0, 2)
        return out


def _native(q, k, v, L, ql, scale, window):
    """Plain causal attention of one sequence: q [ql, H, D], k/v [Hkv, L, D] -> [ql, H, D] float32."""
    H, Hkv = q.shape[1], k.shape[0]
    kf = k.to(torch.float32).repeat_interleave(H // Hkv, 0)
    vf = v.to(torch.float32).repeat_interleave(H // Hkv, 0)
    s = torch.einsum("qhd,hkd->hqk", q.to(torch.float32), kf) * scale
    qp = torch.arange(L - ql, L)[:, None]
    kp = torch.arange(L)[None]
    vis = kp <= qp
    if window is not None:
        vis &= kp > qp - window
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
    return torch.einsum("hqk,hkd->qhd", p, vf)


def make_problem(
    seq_lens: list[int],
    query_lens: list[int],
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_size: int = 32,
    block_size: int = 16,
    layout: str = "cpu_attn",
    dtype: torch.dtype = torch.float32,
    heads: list[int] | None = None,
    window: int | None = None,
    sink_positions: tuple[int, ...] = (0, 3),
    sink_strength: float = 4.0,
    extra_rows: int = 2,
    query_gain: float = 1.0,
    seed: int = 0,
) -> PagedProblem:
    """A group of ``len(seq_lens)`` sequences; sequence g has ``seq_lens[g]`` keys, the last
    ``query_lens[g]`` of which are this step's rows. Keys at ``sink_positions`` share a
    direction with every query (strength ``sink_strength``: large values give rows whose
    non-sink mass vanishes). The flat query has ``extra_rows`` rows of other requests at
    the front, which must stay untouched; blocks are shuffled, block tables padded.
    ``query_gain`` multiplies the queries (large gains: scores hundreds apart within a row)."""
    gen = torch.Generator().manual_seed(seed)
    H, Hkv, D, bs = num_heads, num_kv_heads, head_size, block_size
    # The generator is drawn in this order: table, sink direction, keys/values, cache, queries.
    table, total_blocks = _shuffled_block_table(seq_lens, bs, gen)
    u = torch.randn(D, generator=gen)
    u = u / u.norm()
    keys, values = _sequences(seq_lens, Hkv, D, dtype, u, sink_positions, sink_strength, gen)
    kv, key_cache, value_cache = _paged_cache(layout, total_blocks, Hkv, bs, D, dtype, gen)
    for g, L in enumerate(seq_lens):
        for t in range(L):
            b, off = int(table[g, t // bs]), t % bs
            key_cache[b, :, off] = keys[g][:, t]
            value_cache[b, :, off] = values[g][:, t]
    T = extra_rows + sum(query_lens)
    query = torch.randn(T, H, D, generator=gen)
    query += 1.5 * u * D**0.25  # every query leans towards the sink direction
    query = (query * query_gain).to(dtype)
    output = torch.randn(T, H, D, generator=gen).to(dtype)  # rows of other requests: arbitrary
    starts = []
    r = extra_rows
    scale = D**-0.5
    for g, (L, ql) in enumerate(zip(seq_lens, query_lens)):
        starts.append(r)
        if ql:
            output[r : r + ql] = _native(query[r : r + ql], keys[g], values[g], L, ql, scale, window).to(dtype)
        r += ql
    heads_t = torch.tensor(heads if heads is not None else list(range(0, H, 2)), dtype=torch.long)
    return PagedProblem(
        query=query, output=output, key_cache=key_cache, value_cache=value_cache, block_table=table,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start=torch.tensor(starts, dtype=torch.long),
        query_lens=torch.tensor(query_lens, dtype=torch.long), heads=heads_t, kv_heads=heads_t // (H // Hkv),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), scale=scale, window=window,
        keys=keys, values=values, raw_cache=kv,
    )


def _shuffled_block_table(seq_lens: list[int], bs: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """A block table over shuffled blocks, one padding column pointing at a valid block, and
    the number of blocks (three spare ones hold garbage)."""
    nblk = [(L + bs - 1) // bs for L in seq_lens]
    width = max(nblk) + 1  # one padding column
    total_blocks = sum(nblk) + 3  # spare blocks hold garbage
    perm = torch.randperm(total_blocks, generator=gen)
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    pos = 0
    for g, n in enumerate(nblk):
        table[g, :n] = perm[pos : pos + n].to(torch.int32)
        table[g, n:] = perm[-1]  # padding entries point at a valid (garbage) block
        pos += n
    return table, total_blocks


def _sequences(seq_lens: list[int], Hkv: int, D: int, dtype: torch.dtype, u: torch.Tensor,
               sink_positions: tuple[int, ...], sink_strength: float, gen: torch.Generator) -> tuple[list, list]:
    """Dense keys and values per sequence; keys at ``sink_positions`` lean along ``u``."""
    keys, values = [], []
    for L in seq_lens:
        k = torch.randn(Hkv, L, D, generator=gen)
        for s in sink_positions:
            if s < L:
                k[:, s] += sink_strength * (1.0 + 0.25 * torch.rand(Hkv, 1, generator=gen)) * u * D**0.5
        keys.append(k.to(dtype))
        values.append(torch.randn(Hkv, L, D, generator=gen).to(dtype))
    return keys, values


def _paged_cache(layout: str, total_blocks: int, Hkv: int, bs: int, D: int, dtype: torch.dtype,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A garbage-filled cache in the backend's physical layout: the raw tensor and its key and
    value views."""
    if layout == "cpu_attn":
        kv = torch.randn(total_blocks, Hkv, bs, 2 * D, generator=gen).to(dtype)
        key_cache, value_cache = cpu_attn_split(kv)
    elif layout == "flash_attn":
        P = D + 8  # padded head size, as TRITON_ATTN may use
        kv = torch.randn(total_blocks, bs, Hkv, 2 * P, generator=gen).to(dtype).permute(0, 2, 1, 3)
        key_cache, value_cache = flash_attn_split(kv, D)
    else:
        raise ValueError(layout)
    return kv, key_cache, value_cache


def problem_to(p: PagedProblem, device: str | torch.device) -> PagedProblem:
    """The same problem on ``device``: the raw cache is moved once and the key/value views
    rebuilt with the layout's strides (the kernels must read the backend's own layout)."""
    raw = p.raw_cache.to(device)

    def view(t: torch.Tensor) -> torch.Tensor:
        return torch.as_strided(raw, t.size(), t.stride(), t.storage_offset())

    move = lambda t: t.to(device)  # noqa: E731
    return PagedProblem(
        query=move(p.query), output=move(p.output), key_cache=view(p.key_cache), value_cache=view(p.value_cache),
        block_table=move(p.block_table), seq_lens=move(p.seq_lens), query_start=move(p.query_start),
        query_lens=move(p.query_lens), heads=move(p.heads), kv_heads=move(p.kv_heads),
        max_query_len=p.max_query_len, max_seq_len=p.max_seq_len, scale=p.scale, window=p.window,
        keys=p.keys, values=p.values, raw_cache=raw,
    )


def expected_first_token(p: PagedProblem, gammas: torch.Tensor) -> torch.Tensor:
    """float32 ``[T, H, D]``: the native output with the calibrated heads' rows replaced by the
    dense first_token rule (gamma per calibrated head) on the problem's dense keys and values."""
    out = p.output.to(torch.float32).clone()
    for g, (k, v) in enumerate(zip(p.keys, p.values)):
        L, ql, q0 = int(p.seq_lens[g]), int(p.query_lens[g]), int(p.query_start[g])
        if ql == 0:
            continue
        q = p.query[q0 : q0 + ql].index_select(1, p.heads).permute(1, 0, 2)[None]
        res = rule_attention_dense(q, k.index_select(0, p.kv_heads)[None], v.index_select(0, p.kv_heads)[None],
                                   torch.arange(L - ql, L)[None], torch.arange(L)[None], FirstTokenRule(scale=gammas),
                                   scale=p.scale, window=p.window)
        out[q0 : q0 + ql, p.heads] = res.out[0].permute(1, 0, 2)
    return out


def native_lse(p: PagedProblem) -> torch.Tensor:
    """``[T, H]`` float32 natural-log row log-sum-exp of the problem's rows (what FLASH_ATTN
    returns, transposed), from the dense keys; -inf where unused."""
    T, H, _ = p.query.shape
    lse = torch.full((T, H), float("-inf"))
    for g, k in enumerate(p.keys):
        L, ql, q0 = int(p.seq_lens[g]), int(p.query_lens[g]), int(p.query_start[g])
        if ql == 0:
            continue
        kf = k.to(torch.float32).repeat_interleave(H // k.shape[0], 0)  # [H, L, D]
        s = torch.einsum("qhd,hkd->qhk", p.query[q0 : q0 + ql].to(torch.float32), kf) * p.scale
        qp = torch.arange(L - ql, L)[:, None]
        kp = torch.arange(L)[None]
        vis = kp <= qp
        if p.window is not None:
            vis &= kp > qp - p.window
        lse[q0 : q0 + ql] = torch.logsumexp(s.masked_fill(~vis[:, None], float("-inf")), -1)
    return lse
