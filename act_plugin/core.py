"""The ACT maths (docs/ACT_SPEC.md sections 1 and 2) in pure torch.

Everything that computes sinks or calibrated attention in this project -- the Hugging Face
reference path, the vLLM backend, ``inspect`` and head search -- calls this module, so the
semantics live in exactly one place.

Shapes (one forward call, a padded batch of sequences):

* ``q``: ``[B, H, Lq, D]`` -- the queries this call computes (rows).
* ``k``, ``v``: ``[B, Hkv, Lk, D]`` -- every key the sequences can see, cached ones included.
  ``H`` must be a multiple of ``Hkv`` (grouped-query attention: query head ``h`` reads KV
  head ``h // (H // Hkv)``).
* ``q_pos``: ``[B, Lq]`` -- absolute position of each row in its sequence, ``-1`` for a
  padding row. Rows may start after cached keys (``q_pos[b, 0] > 0``).
* ``k_pos``: ``[B, Lk]`` -- absolute position of each key, ``-1`` for a padding key.
  Position 0 is the sequence's first token and is never a sink.
* ``window``: sliding window size ``W`` or ``None``; a row at position ``p`` sees keys at
  positions ``p - W < j <= p`` (the convention of transformers and vLLM).

Statistics are accumulated in float32 whatever the input dtype; outputs are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "NONSINK_EPS",
    "ACTResult",
    "visibility_mask",
    "find_sinks",
    "calibrate_probs",
    "calibrate_output",
    "dense_probabilities",
    "act_attention_dense",
    "act_attention_blocked",
]

# A row whose non-sink mass is at or below float32 resolution is left unchanged (the
# release divides by zero there and yields NaN).
NONSINK_EPS = float(torch.finfo(torch.float32).eps)

# Default budget for one block of scores in the blocked path (float32 elements): 16M
# elements = 64 MiB, whatever the prompt length.
DEFAULT_BLOCK_ELEMS = 1 << 24


@dataclass
class ACTResult:
    out: torch.Tensor  # [B, H, Lq, D] float32, calibrated attention output
    sinks: torch.Tensor  # [B, H, Lk] bool, the sink set S of each (sequence, head)
    probs: torch.Tensor | None = None  # [B, H, Lq, Lk] calibrated probabilities (dense only)


def visibility_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """``[B, Lq, Lk]`` bool: can row i see key j (causal, window, padding)."""
    qp = q_pos.unsqueeze(-1)
    kp = k_pos.unsqueeze(-2)
    vis = (qp >= 0) & (kp >= 0) & (kp <= qp)
    if window is not None:
        vis &= kp > qp - window
    return vis


def find_sinks(
    col_mass: torch.Tensor, row_count: torch.Tensor, is_first: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Sink set of spec section 1.

    ``col_mass[..., j]`` is the sum over this call's rows of the attention key j receives,
    ``row_count[..., j]`` the number of rows that can see key j (broadcastable), and
    ``is_first[..., j]`` marks the sequence's first token. Keys no row can see are never
    sinks; position 0 is excluded explicitly (not "the first key above the threshold", the
    release's quirk).
    """
    count = row_count.to(torch.float32)
    seen = count > 0
    score = col_mass.to(torch.float32) / count.clamp_min(1.0)
    return seen & ~is_first & (score > threshold)


