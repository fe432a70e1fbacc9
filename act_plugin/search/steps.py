"""The steps of a head search, each returning a dataclass: :func:`prepare` -> :func:`rank`
-> :func:`verify` -> :func:`combine` (the report and the files: :mod:`~act_plugin.search.report`,
:mod:`~act_plugin.search.outputs`; the order: :func:`act_plugin.search.run.run_search`).

* :func:`prepare` -- model shape, candidates, the two parts, the partial-results store;
* :func:`rank` (method ``fast``) -- one first-order pass over the search part ranks every
  candidate (gates on each head's calibrated output, one backward per batch:
  :mod:`act_plugin.search.hf_backend`);
* :func:`verify` -- the top-K candidates (method ``exact``: every candidate; plus every head of
  ``check_layers`` as a brute-force check of the ranking) are calibrated alone and scored
  exactly on the search part; heads whose objective gain is positive are kept; with
  ``validate_singles`` each verified head is also scored on validation;
* :func:`combine` -- greedy forward selection over the kept heads, every step accepted only
  by its paired, per-task effect on the validation part (:mod:`act_plugin.search.select`);
  with ``per_task`` the same per task, giving one profile per task that a set helps.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from act_plugin.config import model_shape
from act_plugin.search.config import SearchConfig
from act_plugin.search.evaluator import SEARCH, Evaluator, val_part
from act_plugin.search.scoring import objective_gain
from act_plugin.search.select import Selection, select_forward
from act_plugin.search.split import SearchData, build_search_data, digest
from act_plugin.search.store import SearchStore, maths_version, model_fingerprint, settings_hash

__all__ = ["Head", "Prepared", "prepare", "Ranking", "rank", "Verification", "verify", "Combination", "combine"]

Head = tuple[int, int]


@dataclass
class Prepared:
    cfg: SearchConfig
    model_path: str
    shape: Any
    candidates: list[Head]
    check_layers: list[int]
    data: SearchData
    exact_backend: str
    store: SearchStore
    settings_key: str
    started: _dt.datetime
    load_start: tuple[float, float, float]


def prepare(cfg: SearchConfig, resume: bool = True) -> Prepared:
    """Model shape, candidates, the search/validation parts and the partial-results store."""
    from transformers import AutoConfig, AutoTokenizer

    from act_plugin.models import ensure_model

    started = _dt.datetime.now(_dt.UTC)
    load_start = os.getloadavg()
    model_path = ensure_model(cfg.model)
    shape = model_shape(AutoConfig.from_pretrained(model_path))
    candidates = cfg.candidate_heads(shape.num_layers, shape.num_heads)
    check_layers = cfg.check_layers(shape.num_layers) if cfg.method == "fast" else []
    tok = AutoTokenizer.from_pretrained(model_path)
    data = build_search_data(cfg.tasks, cfg.samples_per_task, cfg.validation_per_task, cfg.seed, tok, cfg.data_dir)
    exact_backend = "vllm" if cfg.method == "exact" else cfg.fast.verify
    uses_hf = cfg.method == "fast" or exact_backend == "hf"
    settings = {
        "model": model_fingerprint(model_path), "maths": maths_version(), "search": digest(data.search),
        "validation": {t: digest(c) for t, c in data.validation.items()}, "candidates": candidates,
        "beta": cfg.beta, "threshold": cfg.threshold, "exact_backend": exact_backend,
        "ranking_clip": cfg.clip if cfg.score == "clipped_margin" else None,
        "hf": {"batch_tokens": cfg.hf.batch_tokens} if uses_hf else None,
        "engine": cfg.engine if exact_backend == "vllm" else None,
    }
    if "first_token" in cfg.rules:  # its ranking records hold values for this grid only
        settings["first_token"] = {"gammas": cfg.first_token.gammas, "layers": cfg.first_token.layers}
    key = settings_hash(settings)
    store = SearchStore(cfg.state_dir, key, settings, resume=resume)
    return Prepared(cfg, model_path, shape, candidates, check_layers, data, exact_backend, store, key, started,
                    load_start)


@dataclass
class Ranking:
    estimates: dict[Head, float] = field(default_factory=dict)  # first-order gain of each candidate
    matrix: np.ndarray | None = None  # [L, H] (NaN: not a candidate)
    seconds: float | None = None


def rank(prep: Prepared, hf: Any, progress: bool) -> Ranking:
    """First-order estimate of every candidate's gain on the search part (one backward per batch)."""
    from tqdm import tqdm

    cfg = prep.cfg
    t = time.perf_counter()
    with tqdm(total=len(prep.data.search), desc="ranking: first-order pass (1 backward/batch)", unit="prompt",
              disable=not progress, dynamic_ncols=True) as bar:
        grad, _ = hf.gradients(prep.candidates, done=dict(prep.store.grads), on_batch=prep.store.add_grad,
                               progress=bar.update, clip=cfg.clip if cfg.score == "clipped_margin" else None)
    return Ranking({h: float(grad[h]) for h in prep.candidates}, grad, time.perf_counter() - t)


