"""The emphasised tokens of the ``spans`` rule: a prompt's character spans -> a token mask.

A request (or a batch row on the HF path) marks spans of its prompt as half-open character
ranges ``[[start, end], ...]``. A token is emphasised when its character range (the
tokenizer's offsets) overlaps a span. Spans that cannot be mapped are refused with
:class:`SpanError` naming the span: not a pair of integers, empty or backwards, past the end
of the text, overlapping another span, or covering no token.

The mask is kept *by token position* (position 0 = the sequence's first real token, the
convention of :mod:`act_plugin.core`), so padding and its side never matter; tokens past the
mask (generated ones) are never emphasised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SpanError", "check_spans", "emphasis_by_position", "emphasis_from_spans", "spans_to_token_mask",
           "token_ranges"]


class SpanError(ValueError):
    """Spans that cannot be mapped to tokens (the message names the span)."""


def check_spans(spans: Any, text_len: int) -> list[tuple[int, int]]:
    """``spans`` as sorted ``(start, end)`` pairs, checked against a text of ``text_len`` characters."""
    if not isinstance(spans, (list, tuple)) or not spans:
        raise SpanError(f"spans must be a non-empty list of [start, end] character ranges, got {spans!r}")
    out = []
    for span in spans:
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
            raise SpanError(f"span {span!r}: expected [start, end], two integer character offsets")
        start, end = span
        if not 0 <= start < end:
            raise SpanError(f"span {list(span)}: needs 0 <= start < end (end is exclusive)")
        if end > text_len:
            raise SpanError(f"span {list(span)}: past the end of the prompt ({text_len} characters)")
        out.append((start, end))
    out.sort()
    for (s0, e0), (s1, e1) in zip(out, out[1:]):
        if s1 < e0:
            raise SpanError(f"spans [{s0}, {e0}] and [{s1}, {e1}] overlap")
    return out


def spans_to_token_mask(offsets: Sequence[Sequence[int]], spans: Any, text_len: int) -> list[bool]:
    """Per token (``offsets``: the tokenizer's ``(start, end)`` character range of each token;
    special tokens have ``start == end``): does it overlap a span. Every span must cover a token."""
    checked = check_spans(spans, text_len)
    mask = [False] * len(offsets)
    for start, end in checked:
        hit = False
        for i, (t0, t1) in enumerate(offsets):
            if t0 < t1 and t0 < end and start < t1:
                mask[i] = hit = True
        if not hit:
            raise SpanError(f"span [{start}, {end}] covers no token of the prompt")
    return mask


def token_ranges(mask: Sequence[bool]) -> list[list[int]]:
    """A token mask as its runs of emphasised tokens, half-open ``[[start, end], ...]`` (the
    compact form the vLLM front end hands the workers)."""
    out: list[list[int]] = []
    for i, marked in enumerate(mask):
        if not marked:
            continue
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def emphasis_by_position(masks: Sequence[Sequence[bool]], device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sequence token masks (real tokens only, in order) -> bool ``[B, P]`` by position."""
    width = max((len(m) for m in masks), default=0)
    out = torch.zeros(len(masks), max(1, width), dtype=torch.bool, device=device)
    for b, m in enumerate(masks):
        if len(m):
            out[b, : len(m)] = torch.tensor(list(m), dtype=torch.bool, device=device)
    return out


def emphasis_from_spans(tokenizer: Any, texts: Sequence[str], spans: Sequence[Any],
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``[B, P]`` position mask of ``texts`` tokenized by ``tokenizer`` (a fast tokenizer:
    it must return offsets) with ``spans[b]`` emphasised in ``texts[b]``; tokenize the batch
    with the same tokenizer settings (special tokens included) for the positions to agree."""
    masks = []
    for b, (text, row_spans) in enumerate(zip(texts, spans, strict=True)):
        enc = tokenizer(text, return_offsets_mapping=True)
        try:
            masks.append(spans_to_token_mask(enc["offset_mapping"], row_spans, len(text)))
        except SpanError as e:
            raise SpanError(f"row {b}: {e}") from None
    return emphasis_by_position(masks, device)


def emphasised_keys(by_position: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, Lk]``: which keys (positions ``k_pos``, -1 = padding) are emphasised."""
    P = by_position.shape[1]
    inside = (k_pos >= 0) & (k_pos < P)
    got = by_position.to(k_pos.device).gather(1, k_pos.clamp(0, P - 1))
    return got & inside
