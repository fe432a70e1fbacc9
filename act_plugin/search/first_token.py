"""``first_token`` sets (ZeroTuning, arXiv 2505.11739) proposed by a search over rules.

With ``rules: [act, first_token]`` the search, on the same parts:

1. **ranks** (:func:`rank_first_token`, right after ACT's ranking pass and in the same
   process, whose transformers model a data-parallel search releases before its replicas
   start) every (layer, head, gamma) of the grid (``first_token.gammas`` x the candidate
   heads of ``first_token.layers``) by its first-order effect on the search-part objective:
   one backward per batch, a gate per (head, gamma) at 0
   (:func:`~act_plugin.search.hf_first_token.first_token_gradients`), as ACT's fast method;

then, after ACT's steps (:func:`search_first_token`):

2. **scores exactly** on the search part the ``top_k`` best singles, plus with ``uniform``
   one candidate per gamma that scales every candidate head (the paper's main form: one
   gamma over a block of layers, all heads); candidates that gain are kept, best first;
3. **selects** with ACT's own validated greedy forward selection and paired McNemar
   acceptance (:func:`act_plugin.search.select.select_forward`): a shared set, and with
   ``per_task`` one set per task; a candidate that would give a head a second gamma is skipped.

A candidate (a *unit*) is a sorted tuple of ``(layer, head, gamma)``; a set is a list of
units whose heads do not overlap. How ACT's and first_token's sets are compared and which one
a task's profile gets: :mod:`act_plugin.search.rules_compare`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from act_plugin.config import ACTConfig
from act_plugin.search.config import SearchConfigError
from act_plugin.search.evaluator import SEARCH, Evaluator
from act_plugin.search.hf_first_token import FTItem, first_token_gradients
from act_plugin.search.scoring import objective_gain
from act_plugin.search.select import Selection, select_forward
from act_plugin.search.steps import Prepared, Verification

__all__ = ["Unit", "FirstTokenRanking", "FirstTokenSearch", "rank_first_token", "search_first_token", "unit_scales",
           "unit_label", "first_token_config"]

Head = tuple[int, int]
Unit = tuple[FTItem, ...]


def unit_scales(units: Iterable[Iterable[FTItem]]) -> dict[Head, float]:
    """``{(layer, head): gamma}`` of a set of units (their heads never overlap)."""
    return {(int(a), int(b)): float(g) for u in units for a, b, g in u}


def _disjoint(current: list[Unit], unit: Unit) -> bool:
    taken = set(unit_scales(current))
    return not any((a, b) in taken for a, b, _ in unit)


def unit_label(unit: Iterable[Iterable]) -> str:
    items = [tuple(x) for x in unit]
    if len(items) == 1:
        a, b, g = items[0]
        return f"L{int(a)}H{int(b)} x{float(g):g}"
    layers = sorted({int(x[0]) for x in items})
    gammas = sorted({float(x[2]) for x in items})
    return f"{len(items)} heads of layers {layers[0]}-{layers[-1]} x{'/'.join(f'{g:g}' for g in gammas)}"


@dataclass
class FirstTokenRanking:
    heads: list[Head]  # candidate heads of the rule
    estimates: dict[FTItem, float]  # first-order gain of each (layer, head, gamma)
    seconds: float


@dataclass
class FirstTokenSearch:
    heads: list[Head]  # candidate heads of the rule
    estimates: dict[FTItem, float]  # first-order gain of each (layer, head, gamma)
    ranking_seconds: float
    units: list[Unit]  # exactly scored candidates
    reasons: dict[Unit, str]  # top_k or uniform
    singles: dict[Unit, np.ndarray]  # search-part margins of each unit alone
    gains: dict[Unit, float]
    task_gains: dict[Unit, dict[str, float]]
    kept: list[Unit]  # units with a positive gain, best first
    shared: Selection = field(default_factory=lambda: Selection([], None))
    per_task: dict[str, Selection] = field(default_factory=dict)


def _candidate_heads(prep: Prepared) -> list[Head]:
    layers = prep.cfg.first_token.layer_filter(prep.shape.num_layers)
    heads = [h for h in prep.candidates if layers is None or h[0] in layers]
    if not heads:
        raise SearchConfigError(f"first_token.layers {layers}: none of the search's candidate heads lies there")
    return heads


def _rank(prep: Prepared, hf: Any, heads: list[Head], progress: bool) -> tuple[dict[FTItem, float], float]:
    from tqdm import tqdm

    cfg = prep.cfg
    t = time.perf_counter()
    with tqdm(total=len(prep.data.search), desc="first_token ranking (1 backward/batch)", unit="prompt",
              disable=not progress, dynamic_ncols=True) as bar:
        est = first_token_gradients(hf, heads, cfg.first_token.gammas,
                                    clip=cfg.clip if cfg.score == "clipped_margin" else None,
                                    done=dict(prep.store.ft_grads), on_batch=prep.store.add_ft_grad,
                                    progress=bar.update)
    return est, time.perf_counter() - t


def _units(prep: Prepared, heads: list[Head], est: dict[FTItem, float]) -> tuple[list[Unit], dict[Unit, str]]:
    opt = prep.cfg.first_token
    units: list[Unit] = [(x,) for x in sorted(est, key=lambda x: (-est[x], x))[: opt.top_k]]
    reasons = {u: "top_k" for u in units}
    if opt.uniform:
        for g in opt.gammas:
            u = tuple((a, b, float(g)) for a, b in heads)
            if u not in reasons:
                units.append(u)
                reasons[u] = "uniform"
    return units, reasons


def rank_first_token(prep: Prepared, hf: Any, progress: bool) -> FirstTokenRanking:
    """The first-order estimate of every (layer, head, gamma) of the grid (step 1 of the module docs)."""
    heads = _candidate_heads(prep)
    est, seconds = _rank(prep, hf, heads, progress)
    return FirstTokenRanking(heads, est, seconds)


def search_first_token(prep: Prepared, ev: Evaluator, ranked: FirstTokenRanking, ver: Verification,
                       progress: bool) -> FirstTokenSearch:
    """Score and select first_token sets from ``ranked`` (see the module docs)."""
    from tqdm import tqdm

    cfg = prep.cfg
    units, reasons = _units(prep, ranked.heads, ranked.estimates)
    for be in ev.backends.values():  # one baseline pass caches every restart layer still missing
        be.plan_cache({min(x[0] for x in u) for u in units})
    _score_side_by_side(prep, ev, units, progress)
    tasks = prep.data.search.tasks
    singles, gains, task_gains = {}, {}, {}
    with tqdm(total=len(units), desc="first_token exact scores", unit="set", disable=not progress,
              dynamic_ncols=True) as bar:
        for u in units:
            singles[u] = ev.margins(SEARCH, [], "first_token_verify", unit_scales([u]))
            gains[u], task_gains[u] = objective_gain(cfg.score, singles[u], ver.baseline, tasks, cfg.clip)
            bar.update(1)
    kept = sorted((u for u in units if gains[u] > 0), key=lambda u: (-gains[u], u))
    res = FirstTokenSearch(ranked.heads, ranked.estimates, ranked.seconds, units, reasons, singles, gains,
                           task_gains, kept)
    _select(prep, ev, ver, res)
    return res


def _score_side_by_side(prep: Prepared, ev: Evaluator, units: list[Unit], progress: bool) -> None:
    """With data-parallel replicas: every unit's exact score, computed side by side first (the
    loop of :func:`search_first_token` then reads them from the store); one backend: nothing."""
    from tqdm import tqdm

    jobs: list[tuple] = [(SEARCH, [], "first_token_verify", unit_scales([u])) for u in units]
    with tqdm(total=len(jobs), desc=f"first_token exact scores ({prep.cfg.data_parallel} replicas)",
              unit="evaluation", disable=not progress or prep.cfg.data_parallel == 1, dynamic_ncols=True) as bar:
        ev.prefetch(jobs, bar.update)


def _select(prep: Prepared, ev: Evaluator, ver: Verification, res: FirstTokenSearch) -> None:
    """ACT's validated forward selection over the kept units: shared, and per task."""
    cfg = prep.cfg
    base_ok = {t: m > 0 for t, m in ver.validation_baseline.items()}
    significant = cfg.gain == "significant"
    limit = cfg.first_token.combine_max

    def shared_eval(units: list[Unit]) -> dict[str, np.ndarray]:
        return ev.validation_correct([], "first_token_combine", None, unit_scales(units))

    res.shared = select_forward(res.kept[:limit], shared_eval, base_ok, cfg.alpha, cfg.combine_max_evals,
                                significant, compatible=_disjoint)
    if not cfg.per_task:
        return
    gain_key = "margin" if cfg.score == "worst_task" else cfg.score
    for task in prep.data.validation:
        task_gain = {u: objective_gain(gain_key, m, ver.baseline, prep.data.search.tasks, cfg.clip)[1][task]
                     for u, m in res.singles.items()}
        order = sorted((u for u, g in task_gain.items() if g > 0), key=lambda u: (-task_gain[u], u))[:limit]

        def task_eval(units: list[Unit], t: str = task) -> dict[str, np.ndarray]:
            return ev.validation_correct([], "first_token_per_task", [t], unit_scales(units))

        res.per_task[task] = select_forward(order, task_eval, {task: base_ok[task]}, cfg.alpha,
                                            cfg.combine_max_evals, significant, compatible=_disjoint)