def _row_factor(
    sink_mass: torch.Tensor, nonsink_mass: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale of the non-sink columns per row, and which rows are calibrated at all.

    ``(1 - beta*P_S) / (1 - P_S)`` is written as ``1 + (1 - beta) * P_S / N`` with the
    non-sink mass ``N`` summed directly: ``1 - P_S`` cancels catastrophically when a row
    puts nearly all its attention on a sink, and the factor would amplify that error.
    """
    active = (sink_mass > 0) & (nonsink_mass > NONSINK_EPS)
    safe = torch.where(active, nonsink_mass, torch.ones_like(nonsink_mass))
    return 1.0 + (1.0 - beta) * sink_mass / safe, active


def calibrate_probs(probs: torch.Tensor, sinks: torch.Tensor, beta: float) -> torch.Tensor:
    """Spec section 2 on probabilities: ``probs [..., Lq, Lk]``, ``sinks [..., Lk]``.

    Returns float32. Rows without sink mass, rows whose non-sink mass vanishes, and
    ``beta == 1`` are returned exactly unchanged.
    """
    p = probs.to(torch.float32)
    if beta == 1.0:
        return p.clone()
    s = sinks.unsqueeze(-2)
    sink_p = p * s
    sink_mass = sink_p.sum(-1)
    factor, active = _row_factor(sink_mass, (p - sink_p).sum(-1), beta)
    calibrated = torch.where(s, p * beta, p * factor.unsqueeze(-1))
    return torch.where(active.unsqueeze(-1), calibrated, p)


def calibrate_output(
    out: torch.Tensor, sink_mass: torch.Tensor, sink_out: torch.Tensor, beta: float
) -> torch.Tensor:
    """Spec section 2 on outputs: ``o' = beta*o_S + ((1-beta*P_S)/(1-P_S))*(o-o_S)``.

    ``out [..., Lq, D]`` is the ordinary attention output, ``sink_mass [..., Lq]`` the row's
    attention on its sinks P_S and ``sink_out [..., Lq, D]`` = sum over sinks of A v.
    Rows with P_S == 0 or 1 - P_S below float resolution come back exactly unchanged.

    This form needs only the fused kernel's output plus a sparse pass over the sink
    columns, but ``o - o_S`` cancels when P_S is close to 1 (error ~ ulp(o) / (1 - P_S));
    the blocked kernel below therefore calibrates probabilities instead.
    """
    o = out.to(torch.float32)
    if beta == 1.0:
        return o.clone()
    sink_mass = sink_mass.to(torch.float32)
    factor, active = _row_factor(sink_mass, 1.0 - sink_mass, beta)
    o_s = sink_out.to(torch.float32)
    calibrated = beta * o_s + factor.unsqueeze(-1) * (o - o_s)
    return torch.where(active.unsqueeze(-1), calibrated, o)


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    hkv = x.shape[1]
    if hkv == num_heads:
        return x
    if num_heads % hkv:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({hkv})")
    return x.repeat_interleave(num_heads // hkv, dim=1)


def _check_shapes(q, k, v, q_pos, k_pos):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, heads, L, D]")
    B, _, Lq, _ = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if tuple(q_pos.shape) != (B, Lq) or tuple(k_pos.shape) != (B, k.shape[2]):
        raise ValueError("q_pos must be [B, Lq] and k_pos [B, Lk]")


def dense_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's own attention, in full: ``(probs [B, H, Lq, Lk], vis [B, 1, Lq, Lk], v
    expanded to the query heads [B, H, Lk, D])``, all float32. The dense references of ACT and
    of every other rule (:mod:`act_plugin.rules`) start from it."""
    _check_shapes(q, k, v, q_pos, k_pos)
    H = q.shape[1]
    kf = _expand_kv(k, H).to(torch.float32)
    vf = _expand_kv(v, H).to(torch.float32)
    vis = visibility_mask(q_pos, k_pos, window)
    if attn_mask is not None:
        vis = vis & attn_mask
    vis = vis.unsqueeze(1)  # [B, 1, Lq, Lk]
    scores = torch.matmul(q.to(torch.float32), kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~vis, float("-inf"))
    # Rows that see nothing (padding rows) get all-zero probabilities instead of NaN.
    row_max = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    e = torch.exp(scores - row_max)
    probs = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return probs, vis, vf


def act_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    scale: float,
    beta: float,
    threshold: float,
    window: int | None = None,
    attn_mask: torch.Tensor | None = None,
) -> ACTResult:
    """Obviously-correct reference: the full ``[B, H, Lq, Lk]`` probability matrix.

    ``attn_mask`` (bool ``[B, Lq, Lk]``, True = may attend) is ANDed with the positional
    visibility, for callers that hold a model's own mask.
    """
    probs, vis, vf = dense_probabilities(q, k, v, q_pos, k_pos, scale=scale, window=window, attn_mask=attn_mask)
    col_mass = probs.sum(-2)  # [B, H, Lk]
    row_count = vis.sum(-2)  # [B, 1, Lk]
    sinks = find_sinks(col_mass, row_count, (k_pos == 0).unsqueeze(1), threshold)
    cal = calibrate_probs(probs, sinks, beta)
    return ACTResult(out=torch.matmul(cal, vf), sinks=sinks, probs=cal)


