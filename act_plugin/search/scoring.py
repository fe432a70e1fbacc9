"""Scores of a calibration set from next-token log-probabilities of the answer tokens.

Every sample is scored from ONE prefill of its prompt (as the paper scores): ``lp[i, c]`` is
the next-token log-probability (full-vocabulary log-softmax) of answer ``c``'s token at the
end of prompt ``i``. From it:

* accuracy: ``argmax_c lp[i, c] == gold``;
* margin: ``lp[i, gold] - max_{c != gold} lp[i, c]`` (positive iff correct; continuous, so
  far less noisy than accuracy on a few hundred prompts).

Task scores are means over the task's samples; the calibration score is the unweighted
mean over tasks (each task counts the same, whatever its sample count).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Scores", "CalibrationSet", "score_logprobs", "sample_weights", "margins_torch", "per_sample",
           "OBJECTIVES", "objective_gain", "scores_from_margins"]


@dataclass(frozen=True)
class CalibrationSet:
    """Prompts (token ids), answer token ids and gold indices of the calibration samples."""

    prompts: list[list[int]]
    choice_ids: list[tuple[int, ...]]
    gold: list[int]
    tasks: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def task_names(self) -> list[str]:
        return list(dict.fromkeys(self.tasks))

    @property
    def max_choices(self) -> int:
        return max(len(c) for c in self.choice_ids)

    def choice_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """``ids [N, Cmax]`` (0-padded) and ``valid [N, Cmax]``."""
        n, c = len(self), self.max_choices
        ids = np.zeros((n, c), dtype=np.int64)
        valid = np.zeros((n, c), dtype=bool)
        for i, ch in enumerate(self.choice_ids):
            ids[i, : len(ch)] = ch
            valid[i, : len(ch)] = True
        return ids, valid


def sample_weights(tasks: Sequence[str]) -> np.ndarray:
    """Weight of each sample in the macro average over tasks (sums to 1)."""
    names = list(dict.fromkeys(tasks))
    counts = {t: 0 for t in names}
    for t in tasks:
        counts[t] += 1
    return np.array([1.0 / (len(names) * counts[t]) for t in tasks], dtype=np.float64)


@dataclass(frozen=True)
class Scores:
    """Aggregate scores of one configuration on the calibration set."""

    accuracy: float
    margin: float
    per_task: dict[str, dict[str, float]]

    def get(self, score: str) -> float:
        if score == "accuracy":
            return self.accuracy
        if score == "margin":
            return self.margin
        raise ValueError(f"unknown score {score!r}")

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "margin": self.margin, "per_task": self.per_task}

    @classmethod
    def from_dict(cls, d: dict) -> "Scores":
        return cls(accuracy=float(d["accuracy"]), margin=float(d["margin"]), per_task=dict(d["per_task"]))


def per_sample(lp: np.ndarray, gold: Sequence[int], valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(correct [N] bool, margin [N])`` from ``lp [N, Cmax]`` (invalid entries ignored).

    The margin is :func:`margins_torch`'s, so the exact scores and the ranking pass's
    objective are one definition. Ties count as wrong (a tie is no evidence either way)."""
    import torch

    margin = margins_torch(torch.from_numpy(np.asarray(lp, dtype=np.float64)),
                           torch.as_tensor(np.asarray(gold, dtype=np.int64)),
                           torch.from_numpy(np.asarray(valid, dtype=bool))).numpy()
    return margin > 0, margin


def score_logprobs(lp: np.ndarray, calib: CalibrationSet) -> Scores:
    """Accuracy and margin (macro over tasks) of answer log-probabilities ``lp [N, Cmax]``."""
    _, valid = calib.choice_matrix()
    correct, margin = per_sample(lp, calib.gold, valid)
    tasks = np.asarray(calib.tasks)
    per_task = {}
    for t in calib.task_names:
        m = tasks == t
        per_task[t] = {"n": int(m.sum()), "accuracy": float(correct[m].mean()), "margin": float(margin[m].mean())}
    acc = float(np.mean([v["accuracy"] for v in per_task.values()]))
    mar = float(np.mean([v["margin"] for v in per_task.values()]))
    return Scores(accuracy=acc, margin=mar, per_task=per_task)


def margins_torch(lp, gold, valid):
    """Torch version of the per-sample margin (differentiable; used by the ranking pass)."""
    import torch

    neg = torch.finfo(lp.dtype).min
    lp = lp.masked_fill(~valid, neg)
    g = lp.gather(1, gold.unsqueeze(1)).squeeze(1)
    wrong = lp.scatter(1, gold.unsqueeze(1), neg)
    return g - wrong.max(dim=1).values


# ----------------------------------------------------------------------------- objectives
#: What the search maximises on its search part (a gain over the uncalibrated model, macro
#: over tasks unless said otherwise):
#: ``margin`` mean log-prob margin; ``clipped_margin`` the margin clipped to [-clip, clip]
#: (a prompt already far right or far wrong cannot pay for others); ``accuracy`` net flips
#: (prompts turned right minus prompts turned wrong, per prompt); ``worst_task`` the smallest
#: per-task change of the mean margin (no task may pay for another).
OBJECTIVES = ("margin", "clipped_margin", "accuracy", "worst_task")


def _task_means(values: np.ndarray, tasks: np.ndarray, names: list[str]) -> dict[str, float]:
    return {t: float(values[tasks == t].mean()) for t in names}


def objective_gain(objective: str, margins: np.ndarray, base_margins: np.ndarray, tasks: Sequence[str],
                   clip: float = 1.0) -> tuple[float, dict[str, float]]:
    """``(gain, per-task gain)`` of per-sample ``margins`` over ``base_margins`` (same prompts)."""
    m = np.asarray(margins, dtype=np.float64)
    b = np.asarray(base_margins, dtype=np.float64)
    t = np.asarray(tasks)
    names = list(dict.fromkeys(tasks))
    if objective in ("margin", "worst_task"):
        d = m - b
    elif objective == "clipped_margin":
        d = np.clip(m, -clip, clip) - np.clip(b, -clip, clip)
    elif objective == "accuracy":
        d = (m > 0).astype(np.float64) - (b > 0)
    else:
        raise ValueError(f"unknown objective {objective!r} (one of {', '.join(OBJECTIVES)})")
    per_task = _task_means(d, t, names)
    gain = min(per_task.values()) if objective == "worst_task" else float(np.mean(list(per_task.values())))
    return float(gain), per_task


def scores_from_margins(margins: np.ndarray, tasks: Sequence[str]) -> Scores:
    """:class:`Scores` (macro accuracy and margin) of per-sample margins."""
    m = np.asarray(margins, dtype=np.float64)
    t = np.asarray(tasks)
    per_task = {}
    for name in dict.fromkeys(tasks):
        k = t == name
        per_task[name] = {"n": int(k.sum()), "accuracy": float((m[k] > 0).mean()), "margin": float(m[k].mean())}
    return Scores(accuracy=float(np.mean([v["accuracy"] for v in per_task.values()])),
                  margin=float(np.mean([v["margin"] for v in per_task.values()])), per_task=per_task)
