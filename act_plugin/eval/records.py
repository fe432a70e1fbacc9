"""Per-document records from lm-eval's logged samples, and the correctness matrices the
statistics pair across arms (documents matched by ``doc_id``, one column per few-shot seed)."""

from __future__ import annotations

import numpy as np

from act_plugin.config import ACTConfigError
from act_plugin.tasks import get_task

__all__ = ["records_from_samples", "primary_metric", "correctness_matrix"]


def records_from_samples(task: str, lm_task: str, arm: str, seed: int, samples: list[dict], metric: str
                         ) -> list[dict]:
    """One record per logged sample (the per-sample file's line; see :mod:`act_plugin.eval.report`),
    sorted by ``doc_id``; ``correct`` is lm-eval's value of the task's primary ``metric``."""
    return sorted((_record(task, lm_task, arm, seed, s, metric) for s in samples), key=lambda r: r["doc_id"])


def _record(task: str, lm_task: str, arm: str, seed: int, sample: dict, metric: str) -> dict:
    if metric not in sample:
        raise ACTConfigError(f"lm-eval reported no '{metric}' for task {lm_task} (has {sorted(sample)})")
    doc = sample.get("doc") or {}
    resps = sample.get("filtered_resps") or []
    lls = [float(r[0]) for r in resps]
    choices = list(doc.get("choices")
                   or [a[1][1:] if a[1].startswith(" ") else a[1] for a in sample.get("arguments", [])])
    rec = {
        "task": task, "lm_eval_task": lm_task, "arm": arm, "seed": seed, "doc_id": int(sample["doc_id"]),
        "row": doc.get("row"), "gold": _gold(sample, doc), "pred": _prediction(lls, choices, metric),
        "correct": float(sample[metric]),
    }
    for m in ("acc", "acc_norm"):
        if m in sample:
            rec[m] = float(sample[m])
    rec.update({"loglikelihoods": lls, "greedy": [bool(r[1]) for r in resps], "choices": choices,
                "prompt": sample["arguments"][0][0] if sample.get("arguments") else None})
    return rec


def _prediction(lls: list[float], choices: list[str], metric: str) -> int:
    """The argmax behind the metric (acc_norm: log-likelihood per character, as lm-eval does)."""
    scores = [ll / max(1, len(c)) for ll, c in zip(lls, choices)] if metric == "acc_norm" else lls
    return int(np.argmax(scores)) if scores else -1


def _gold(sample: dict, doc: dict) -> object:
    gold = sample.get("target")
    if "gold" in doc:
        return int(doc["gold"])
    return int(gold) if isinstance(gold, (int, np.integer)) else gold


def primary_metric(task: str) -> str:
    """The metric whose per-document value is a task's correctness."""
    return "acc" if task.startswith("lm_eval:") else get_task(task).metric


def correctness_matrix(recs: list[dict], seeds: list[int]) -> tuple[list[int], np.ndarray]:
    """The documents (sorted ``doc_id``) and their correctness ``[documents, seeds]``."""
    by = {(r["seed"], r["doc_id"]): r["correct"] for r in recs}
    docs = sorted({r["doc_id"] for r in recs})
    m = np.full((len(docs), len(seeds)), np.nan)
    for i, d in enumerate(docs):
        for j, s in enumerate(seeds):
            if (s, d) in by:
                m[i, j] = by[(s, d)]
    if np.isnan(m).any():
        raise RuntimeError("lm-eval logged different documents for different seeds")
    return docs, m