@dataclass
class Verification:
    baseline: np.ndarray  # search-part per-prompt margins, uncalibrated
    singles: dict[Head, np.ndarray]  # search-part margins of each verified head alone
    gains: dict[Head, float]  # objective gain of each verified head (search part)
    task_gains: dict[Head, dict[str, float]]  # per-task objective gain (search part)
    reasons: dict[Head, str]  # why it was verified: top_k, check, top_k+check, exact
    kept: list[Head]  # verified heads with a positive gain, best first
    validation_baseline: dict[str, np.ndarray] = field(default_factory=dict)  # task -> margins
    validation_singles: dict[Head, dict[str, np.ndarray]] = field(default_factory=dict)


def verify(prep: Prepared, ev: Evaluator, ranking: Ranking, progress: bool,
           on_candidate: Callable[[Head, dict], None] | None = None) -> Verification:
    """Exact search-part scores of the top-K (and check-layer) heads; heads that gain are kept."""
    from tqdm import tqdm

    cfg = prep.cfg
    if cfg.method == "exact":
        heads = list(prep.candidates)
        reasons = {h: "exact" for h in heads}
    else:
        heads = sorted(prep.candidates, key=lambda h: (-ranking.estimates[h], h))[: cfg.fast.top_k]
        reasons = {h: "top_k" for h in heads}
        for h in prep.candidates:
            if h[0] in prep.check_layers:
                if h in reasons:
                    reasons[h] = "top_k+check"
                else:
                    heads.append(h)
                    reasons[h] = "check"
    tasks = prep.data.search.tasks
    _score_side_by_side(prep, ev, heads, reasons, progress)
    base = ev.margins(SEARCH, [], "baseline")
    val_base = {t: ev.margins(val_part(t), [], "baseline") for t in prep.data.validation}
    singles, gains, task_gains, val_singles = {}, {}, {}, {}
    with tqdm(total=len(heads), desc=f"exact scores ({prep.exact_backend})", unit="head", disable=not progress,
              dynamic_ncols=True) as bar:
        for h in heads:
            m = ev.margins(SEARCH, [h], "verify" if reasons[h] != "check" else "check")
            singles[h] = m
            gains[h], task_gains[h] = objective_gain(cfg.score, m, base, tasks, cfg.clip)
            if cfg.validate_singles and prep.data.validation:
                val_singles[h] = {t: ev.margins(val_part(t), [h], "validate_singles") for t in prep.data.validation}
            bar.set_postfix_str(f"L{h[0]}H{h[1]} {cfg.score} {gains[h]:+.4f}")
            bar.update(1)
            if on_candidate:
                on_candidate(h, {"gain": gains[h], "per_task": task_gains[h]})
    kept = sorted((h for h in heads if gains[h] > 0), key=lambda h: (-gains[h], h))
    return Verification(base, singles, gains, task_gains, reasons, kept, val_base, val_singles)