def act_attention_blocked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    scale: float,
    beta: float,
    threshold: float,
    window: int | None = None,
    attn_mask: torch.Tensor | None = None,
    max_block_elems: int = DEFAULT_BLOCK_ELEMS,
) -> ACTResult:
    """Same result as :func:`act_attention_dense` without the full ``q x k`` matrix.

    Pass 1 walks blocks of rows; each block's scores over all keys give its rows' exact
    log-sum-exp and its share of the column sums. With the column sums complete the sinks
    are known; pass 2 recomputes each block's probabilities, calibrates them and multiplies
    by V. Memory is one block of ``max_block_elems`` scores, whatever the prompt length, and
    there is no host sync. When every row fits in one block (decode steps, short prompts)
    the probabilities are still in memory and are calibrated directly in one pass.
    """
    _check_shapes(q, k, v, q_pos, k_pos)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    rows_per_block = max(1, max_block_elems // max(1, B * H * Lk))
    if rows_per_block >= Lq:
        res = act_attention_dense(
            q, k, v, q_pos, k_pos, scale=scale, beta=beta, threshold=threshold, window=window, attn_mask=attn_mask
        )
        res.probs = None
        return res

    scores = _RowBlockScores(
        q=q.to(torch.float32), kt=_expand_kv(k, H).to(torch.float32).transpose(-1, -2), q_pos=q_pos, k_pos=k_pos,
        window=window, attn_mask=attn_mask, scale=scale,
    )
    blocks = [(r0, min(Lq, r0 + rows_per_block)) for r0 in range(0, Lq, rows_per_block)]
    lse, col_mass, row_count = _column_statistics(scores, blocks, B, H, Lq, Lk)
    sinks = find_sinks(col_mass, row_count, (k_pos == 0).unsqueeze(1), threshold)
    out = _calibrated_output(scores, blocks, lse, sinks, beta, _expand_kv(v, H).to(torch.float32))
    return ACTResult(out=out, sinks=sinks)


@dataclass
class _RowBlockScores:
    """Attention probabilities of one block of query rows over all keys, computed on demand, so
    that memory holds one block of scores at a time (float32 queries, transposed keys)."""

    q: torch.Tensor  # [B, H, Lq, D]
    kt: torch.Tensor  # [B, H, D, Lk]
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    window: int | None
    attn_mask: torch.Tensor | None
    scale: float

    def probs(self, r0: int, r1: int, lse: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``r0:r1``: probabilities, visibility and log-sum-exp (computed here when
        ``lse`` is None, else the given exact normalisers are used)."""
        vis = visibility_mask(self.q_pos[:, r0:r1], self.k_pos, self.window)
        if self.attn_mask is not None:
            vis = vis & self.attn_mask[:, r0:r1]
        vis = vis.unsqueeze(1)
        s = torch.matmul(self.q[:, :, r0:r1], self.kt) * self.scale
        s = s.masked_fill(~vis, float("-inf"))
        if lse is None:
            lse = torch.logsumexp(s, dim=-1).clamp_min(torch.finfo(torch.float32).min)
        p = torch.exp(s - lse.unsqueeze(-1)).masked_fill(~vis, 0.0)
        return p, vis, lse


def _column_statistics(scores: _RowBlockScores, blocks: list[tuple[int, int]], B: int, H: int, Lq: int, Lk: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 1: exact row normalisers, and the column mass and row counts of this call's rows."""
    device = scores.q.device
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=device)
    col_mass = torch.zeros(B, H, Lk, dtype=torch.float32, device=device)
    row_count = torch.zeros(B, 1, Lk, dtype=torch.float32, device=device)
    for r0, r1 in blocks:
        p, vis, lse[:, :, r0:r1] = scores.probs(r0, r1, None)
        col_mass += p.sum(-2)
        row_count += vis.sum(-2)
    return lse, col_mass, row_count


def _calibrated_output(scores: _RowBlockScores, blocks: list[tuple[int, int]], lse: torch.Tensor,
                       sinks: torch.Tensor, beta: float, vf: torch.Tensor) -> torch.Tensor:
    """Pass 2: recompute each block's probabilities, calibrate them, multiply by V.
    (Not the output form o' = f(o, o_S): when a row's non-sink mass is tiny, o - o_S cancels
    catastrophically and the factor 1/(1 - P_S) amplifies the error.)"""
    B, H, Lq, _ = scores.q.shape
    out = torch.empty(B, H, Lq, vf.shape[-1], dtype=torch.float32, device=scores.q.device)
    for r0, r1 in blocks:
        p, _, _ = scores.probs(r0, r1, lse[:, :, r0:r1])
        out[:, :, r0:r1] = torch.matmul(calibrate_probs(p, sinks, beta), vf)
    return out
