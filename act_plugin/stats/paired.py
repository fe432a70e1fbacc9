"""Paired comparison of two arms' per-document correctness over the same documents.

* :func:`paired_bootstrap_ci` -- percentile bootstrap (``scipy.stats.bootstrap``) of the mean
  per-document accuracy difference, resampling documents.
* :func:`compare` -- the bootstrap CI and McNemar's exact test
  (:func:`act_plugin.stats.mcnemar.mcnemar`), plus flip counts, for per-document correctness of two arms.
* :func:`macro_bootstrap_ci` -- CI of the mean of per-task deltas (tasks resampled
  independently, stratified by task).

Several seeds (few-shot): correctness arrays are ``[documents, seeds]``; a document's
accuracy is its mean over seeds; the bootstrap resamples documents (the seeds of a document
stay together); the p-value is an exact sign test over documents whose seed-averaged
correctness differs (documents better vs worse under calibration), which is McNemar's exact
test when there is one seed; flip counts are over (document, seed) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st

from act_plugin.stats.mcnemar import mcnemar

__all__ = ["Comparison", "paired_bootstrap_ci", "macro_bootstrap_ci", "compare"]


def _as_2d(x: Sequence | np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError("correctness must be [documents] or [documents, seeds]")
    return a


def paired_bootstrap_ci(
    base: Sequence | np.ndarray,
    treat: Sequence | np.ndarray,
    resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``mean(treat) - mean(base)`` over the same documents."""
    b, t = _as_2d(base), _as_2d(treat)
    if b.shape != t.shape:
        raise ValueError(f"paired arrays differ in shape: {b.shape} vs {t.shape}")
    diff = t.mean(axis=1) - b.mean(axis=1)
    if diff.size == 0:
        return (float("nan"), float("nan"))
    if diff.size == 1 or np.all(diff == diff[0]):
        return (float(diff[0]), float(diff[0]))
    res = _st.bootstrap((diff,), np.mean, n_resamples=resamples, confidence_level=confidence,
                        method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def macro_bootstrap_ci(
    pairs: Sequence[tuple[Sequence | np.ndarray, Sequence | np.ndarray]],
    resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """CI of the unweighted mean over tasks of each task's paired delta (documents
    resampled within each task, independently across tasks)."""
    diffs = []
    for base, treat in pairs:
        b, t = _as_2d(base), _as_2d(treat)
        if b.shape != t.shape:
            raise ValueError(f"paired arrays differ in shape: {b.shape} vs {t.shape}")
        diffs.append(t.mean(axis=1) - b.mean(axis=1))
    diffs = [d for d in diffs if d.size]
    if not diffs:
        return (float("nan"), float("nan"))
    point = float(np.mean([d.mean() for d in diffs]))
    if all(d.size == 1 or np.all(d == d[0]) for d in diffs):
        return (point, point)
    if len(diffs) == 1:
        return paired_bootstrap_ci(np.zeros_like(diffs[0]), diffs[0], resamples, confidence, seed)

    def statistic(*samples, axis=-1):
        return np.mean([np.mean(s, axis=axis) for s in samples], axis=0)

    res = _st.bootstrap(tuple(diffs), statistic, n_resamples=resamples, confidence_level=confidence,
                        method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


@dataclass(frozen=True)
class Comparison:
    """A calibrated arm against the baseline on one task (accuracies as fractions)."""

    n: int  # documents
    seeds: int
    base_acc: float
    treat_acc: float
    delta: float
    ci_low: float
    ci_high: float
    confidence: float
    improved: int  # (document, seed) pairs: baseline wrong -> calibrated right
    worsened: int  # baseline right -> calibrated wrong
    both_correct: int
    both_wrong: int
    docs_better: int  # documents whose seed-averaged correctness went up
    docs_worse: int
    p_value: float  # exact McNemar (one seed) / sign test over documents (several)
    p_value_midp: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare(
    base: Sequence | np.ndarray,
    treat: Sequence | np.ndarray,
    resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Paired comparison of per-document correctness (0/1, ``[docs]`` or ``[docs, seeds]``)."""
    b, t = _as_2d(base), _as_2d(treat)
    if b.shape != t.shape:
        raise ValueError(f"paired arrays differ in shape: {b.shape} vs {t.shape}")
    if not np.isin(b, (0.0, 1.0)).all() or not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("correctness values must be 0 or 1")
    bb, tt = b.astype(bool), t.astype(bool)
    improved = int(np.sum(~bb & tt))
    worsened = int(np.sum(bb & ~tt))
    doc_diff = t.mean(axis=1) - b.mean(axis=1)
    better, worse = int(np.sum(doc_diff > 0)), int(np.sum(doc_diff < 0))
    test = mcnemar(better, worse)
    lo, hi = paired_bootstrap_ci(b, t, resamples, confidence, seed)
    return Comparison(
        n=int(b.shape[0]), seeds=int(b.shape[1]),
        base_acc=float(b.mean()) if b.size else float("nan"),
        treat_acc=float(t.mean()) if t.size else float("nan"),
        delta=float(doc_diff.mean()) if doc_diff.size else float("nan"),
        ci_low=lo, ci_high=hi, confidence=confidence,
        improved=improved, worsened=worsened,
        both_correct=int(np.sum(bb & tt)), both_wrong=int(np.sum(~bb & ~tt)),
        docs_better=better, docs_worse=worse,
        p_value=test.p_exact, p_value_midp=test.p_midp,
    )

