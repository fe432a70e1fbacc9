"""Exact evaluations of head sets.

:class:`Evaluator` gives the exact per-prompt margins of a head set on one part (the search
part, or one task's validation part) and never computes one twice: every result goes
through the partial-results store (:mod:`act_plugin.search.store`), which also serves the
results of an interrupted run. The backends that compute them are opened and closed by
:mod:`act_plugin.search.backends`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from act_plugin.search.scoring import CalibrationSet, per_sample
from act_plugin.search.split import SearchData
from act_plugin.search.store import SearchStore, first_token_rows, head_rows

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
            cost = be.cost_fraction(list(heads) + list(first_token or {}))
            rec = self._record(part, heads, lp, time.perf_counter() - t, cost, phase, first_token)
        return np.asarray(rec["margins"], dtype=np.float64)

    def _record(self, part: str, heads, lp: np.ndarray, sec: float, cost: float, phase: str,
                first_token: dict | None = None) -> dict:
        """Store the margins of answer log-probabilities ``lp`` (one definition for every backend)."""
        _, valid = self.calib(part).choice_matrix()
        _, m = per_sample(lp, self.calib(part).gold, valid)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + sec
        return self.store.add_set(self.backends[part].name, part, heads, m.tolist(), sec, cost, first_token)

    def prefetch(self, jobs: list[tuple], progress: Callable[[int], None] | None = None) -> None:
        """Compute the ``(part, heads, phase)`` or ``(part, heads, phase, first_token)``
        evaluations the store lacks side by side, when the backends are data-parallel replicas
        (:mod:`act_plugin.search.replicas`); each result is stored as it arrives, so an
        interrupted run keeps it, and :meth:`margins` then reads it from the store. One
        backend: nothing here, the evaluations run one by one as :meth:`margins` asks for them."""
        pool = getattr(next(iter(self.backends.values()), None), "pool", None)
        if pool is None:
            return
        todo, seen = [], set()
        for part, heads, phase, *rest in jobs:
            first_token = dict(rest[0]) if rest and rest[0] else None
            heads = head_rows(heads)
            key = (part, tuple(map(tuple, heads)), tuple(map(tuple, first_token_rows(first_token))))
            if key not in seen and self.store.get_set(self.backends[part].name, part, heads, first_token) is None:
                seen.add(key)
                todo.append((part, heads, phase, first_token))
        t = time.perf_counter()
        for i, lp, sec, cost in pool.evaluate_many([(part, heads, ft) for part, heads, _, ft in todo]):
            part, heads, phase, first_token = todo[i]
            self._record(part, heads, lp, sec, cost, phase, first_token)
            if progress:
                progress(1)
        if todo:
            self.seconds["replicas_wall"] = self.seconds.get("replicas_wall", 0.0) + time.perf_counter() - t

    def validation_correct(self, heads, phase: str, tasks: list[str] | None = None,
                           first_token: dict | None = None) -> dict[str, np.ndarray]:
        """Per task, which validation prompts ``heads`` (and ``first_token``) answer correctly;
        with replicas the tasks' evaluations are made side by side."""
        tasks = tasks or list(self.data.validation)
        self.prefetch([(val_part(t), heads, phase, first_token) for t in tasks])
        return {t: self.margins(val_part(t), heads, phase, first_token) > 0 for t in tasks}

    def close(self) -> None:
        seen = set()
        for be in self.backends.values():
            if id(be) not in seen:
                seen.add(id(be))
                be.close()