def _score_side_by_side(prep: Prepared, ev: Evaluator, heads: list[Head], reasons: dict[Head, str],
                        progress: bool) -> None:
    """With data-parallel replicas: every evaluation :func:`verify` makes, computed side by
    side first (the loop below then reads them from the store); one backend: nothing."""
    from tqdm import tqdm

    parts = list(prep.data.validation)
    jobs: list[tuple[str, list, str]] = [(SEARCH, [], "baseline")] + [(val_part(t), [], "baseline") for t in parts]
    for h in heads:
        jobs.append((SEARCH, [h], "verify" if reasons[h] != "check" else "check"))
        if prep.cfg.validate_singles:
            jobs += [(val_part(t), [h], "validate_singles") for t in parts]
    with tqdm(total=len(jobs), desc=f"exact scores ({prep.exact_backend}, {prep.cfg.data_parallel} replicas)",
              unit="evaluation", disable=not progress or prep.cfg.data_parallel == 1, dynamic_ncols=True) as bar:
        ev.prefetch(jobs, bar.update)


@dataclass
class Combination:
    shared: Selection
    per_task: dict[str, Selection]  # task -> its own set (empty Selection: no profile)
    validated: bool  # False: no validation part, the search part decided (see note)
    note: str = ""


def _search_part_selection(ver: Verification, cfg: SearchConfig) -> Selection:
    """Without a validation part: the paper's rule on the search part (every kept head)."""
    heads = sorted(ver.kept[: cfg.combine_max_heads] if cfg.combine else ver.kept[:1])
    return Selection(heads=heads, decision=None, steps=[], evaluations=0)


def combine(prep: Prepared, ev: Evaluator, ver: Verification) -> Combination:
    """Shared (and per-task) head sets, each step accepted on the validation part."""
    cfg = prep.cfg
    if not prep.data.validation:
        return Combination(_search_part_selection(ver, cfg), {}, False,
                           "validation_per_task is 0: the set was chosen on the search part alone, UNVALIDATED")
    pool = ver.kept[: cfg.combine_max_heads] if cfg.combine else ver.kept
    max_evals = cfg.combine_max_evals if cfg.combine else None
    base_ok = {t: m > 0 for t, m in ver.validation_baseline.items()}
    significant = cfg.gain == "significant"

    def shared_eval(heads: list[Head]) -> dict[str, np.ndarray]:
        return ev.validation_correct(heads, "combine")

    if cfg.combine:
        shared = select_forward(pool, shared_eval, base_ok, cfg.alpha, max_evals, significant)
    else:  # the best single head that passes validation
        shared = Selection(heads=[], decision=None)
        for h in pool:
            one = select_forward([h], shared_eval, base_ok, cfg.alpha, None, significant)
            shared.steps += one.steps
            shared.evaluations += one.evaluations
            if one.heads:
                assert one.decision is not None  # select_forward sets heads and decision together
                if shared.decision is None or one.decision.mean_gain > shared.decision.mean_gain:
                    shared.heads, shared.decision = one.heads, one.decision
    per_task: dict[str, Selection] = {}
    if cfg.per_task:
        gain_key = "margin" if cfg.score == "worst_task" else cfg.score
        for task in prep.data.validation:
            task_gain = {h: (objective_gain(gain_key, ver.singles[h], ver.baseline, prep.data.search.tasks,
                                            cfg.clip)[1][task]) for h in ver.singles}
            order = sorted((h for h, g in task_gain.items() if g > 0), key=lambda h: (-task_gain[h], h))
            order = order[: cfg.combine_max_heads]

            def task_eval(heads: list[Head], t: str = task) -> dict[str, np.ndarray]:
                return ev.validation_correct(heads, "per_task", [t])

            per_task[task] = select_forward(order, task_eval, {task: base_ok[task]}, cfg.alpha, cfg.combine_max_evals,
                                            significant)
    return Combination(shared, per_task, True)

