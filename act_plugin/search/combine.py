"""The combined-set step: kept heads together, then greedy removals, never below baseline.

Heads that help alone need not help together (their corrections overlap or interfere), so
the kept set is scored as a whole and heads are dropped greedily while that helps:

1. score the set ``S`` of all kept heads (or of the best ``max_heads`` of them by single-head
   score: each removal pass below costs one evaluation per head);
2. try removing each head of ``S`` in turn, least useful alone first (ascending exact
   single-head gain); whenever a removal raises the score, drop that head at once
   (first improvement) and go on with the rest;
3. repeat passes until a full pass over the current set finds no removal that helps.

The result is the best-scoring set among every set evaluated during the search -- the
empty set (the baseline), the single heads and the sets of the greedy path -- ties going to
the smaller set. It therefore never scores below the baseline on the calibration data it was
chosen on; when no evaluated set beats the baseline the empty set is returned (and
``note`` says so).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["CombineResult", "combine_heads", "combine_pool"]

Head = tuple[int, int]


@dataclass
class CombineResult:
    heads: list[Head]  # the chosen set (sorted)
    score: float
    baseline: float
    start: list[Head]  # the kept set the step started from
    start_score: float | None
    steps: list[dict] = field(default_factory=list)  # every evaluation of the step, in order
    evaluations: int = 0  # new evaluations the step paid for
    complete: bool = True  # False when the evaluation cap stopped the greedy loop
    note: str = ""

    def to_dict(self) -> dict:
        return {
            "heads": [list(h) for h in self.heads], "score": self.score, "baseline": self.baseline,
            "delta": self.score - self.baseline, "start": [list(h) for h in self.start],
            "start_score": self.start_score, "steps": self.steps, "evaluations": self.evaluations,
            "complete": self.complete, "note": self.note,
        }


def _key(s: Iterable[Head]) -> tuple:
    return tuple(sorted(s))


def combine_pool(kept: list[Head], single_score: dict[Head, float], max_heads: int | None) -> list[Head]:
    """The heads the combined-set step starts from: the best ``max_heads`` kept heads by
    exact single-head score (ties: lower layer/head first), sorted. A greedy removal pass
    costs one exact evaluation per head, so this bounds the step's cost."""
    ranked = sorted(kept, key=lambda h: (-single_score[h], h))
    return sorted(ranked[:max_heads] if max_heads else ranked)


def combine_heads(
    kept: Iterable[Head],
    evaluate: Callable[[frozenset], float],
    baseline: float,
    singles: dict[Head, float] | None = None,
    max_heads: int | None = None,
    max_evals: int | None = None,
) -> CombineResult:
    """Greedy backward elimination from ``kept`` (see the module docs).

    ``evaluate(frozenset_of_heads) -> score`` (higher is better); ``baseline`` is the score
    of the empty set; ``singles`` the exact score of each head alone (orders the removals and
    joins the final choice); ``max_heads`` starts from the best that many kept heads by
    single score (needs ``singles``).
    """
    kept = sorted({(int(a), int(b)) for a, b in kept})
    singles = {tuple(k): float(v) for k, v in (singles or {}).items()}
    if max_heads is not None:
        unscored = [h for h in kept if h not in singles]
        if unscored:
            raise ValueError(f"max_heads needs the single score of every kept head; missing {unscored}")
        kept = combine_pool(kept, singles, max_heads)
    scores: dict[frozenset, float] = {frozenset(): float(baseline)}
    for h, v in singles.items():
        scores.setdefault(frozenset([h]), v)
    result = CombineResult(heads=[], score=float(baseline), baseline=float(baseline), start=kept, start_score=None)

    def score(s: frozenset, action: str) -> float | None:
        if s not in scores:
            if max_evals is not None and result.evaluations >= max_evals:
                result.complete = False
                return None
            scores[s] = float(evaluate(s))
            result.evaluations += 1
        step = {"action": action, "heads": [list(h) for h in _key(s)], "score": scores[s]}
        result.steps.append(step)
        return scores[s]

    if kept:
        current = frozenset(kept)
        cur = score(current, "all kept")
        result.start_score = cur
        if cur is not None and len(current) > 1:
            changed = True
            while changed and result.complete:
                changed = False
                order = sorted(current, key=lambda h: (singles.get(h, float("inf")), h))
                for h in order:
                    if h not in current or len(current) <= 1:
                        continue
                    trial = current - {h}
                    s = score(trial, f"drop {list(h)}")
                    if s is None:
                        break
                    if s > cur:
                        current, cur = trial, s
                        result.steps[-1]["accepted"] = True
                        changed = True

    # best evaluated set; ties -> fewer heads, then lexicographic (deterministic)
    best = min(scores.items(), key=lambda kv: (-kv[1], len(kv[0]), _key(kv[0])))
    result.heads = list(_key(best[0]))
    result.score = best[1]
    if not result.heads:
        result.note = ("no evaluated head set beats the baseline on the calibration data: the empty set is returned"
                       if kept or singles else "no head was kept: the empty set is returned")
    elif result.start_score is not None and frozenset(result.heads) != frozenset(kept):
        result.note = (f"{len(kept) - len(result.heads)} of {len(kept)} kept heads dropped" if
                       set(result.heads) <= set(kept) else "a single head scores better than every combined set")
    if not result.complete:
        result.note = (result.note + "; " if result.note else "") + (
            f"stopped after {result.evaluations} evaluations (combine_max_evals): not every removal was checked")
    return result
