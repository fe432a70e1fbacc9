"""The typed results of an eval run (:class:`act_plugin.eval.results.EvalResults`) from its
finished pieces: per task the paired comparisons of every arm with the baseline (bootstrap CI,
McNemar's exact test, the minimum detectable effect at the observed discordance), per arm the
summary over tasks and the engine read-back, the same statistics for each pair of calibrated
arms the config's ``comparisons`` name, and the warnings the report repeats.

Everything here is recomputed from the per-sample files and ``run_state.json``, so changing a
statistics setting never needs a model.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from act_plugin.config import ACTConfig, ACTConfigError
from act_plugin.eval import report as _report
from act_plugin.eval.config import BASELINE, EvalConfig, PerTaskArm
from act_plugin.eval.records import correctness_matrix, primary_metric
from act_plugin.eval.results import (
    ArmResult,
    ArmSummary,
    ArmTaskResult,
    ComparisonResult,
    EngineArm,
    EvalResults,
    ModelInfo,
    PairComparison,
    PairedStats,
    PairSummary,
    PairTaskResult,
    Scoring,
    Settings,
    TaskResult,
    Versions,
)
from act_plugin.eval.run_state import RunState
from act_plugin.stats import MDE_ALPHA, MDE_POWER, compare, macro_bootstrap_ci, resolution

__all__ = ["assemble", "SCORING_NOTE_NEXT", "SCORING_NOTE_FULL"]

SCORING_NOTE_NEXT = (
    "next-token: single-token answers (label words, letters) are scored from one prefill of the prompt alone, "
    "as in the paper; multi-token answers (*_ll tasks, lm-eval's own tasks) by lm-eval's usual full-text "
    "log-likelihood, where the answer's rows are calibrated together with the prompt's in one call"
)
SCORING_NOTE_FULL = (
    "full-text: every answer scored by lm-eval's usual log-likelihood of prompt + answer in one call "
    "(under ACT the answer's rows take part in finding the sinks of that call)"
)


def _f(x: float | None) -> float | None:
    """A float for JSON: NaN and inf as None."""
    return None if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))) else float(x)


@dataclass
class _Pieces:
    """The run's finished pieces as the results use them."""

    ran: dict[tuple[str, str], dict]  # (arm, task) -> the piece that arm ran itself
    used: dict[tuple[str, str], dict]  # (arm, task) -> the piece whose records stand for it
    records: dict[tuple[str, str], list[dict]]  # (arm, task) -> its per-document records


def _load_pieces(cfg: EvalConfig, state: RunState, tasks: list[str]) -> _Pieces:
    ran = {(p["arm"], p["task"]): p for p in state.pieces.values()}
    # A per-task arm's task without a profile was not run: the baseline's piece stands for it
    used = {(a, t): ran[(a, t) if cfg.runs(a, t) else (BASELINE, t)] for a in cfg.arms for t in tasks}
    files = {p["samples"]: _report.read_samples(state.out / p["samples"]) for p in used.values()}
    return _Pieces(ran, used, {key: files[p["samples"]] for key, p in used.items()})


def _paired_matrices(cfg: EvalConfig, pieces: _Pieces, task: str, seeds: list[int]) -> dict[str, np.ndarray]:
    """Each arm's correctness ``[documents, seeds]`` on ``task``, on the same documents."""
    mats: dict[str, np.ndarray] = {}
    docs_ref = None
    for arm in cfg.arms:
        docs, m = correctness_matrix(pieces.records[(arm, task)], seeds)
        if docs_ref is None:
            docs_ref = docs
        elif docs != docs_ref:
            raise RuntimeError(f"arms saw different documents on {task}: cannot pair them")
        mats[arm] = m
    return mats


def _paired_stats(cfg: EvalConfig, label: str, reference: np.ndarray, treatment: np.ndarray,
                  warnings: list[str]) -> dict[str, Any]:
    """``treatment`` against ``reference`` on one task (``label`` names them in the warning an
    unresolved delta adds): :class:`act_plugin.eval.results.PairedStats`' fields."""
    c = compare(reference, treatment, cfg.bootstrap_resamples, cfg.confidence, cfg.stats_seed)
    discordant = c.docs_better + c.docs_worse
    res = resolution(c.n, discordant, c.delta, MDE_ALPHA, MDE_POWER)
    if res.note is not None:
        warnings.append(f"{label}: {res.note}: not resolved at this n (use more documents, e.g. limit: all)")
    fields = {k: (_f(v) if isinstance(v, float) else v) for k, v in c.to_dict().items()}
    return {**fields, "discordant_rate": discordant / c.n if c.n else 0.0, "mde": res.mde, "resolved": res.resolved}


