"""Next-token scoring: log p(token | context) for single-token answers, one prefill per context.

ACT finds sinks from every row of a forward call, so lm-eval's usual log-likelihood request
(context + continuation in one prompt) lets the continuation's rows change how the context is
calibrated. The paper scores from ONE forward pass over the prompt alone: requests whose
continuation is a single token are grouped by context, and each distinct context is prefilled
once, asking the engine for the next-token log-probabilities of exactly the candidate ids.

This module is pure (no engine, no lm-eval): the engine call is the ``generate`` argument, so
the grouping, truncation, chunking and answer assembly are unit-testable with a fake engine.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_IDS_PER_REQUEST",
    "ContextRequest",
    "GenerateFn",
    "plan_context_requests",
    "score_next_tokens",
    "split_single_token",
]

logger = logging.getLogger(__name__)

MAX_IDS_PER_REQUEST = 128  # vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS

Context = tuple[int, ...]
# generate(requests) -> for each request: (greedy next-token id, {candidate id: log-probability})
GenerateFn = Callable[[Sequence["ContextRequest"]], Sequence[tuple[int, dict[int, float]]]]


@dataclass(frozen=True)
class ContextRequest:
    """One engine request: prefill ``context`` and return the log-probabilities of ``token_ids``."""

    context: Context
    token_ids: tuple[int, ...]


def split_single_token(requests: Sequence[tuple[object, Sequence[int], Sequence[int]]]) -> tuple[list[int], list[int]]:
    """Indices of lm-eval loglikelihood requests ``(cache_key, context ids, continuation ids)``
    that next-token scoring answers (one-token continuation after a non-empty context), and
    of the rest (lm-eval's full-text path)."""
    single = [i for i, (_, ctx, cont) in enumerate(requests) if len(cont) == 1 and len(ctx) > 0]
    chosen = set(single)
    return single, [i for i in range(len(requests)) if i not in chosen]


def plan_context_requests(
    pairs: Sequence[tuple[Sequence[int], int]], max_context: int, max_ids: int = MAX_IDS_PER_REQUEST
) -> tuple[list[Context], list[ContextRequest]]:
    """The context key of each ``(context ids, token id)`` pair (left-truncated to
    ``max_context`` tokens) and the engine requests covering them: one per distinct context
    and ``max_ids`` candidates, longest contexts first (like lm-eval: an out-of-memory shows
    early and progress is honest)."""
    if max_context < 1:
        raise ValueError(f"max_context must be at least 1, got {max_context}")
    groups: dict[Context, set[int]] = {}
    keys: list[Context] = []
    for ctx, token in pairs:
        if len(ctx) > max_context:
            logger.warning("context of %d tokens truncated to %d for next-token scoring", len(ctx), max_context)
        key = tuple(int(t) for t in ctx[-max_context:])
        groups.setdefault(key, set()).add(int(token))
        keys.append(key)
    requests = []
    for key in sorted(groups, key=len, reverse=True):
        ids = sorted(groups[key])
        for start in range(0, len(ids), max_ids):
            requests.append(ContextRequest(key, tuple(ids[start:start + max_ids])))
    return keys, requests


def score_next_tokens(
    pairs: Sequence[tuple[Sequence[int], int]],
    generate: GenerateFn,
    max_context: int,
    chunk_size: int | None = None,
    max_ids: int = MAX_IDS_PER_REQUEST,
    on_progress: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """``(log p(token | context), token is the greedy next token)`` for each pair, from one
    prefill per distinct context. ``generate`` is called with at most ``chunk_size`` requests
    at a time (None: all at once); ``on_progress(n)`` reports pairs whose context is done."""
    keys, requests = plan_context_requests(pairs, max_context, max_ids)
    pairs_per_key = Counter(keys)
    logprobs: dict[Context, dict[int, float]] = {k: {} for k in pairs_per_key}
    greedy: dict[Context, int] = {}
    chunk = len(requests) if chunk_size is None else max(1, int(chunk_size))
    for lo in range(0, len(requests), max(chunk, 1)):
        batch = requests[lo:lo + chunk]
        answers = generate(batch)
        if len(answers) != len(batch):
            raise RuntimeError(f"the engine answered {len(answers)} of {len(batch)} next-token requests")
        for req, (greedy_id, step) in zip(batch, answers):
            first = req.context not in greedy
            greedy[req.context] = int(greedy_id)
            logprobs[req.context].update({int(t): float(lp) for t, lp in step.items()})
            if first and on_progress is not None:
                on_progress(pairs_per_key[req.context])
    out = []
    for key, (_, token) in zip(keys, pairs):
        lp = logprobs[key].get(int(token))
        if lp is None:
            raise RuntimeError(f"the engine returned no log-probability for token {token}")
        out.append((lp, greedy[key] == int(token)))
    return out
