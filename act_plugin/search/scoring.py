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

__all__ = ["Scores", "CalibrationSet", "score_logprobs", "sample_weights", "margins_torch"]


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