def _task_result(cfg: EvalConfig, pieces: _Pieces, task: str, lm_task: str, seeds: list[int],
                 mats: dict[str, np.ndarray], warnings: list[str]) -> TaskResult:
    arms = list(cfg.arms)
    comparisons = {
        arm: ComparisonResult(**_paired_stats(cfg, f"{task}, {arm}", mats[BASELINE], mats[arm], warnings),
                              calibrated=cfg.runs(arm, task))
        for arm in arms if arm != BASELINE
    }
    return TaskResult(
        lm_eval_task=lm_task, metric=primary_metric(task), n=int(mats[BASELINE].shape[0]),
        num_fewshot=cfg.num_fewshot, seeds=seeds,
        accuracy={a: _f(mats[a].mean()) for a in arms},
        accuracy_per_seed={a: {str(s): _f(mats[a][:, j].mean()) for j, s in enumerate(seeds)} for a in arms},
        lm_eval={a: pieces.used[(a, task)]["lm_eval"] for a in arms},
        samples={a: pieces.used[(a, task)]["samples"] for a in arms},
        comparisons=comparisons,
    )


def _mean_over_tasks(cfg: EvalConfig, mats: dict[str, dict[str, np.ndarray]], reference: str, treatment: str,
                     comps: dict[str, PairedStats], label: str) -> dict[str, Any]:
    """``treatment``'s mean delta over tasks against ``reference`` with a task-stratified
    bootstrap CI, and its flips: :class:`act_plugin.eval.results.MeanOverTasks`' fields."""
    tasks = list(comps)
    pairs = [(mats[t][reference], mats[t][treatment]) for t in tasks]
    lo, hi = macro_bootstrap_ci(pairs, cfg.bootstrap_resamples, cfg.confidence, cfg.stats_seed)
    # A delta is None only for a task with no scored documents (NaN written as null)
    empty = [t for t, c in comps.items() if c.delta is None]
    if empty:
        raise ACTConfigError(f"eval: no documents were scored for task(s) {', '.join(empty)} ({label}); "
                             f"check the task's split in the data folder and the config's limit")
    deltas = cast(list[float], [c.delta for c in comps.values()])
    return dict(
        mean_delta=_f(float(np.mean(deltas))), ci_low=_f(lo), ci_high=_f(hi),
        tasks_up=sum(d > 0 for d in deltas), tasks_down=sum(d < 0 for d in deltas),
        improved=sum(c.improved for c in comps.values()), worsened=sum(c.worsened for c in comps.values()),
    )


def _arm_summary(cfg: EvalConfig, mats: dict[str, dict[str, np.ndarray]], arm: str,
                 tasks_out: dict[str, TaskResult]) -> ArmSummary:
    """An arm's mean delta over tasks against the baseline."""
    comps: dict[str, PairedStats] = {t: r.comparisons[arm] for t, r in tasks_out.items()}
    return ArmSummary(**_mean_over_tasks(cfg, mats, BASELINE, arm, comps, f"arm {arm!r}"),
                      uncalibrated_tasks=cfg.uncalibrated_tasks(arm))


def _pair_comparison(cfg: EvalConfig, mats: dict[str, dict[str, np.ndarray]], treatment: str, reference: str,
                     warnings: list[str]) -> PairComparison:
    """A ``comparisons`` pair: per task the treatment arm against the reference arm on the same
    documents (an arm without a profile for a task stands there as the baseline's records),
    and the mean over tasks -- the statistics of the comparisons with the baseline."""
    label = f"{treatment} vs {reference}"
    tasks = {
        t: PairTaskResult(**_paired_stats(cfg, f"{t}, {label}", m[reference], m[treatment], warnings),
                          treatment_calibrated=cfg.runs(treatment, t), reference_calibrated=cfg.runs(reference, t))
        for t, m in mats.items()
    }
    summary = PairSummary(**_mean_over_tasks(cfg, mats, reference, treatment, dict(tasks), label),
                          treatment_uncalibrated_tasks=cfg.uncalibrated_tasks(treatment),
                          reference_uncalibrated_tasks=cfg.uncalibrated_tasks(reference))
    return PairComparison(treatment=treatment, reference=reference, tasks=tasks, summary=summary)


