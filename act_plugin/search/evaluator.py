"""Exact evaluations of head sets.

:class:`Evaluator` gives the exact per-prompt margins of a head set on one part (the search
part, or one task's validation part) and never computes one twice: every result goes
through the partial-results store (:mod:`act_plugin.search.store`), which also serves the
results of an interrupted run. The backends that compute them are opened and closed by
:mod:`act_plugin.search.backends`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from act_plugin.search.scoring import CalibrationSet, per_sample
from act_plugin.search.split import SearchData
from act_plugin.search.store import SearchStore

__all__ = ["SEARCH", "val_part", "Evaluator"]

SEARCH = "search"  # the name of the search part in the store


def val_part(task: str) -> str:
    """The store's name of one task's validation part."""
    return f"val:{task}"


class Evaluator:
    """Exact per-prompt margins of a head set on one part, through the store (never twice)."""

    def __init__(self, store: SearchStore, data: SearchData):
        self.store = store
        self.data = data
        self.backends: dict[str, Any] = {}  # part -> its backend
        self.seconds: dict[str, float] = {}  # phase -> seconds spent computing (not served by the store)

    def calib(self, part: str) -> CalibrationSet:
        return self.data.search if part == SEARCH else self.data.validation[part.removeprefix("val:")]

    def margins(self, part: str, heads, phase: str, first_token: dict | None = None) -> np.ndarray:
        """Per-prompt margins of ``part`` with ``heads`` under ACT and, when given, the heads of
        ``first_token`` ((layer, head) -> gamma) under the first_token rule."""
        be = self.backends[part]
        rec = self.store.get_set(be.name, part, heads, first_token)
        if rec is None:
            t = time.perf_counter()
            lp = be.evaluate(list(heads), first_token=first_token) if first_token else be.evaluate(list(heads))
            sec = time.perf_counter() - t
            _, valid = self.calib(part).choice_matrix()
            _, m = per_sample(lp, self.calib(part).gold, valid)
            cost = be.cost_fraction(list(heads) + list(first_token or {}))
            rec = self.store.add_set(be.name, part, heads, m.tolist(), sec, cost, first_token)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + sec
        return np.asarray(rec["margins"], dtype=np.float64)

    def validation_correct(self, heads, phase: str, tasks: list[str] | None = None,
                           first_token: dict | None = None) -> dict[str, np.ndarray]:
        return {t: self.margins(val_part(t), heads, phase, first_token) > 0
                for t in (tasks or list(self.data.validation))}

    def close(self) -> None:
        seen = set()
        for be in self.backends.values():
            if id(be) not in seen:
                seen.add(id(be))
                be.close()
