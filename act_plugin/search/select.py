"""Which head sets the search accepts: judged on the validation part, per task, paired.

A head set is compared with the uncalibrated model on the SAME validation prompts of each
task (paired): ``better`` prompts it turns right, ``worse`` prompts it turns wrong. Per task,
the exact McNemar test (two-sided binomial test on the discordant prompts) gives ``p``; a task
is *significantly harmed* when its accuracy drops and ``p < alpha``. The rule of the search
(:func:`judge`): a set is accepted only if NO task is significantly harmed AND the mean of
the per-task accuracy changes is positive. The per-task significance is not corrected for
the number of tasks: that makes refusals more likely, which is the safe side. The test and
the power figures (minimum detectable effect, exact) are :mod:`act_plugin.stats`'s, the same
as the eval's.

Sets are built greedily (:func:`select_forward`): heads are tried in the order the SEARCH
part ranks them (their exact single-head gain there); a head joins the set only when the
enlarged set passes :func:`judge` on validation and raises the validation mean gain. Each
accepted step is therefore a validated step. The same routine builds a per-task set from
one task's validation prompts. The items of a set need not be ACT heads: a search over rules
builds ``first_token`` sets the same way from candidates that are tuples of (layer, head,
gamma) (:mod:`act_plugin.search.first_token`); ``compatible`` then skips a candidate that
would give a head a second gamma.

Validation is also used to pick among the steps, so the validation gain of the final set is
mildly optimistic; the figures a user should rely on are those of an evaluation on the
dev/test split, which the search never reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# mcnemar_p, min_detectable_effect, PLANNING_DISCORDANCE: the search's names for the shared statistics
from act_plugin.stats import MDE_ALPHA, PLANNING_DISCORDANCE, mcnemar_p
from act_plugin.stats import minimum_detectable_effect as min_detectable_effect

__all__ = ["TaskEffect", "Decision", "Selection", "mcnemar_p", "min_detectable_effect", "PLANNING_DISCORDANCE",
           "judge", "select_forward"]

Head = tuple[int, int]
Item = Any  # what a set holds: an ACT head (layer, head), or a first_token candidate (tuple of (layer, head, gamma))
DEFAULT_ALPHA = MDE_ALPHA


def _item(h: Any) -> Any:
    """An ACT head as a pair of ints; any other candidate (a first_token tuple) as given."""
    if len(h) == 2 and all(isinstance(x, (int, np.integer)) for x in h):
        return (int(h[0]), int(h[1]))
    return h


@dataclass(frozen=True)
class TaskEffect:
    task: str
    n: int
    baseline: float  # accuracy (fraction)
    accuracy: float
    better: int  # prompts turned right
    worse: int  # prompts turned wrong
    p: float  # exact McNemar
    harmed: bool  # accuracy drops and p < alpha
    improved: bool = False  # accuracy rises and p < alpha

    @property
    def delta(self) -> float:
        return self.accuracy - self.baseline

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "baseline": self.baseline, "accuracy": self.accuracy, "delta": self.delta,
                "better": self.better, "worse": self.worse, "mcnemar_p": self.p, "significantly_harmed": self.harmed,
                "significantly_improved": self.improved,
                "mde_at_planning_discordance": min_detectable_effect(self.n, PLANNING_DISCORDANCE)}


@dataclass(frozen=True)
class Decision:
    """The validation verdict on one head set."""

    heads: tuple[Item, ...]
    effects: dict[str, TaskEffect]
    alpha: float
    # 'significant': a set must also improve some task at p < alpha (SearchConfig.gain)
    require_significant_gain: bool = False

    @property
    def mean_gain(self) -> float:
        return float(np.mean([e.delta for e in self.effects.values()])) if self.effects else 0.0

    @property
    def harmed(self) -> list[str]:
        return [t for t, e in self.effects.items() if e.harmed]

    @property
    def improved(self) -> list[str]:
        return [t for t, e in self.effects.items() if e.improved]

    @property
    def accepted(self) -> bool:
        return not self.harmed and self.mean_gain > 0 and (bool(self.improved) or not self.require_significant_gain)

    @property
    def reason(self) -> str:
        if self.harmed:
            return "significantly harms " + ", ".join(
                f"{t} ({self.effects[t].delta * 100:+.1f} pt, p={self.effects[t].p:.3g})" for t in self.harmed)
        if self.mean_gain <= 0:
            return f"mean validation gain {self.mean_gain * 100:+.2f} pt is not positive"
        if self.require_significant_gain and not self.improved:
            return (f"mean validation gain {self.mean_gain * 100:+.2f} pt, but no task improves significantly "
                    f"(p < {self.alpha:g}; gain rule 'significant')")
        improved = f", significantly improves {', '.join(self.improved)}" if self.improved else ""
        return f"accepted: mean validation gain {self.mean_gain * 100:+.2f} pt, no task significantly harmed{improved}"

    def to_dict(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "alpha": self.alpha, "mean_gain": self.mean_gain,
                "gain_rule": "significant" if self.require_significant_gain else "positive",
                "accepted": self.accepted, "reason": self.reason,
                "per_task": {t: e.to_dict() for t, e in self.effects.items()}}


def judge(heads: Iterable[Head], baseline: Mapping[str, np.ndarray], trial: Mapping[str, np.ndarray],
          alpha: float = DEFAULT_ALPHA, require_significant_gain: bool = False) -> Decision:
    """Paired per-task verdict of ``trial`` (per task: bool array, prompt correct) vs ``baseline``;
    ``require_significant_gain``: accept only a set that improves some task at p < alpha."""
    effects = {}
    for task, b in baseline.items():
        b = np.asarray(b, dtype=bool)
        t = np.asarray(trial[task], dtype=bool)
        if b.shape != t.shape:
            raise ValueError(f"task {task}: {t.shape} trial results for {b.shape} baseline results (not paired)")
        better, worse = int((t & ~b).sum()), int((b & ~t).sum())
        p = mcnemar_p(better, worse)
        effects[task] = TaskEffect(task, int(b.size), float(b.mean()) if b.size else 0.0,
                                   float(t.mean()) if t.size else 0.0, better, worse, p, worse > better and p < alpha,
                                   better > worse and p < alpha)
    return Decision(tuple(sorted(_item(h) for h in heads)), effects, alpha, require_significant_gain)


@dataclass
class Selection:
    """Result of :func:`select_forward`: the accepted set and every step tried."""

    heads: list[Item]
    decision: Decision | None  # verdict of the accepted set (None: nothing accepted)
    steps: list[dict] = field(default_factory=list)
    evaluations: int = 0
    complete: bool = True

    @property
    def note(self) -> str:
        if not self.heads:
            return "no head set passed the validation rule: nothing is calibrated"
        return self.decision.reason if self.decision else ""

    def to_dict(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "decision": self.decision.to_dict() if self.decision else None,
                "steps": self.steps, "evaluations": self.evaluations, "complete": self.complete, "note": self.note}


def select_forward(order: Iterable[Item], evaluate: Callable[[list[Item]], Mapping[str, np.ndarray]],
                   baseline: Mapping[str, np.ndarray], alpha: float = DEFAULT_ALPHA,
                   max_evals: int | None = None, require_significant_gain: bool = False,
                   compatible: Callable[[list, Any], bool] | None = None) -> Selection:
    """Greedy forward selection validated step by step (see the module docs).

    ``order``: candidate heads, best first (by the search part); ``evaluate(heads)`` returns
    per task a bool array (validation prompt correct) with ``heads`` calibrated; ``baseline``
    the same uncalibrated. ``compatible(current, candidate)``: False skips the candidate
    without an evaluation (recorded as a step)."""
    current: list[Item] = []
    current_decision: Decision | None = None
    sel = Selection(heads=[], decision=None)
    for h in order:
        h = _item(h)
        if compatible is not None and not compatible(current, h):
            sel.steps.append({"add": list(h), "accepted": False, "evaluated": False,
                              "why": "overlaps the current set (a head would get two settings)"})
            continue
        if max_evals is not None and sel.evaluations >= max_evals:
            sel.complete = False
            break
        trial = sorted(current + [h])
        dec = judge(trial, baseline, evaluate(trial), alpha, require_significant_gain)
        sel.evaluations += 1
        best_so_far = current_decision.mean_gain if current_decision else 0.0
        take = dec.accepted and dec.mean_gain > best_so_far
        sel.steps.append({"add": list(h), "heads": [list(x) for x in trial], "mean_gain": dec.mean_gain,
                          "harmed": dec.harmed, "accepted": take,
                          "why": dec.reason if not take and dec.accepted is False else
                          ("accepted" if take else f"no gain over the current set ({best_so_far * 100:+.2f} pt)"),
                          "per_task_delta": {t: e.delta for t, e in dec.effects.items()}})
        if take:
            current, current_decision = trial, dec
    sel.heads, sel.decision = current, current_decision
    return sel