def _arm_result(cfg: EvalConfig, pieces: _Pieces, arm: str, tasks: list[str], warnings: list[str]) -> ArmResult:
    """An arm's calibration, engine read-back, time and preemptions; its warnings."""
    act = cfg.arms[arm]
    mine = [pieces.ran[(arm, t)] for t in tasks if cfg.runs(arm, t)]  # the pieces this arm ran itself
    pre = [p["preemptions"] for p in mine]
    # an arm that ran no task (a per-task control without profiles) shows the baseline's engine,
    # whose records stand for it
    engine: dict[str, Any] = dict((mine or [pieces.used[(arm, t)] for t in tasks])[0]["engine"])
    engine["preemptions"] = sum(pre) if all(isinstance(x, int) for x in pre) else None
    per_task = isinstance(act, PerTaskArm)
    warnings += _arm_warnings(cfg, arm, engine["preemptions"])
    return ArmResult(
        baseline=arm == BASELINE, control=arm in cfg.controls, calibrates=cfg.calibrates(arm),
        act=act.to_dict() if isinstance(act, ACTConfig) else None,
        act_hash=(act.hash_for(tasks) if isinstance(act, PerTaskArm) else act.hash) if act is not None else None,
        engine=EngineArm(**engine), wall_time_s=sum(p["wall_time_s"] for p in mine),
        preemptions=engine["preemptions"], documents=sum(len(pieces.records[(arm, t)]) for t in tasks),
        per_task=per_task, tasks=_arm_tasks(cfg, arm, pieces.ran, tasks) if per_task else None,
    )


def _arm_warnings(cfg: EvalConfig, arm: str, preemptions: int | None) -> list[str]:
    out = []
    missing = cfg.uncalibrated_tasks(arm)
    if missing:
        out.append(f"arm '{arm}' has no profile for task(s) {', '.join(missing)}: UNCALIBRATED there "
                   f"(not run; the baseline's records, delta 0, counted in its mean)")
    if arm in cfg.controls and not cfg.calibrates(arm):
        out.append(f"arm '{arm}' is a control that calibrates nothing (beta 1 or no heads): "
                   f"it should match the baseline")
    if preemptions:
        out.append(f"arm '{arm}': {preemptions} calibrated requests were preempted and "
                   f"recomputed (their sink statistics differ from a single pass)")
    return out


def _arm_tasks(cfg: EvalConfig, arm: str, ran: dict[tuple[str, str], dict], tasks: list[str]
               ) -> dict[str, ArmTaskResult]:
    """A per-task arm's profile per task, whether it was calibrated and its engine read-back."""
    out = {}
    for t in tasks:
        act = cfg.act_for(arm, t)
        piece = ran.get((arm, t)) if cfg.runs(arm, t) else None
        out[t] = ArmTaskResult(
            calibrated=cfg.runs(arm, t), profile=cfg.profile_name(arm, t),
            act=act.to_dict() if act is not None else None, act_hash=act.hash if act is not None else None,
            # this task's own preemptions, not the engine's running count at read-back
            engine=EngineArm(**{**piece["engine"], "preemptions": piece["preemptions"]}) if piece is not None else None,
        )
    return out


def assemble(cfg: EvalConfig, state: RunState, model_path: str, data_dir: Path, data_how: str,
             lm_tasks: dict[str, str], seeds: list[int], versions: dict[str, str]) -> EvalResults:
    """The typed results of a run from its finished pieces (per-sample files + run state)."""
    pieces = _load_pieces(cfg, state, list(lm_tasks))
    warnings: list[str] = []
    mats = {task: _paired_matrices(cfg, pieces, task, seeds) for task in lm_tasks}
    tasks_out = {task: _task_result(cfg, pieces, task, lm_task, seeds, mats[task], warnings)
                 for task, lm_task in lm_tasks.items()}
    summary = {arm: _arm_summary(cfg, mats, arm, tasks_out) for arm in cfg.arms if arm != BASELINE}
    pairs = [_pair_comparison(cfg, mats, treatment, reference, warnings) for treatment, reference in cfg.comparisons]
    arms_out = {arm: _arm_result(cfg, pieces, arm, list(lm_tasks), warnings) for arm in cfg.arms}
    return EvalResults(
        name=cfg.name, description=cfg.description,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        versions=Versions(**versions), model=ModelInfo(name=cfg.model, path=model_path),
        engine=dict(cfg.engine), share_engine=cfg.share_engine, engine_start_s=list(state.engine_start_s),
        scoring=Scoring(next_token=cfg.next_token, note=SCORING_NOTE_NEXT if cfg.next_token else SCORING_NOTE_FULL),
        settings=Settings(num_fewshot=cfg.num_fewshot, limit=cfg.limit, seeds=seeds, data_dir=str(data_dir),
                          data_dir_source=data_how, bootstrap_resamples=cfg.bootstrap_resamples,
                          confidence=cfg.confidence, stats_seed=cfg.stats_seed, mde_alpha=MDE_ALPHA,
                          mde_power=MDE_POWER),
        arms=arms_out, tasks=tasks_out, summary=summary, comparisons=pairs, warnings=warnings,
    )
