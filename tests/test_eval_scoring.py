"""Next-token scoring without an engine (act_plugin.eval.scoring): grouping, truncation,
chunking and answer assembly against a fake engine with known log-probabilities."""

from __future__ import annotations

import math

import pytest

from act_plugin.eval.scoring import ContextRequest, plan_context_requests, score_next_tokens, split_single_token

VOCAB = 300


def _logprobs(context: tuple[int, ...]) -> list[float]:
    """A deterministic next-token distribution per context (log-softmax of made-up logits)."""
    logits = [math.sin(0.37 * t + 0.11 * sum(context) + len(context)) * 3 for t in range(VOCAB)]
    top = max(logits)
    norm = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - norm for x in logits]


class FakeEngine:
    def __init__(self) -> None:
        self.calls: list[list[ContextRequest]] = []

    def __call__(self, requests):
        self.calls.append(list(requests))
        out = []
        for r in requests:
            lp = _logprobs(r.context)
            out.append((max(range(VOCAB), key=lp.__getitem__), {t: lp[t] for t in r.token_ids}))
        return out


def test_split_single_token_requests():
    reqs = [(None, [1, 2], [5]), (None, [1, 2], [5, 6]), (None, [], [7]), ("k", [3], [8])]
    assert split_single_token(reqs) == ([0, 3], [1, 2])


def test_one_prefill_per_context_and_exact_answers():
    a, b = [1, 2, 3], [4, 5]
    pairs = [(a, 10), (b, 11), (a, 12), (a, 10), (b, 250)]
    engine = FakeEngine()
    done: list[int] = []
    got = score_next_tokens(pairs, engine, max_context=100, on_progress=done.append)
    assert len(engine.calls) == 1 and [r.context for r in engine.calls[0]] == [tuple(a), tuple(b)]  # longest first
    assert engine.calls[0][0].token_ids == (10, 12)
    for (ctx, tok), (lp, greedy) in zip(pairs, got):
        ref = _logprobs(tuple(ctx))
        assert lp == pytest.approx(ref[tok]) and greedy == (tok == max(range(VOCAB), key=ref.__getitem__))
    assert sorted(done) == [2, 3]  # pairs per context, once each


def test_greedy_flag_is_true_for_the_argmax():
    ctx = (7, 8, 9)
    best = max(range(VOCAB), key=_logprobs(ctx).__getitem__)
    (lp, greedy), (_, other) = score_next_tokens([(list(ctx), best), (list(ctx), (best + 1) % VOCAB)], FakeEngine(), 50)
    assert greedy and not other


def test_truncation_keeps_the_last_tokens_and_merges_contexts():
    keys, requests = plan_context_requests([([9, 1, 2, 3], 5), ([8, 1, 2, 3], 6)], max_context=3)
    assert keys == [(1, 2, 3), (1, 2, 3)] and requests == [ContextRequest((1, 2, 3), (5, 6))]


def test_candidate_ids_are_split_into_bounded_requests_and_chunks():
    pairs = [([1, 2], t) for t in range(10)] + [([3], 4)]
    engine = FakeEngine()
    got = score_next_tokens(pairs, engine, max_context=8, chunk_size=2, max_ids=4)
    assert [len(c) for c in engine.calls] == [2, 2]  # 3 requests for [1, 2] + 1 for [3], two per call
    assert [r.token_ids for c in engine.calls for r in c] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9), (4,)]
    assert [lp for lp, _ in got] == pytest.approx([_logprobs((1, 2))[t] for t in range(10)] + [_logprobs((3,))[4]])


def test_missing_answers_are_errors():
    with pytest.raises(RuntimeError, match="no log-probability for token 5"):
        score_next_tokens([([1], 5)], lambda reqs: [(0, {})], max_context=4)
    with pytest.raises(RuntimeError, match="answered 0 of 1"):
        score_next_tokens([([1], 5)], lambda reqs: [], max_context=4)
    with pytest.raises(ValueError, match="max_context"):
        plan_context_requests([([1], 5)], max_context=0)