def _compact_scale(scales: dict[Head, float], num_heads: int) -> dict[str, float]:
    """``{"L:H,H": gamma}`` per layer and gamma; a layer whose every head has one gamma is
    written ``"L:all"`` (the uniform candidate)."""
    by_layer: dict[int, dict[float, list[int]]] = {}
    for (layer, head), g in sorted(scales.items()):
        by_layer.setdefault(layer, {}).setdefault(g, []).append(head)
    out: dict[str, float] = {}
    for layer, groups in by_layer.items():
        for g, heads in groups.items():
            out[f"{layer}:{'all' if len(heads) == num_heads else ','.join(map(str, heads))}"] = g
    return out


def first_token_config(prep: Prepared, units: list[Unit], name: str, what: str) -> ACTConfig:
    """The ``rule: first_token`` profile of an accepted set (gamma per head), provenance in ``source``."""
    cfg = prep.cfg
    source = (f"act-plugin search {prep.started:%Y-%m-%d}: {what}; rule first_token (gammas "
              f"{','.join(f'{g:g}' for g in cfg.first_token.gammas)}, first-order ranking, top {cfg.first_token.top_k}"
              + (" + uniform" if cfg.first_token.uniform else "") + f" scored exactly), objective {cfg.score}, "
              f"model {cfg.model}, tasks {','.join(cfg.tasks)} (train splits: <= {cfg.samples_per_task} search + "
              f"{cfg.validation_per_task} validation prompts per task, seed {cfg.seed}), accepted on validation "
              f"(paired per task, alpha {cfg.alpha}) and better there than the ACT set")
    scale = _compact_scale(unit_scales(units), prep.shape.num_heads)
    prof = ACTConfig.from_any({"rule": "first_token", "scale": scale, "name": name, "source": source,
                               "model": cfg.model})
    prof.validate_for(prep.shape)
    return prof
