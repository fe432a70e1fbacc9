"""The search report (the JSON ``act-plugin search`` writes, summarised by
:mod:`~act_plugin.search.summary`): :func:`build_report` assembles it from the steps'
results, one helper per section."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np

from act_plugin.heads import group_by_layer
from act_plugin.search.analysis import objective_comparison, objective_comparison_per_task, ranking_agreement
from act_plugin.search.evaluator import SEARCH, Evaluator
from act_plugin.search.scoring import objective_gain, scores_from_margins
from act_plugin.search.select import min_detectable_effect
from act_plugin.search.steps import Combination, Head, Prepared, Ranking, Verification

__all__ = ["build_report", "heads_map"]


def heads_map(heads) -> dict[int, list[int]]:
    """``{layer: [heads]}`` of (layer, head) pairs."""
    return group_by_layer((lyr, int(h)) for lyr, h in sorted(heads))


def build_report(prep: Prepared, ranking: Ranking, ver: Verification, comb: Combination,
                 ev: Evaluator, total_s: float, threads_used: dict) -> dict[str, Any]:
    cfg = prep.cfg
    tasks = prep.data.search.tasks
    base_scores = scores_from_margins(ver.baseline, tasks)
    shared = comb.shared.heads
    sel_search = ev.margins(SEARCH, shared, "combine") if shared else ver.baseline
    sel_gain = objective_gain(cfg.score, sel_search, ver.baseline, tasks, cfg.clip)[0]
    delta_margin = {h: scores_from_margins(m, tasks).margin - base_scores.margin for h, m in ver.singles.items()}
    counts = prep.data.counts
    val_n = {t: int(len(m)) for t, m in ver.validation_baseline.items()}
    return {
        "name": cfg.config_name, "date": prep.started.isoformat(timespec="seconds"), "model": cfg.model,
        "model_path": prep.model_path,
        "shape": {"layers": prep.shape.num_layers, "heads": prep.shape.num_heads, "kv_heads": prep.shape.num_kv_heads},
        "method": cfg.method, "score": cfg.score, "clip": cfg.clip, "beta": cfg.beta, "threshold": cfg.threshold,
        "exact_backend": prep.exact_backend, "top_k": cfg.fast.top_k if cfg.method == "fast" else None,
        "tasks": {t: c.get("search", 0) for t, c in counts.items()},
        "validation_tasks": {t: c.get("validation", 0) for t, c in counts.items()},
        "prompts": len(prep.data.search), "prompt_tokens": int(sum(len(p) for p in prep.data.search.prompts)),
        "validation_prompts": int(sum(val_n.values())), "seed": cfg.seed, "settings_hash": prep.settings_key,
        "state_file": str(prep.store.path), "split": prep.data.record(),
        "baseline": base_scores.to_dict(),
        "kept": [list(h) for h in ver.kept],
        "selected": {"heads": {str(k): v for k, v in heads_map(shared).items()}, "count": len(shared),
                     "scores": scores_from_margins(sel_search, tasks).to_dict(), "delta_score": sel_gain,
                     "note": comb.note or comb.shared.note},
        "validation": _validation_section(prep, ver, comb, val_n) if comb.validated else None,
        "objective_comparison": objective_comparison(prep, ver) if comb.validated else None,
        "objective_comparison_per_task": objective_comparison_per_task(prep, ver) if comb.validated else None,
        **_ranking_checks(prep, ranking, ver, delta_margin),
        "candidates": _candidate_rows(prep, ranking, ver, delta_margin),
        "timing": _timing(prep, ranking, ev, total_s, threads_used), "config": cfg.to_dict(),
    }


def _ranking_checks(prep: Prepared, ranking: Ranking, ver: Verification,
                    delta_margin: dict[Head, float]) -> dict[str, Any]:
    """The first-order estimate against the exact scores: over the check layers' heads
    (``ranking_check``) and over every exactly scored head (``ranking_vs_verified``)."""
    check_est = {h: ranking.estimates[h] for h in ver.singles if "check" in ver.reasons[h] and h in ranking.estimates}
    check = None
    if prep.check_layers:
        check = {"layers": prep.check_layers,
                 "vs_exact_margin": ranking_agreement(check_est, {h: delta_margin[h] for h in check_est}),
                 "vs_exact_score": ranking_agreement(check_est, {h: ver.gains[h] for h in check_est})}
    verified = (ranking_agreement({h: ranking.estimates[h] for h in ver.singles}, ver.gains)
                if ranking.estimates else None)
    return {"ranking_check": check, "ranking_vs_verified": verified}


def _candidate_rows(prep: Prepared, ranking: Ranking, ver: Verification,
                    delta_margin: dict[Head, float]) -> list[dict[str, Any]]:
    """One row per candidate: its estimate and rank, and its exact scores when it was verified."""
    tasks = prep.data.search.tasks
    rank_of = ({h: i + 1 for i, h in enumerate(sorted(prep.candidates, key=lambda h: (-ranking.estimates[h], h)))}
               if ranking.estimates else {})
    rows = []
    for h in prep.candidates:
        row: dict[str, Any] = {"layer": h[0], "head": h[1]}
        if ranking.estimates:
            row["estimate"] = ranking.estimates[h]
            row["rank"] = rank_of[h]
        if h in ver.singles:
            s = scores_from_margins(ver.singles[h], tasks)
            row["exact"] = {"accuracy": s.accuracy, "margin": s.margin, "gain": ver.gains[h],
                            "delta_margin": delta_margin[h], "per_task_gain": ver.task_gains[h], "why": ver.reasons[h]}
            row["kept"] = h in ver.kept
        rows.append(row)
    return rows


def _validation_section(prep: Prepared, ver: Verification, comb: Combination, val_n: dict[str, int]) -> dict[str, Any]:
    """The acceptance rule, each task's baseline and minimum detectable effect, and every set judged."""
    cfg = prep.cfg
    return {
        "alpha": cfg.alpha, "test": "exact McNemar (two-sided) per task, paired on the same prompts",
        "rule": "accepted only if no task's accuracy drops at p < alpha and the mean per-task gain is positive"
                + (" and some task's accuracy rises at p < alpha" if cfg.gain == "significant" else ""),
        "gain_rule": cfg.gain,
        "baseline_accuracy": {t: float((m > 0).mean()) for t, m in ver.validation_baseline.items()},
        "mde": {t: {"n": n, "at_10pct_discordance": min_detectable_effect(n, 0.10, cfg.alpha),
                    "at_5pct_discordance": min_detectable_effect(n, 0.05, cfg.alpha)} for t, n in val_n.items()},
        "shared": comb.shared.to_dict(),
        "per_task": {t: s.to_dict() for t, s in comb.per_task.items()},
        "tasks_without_profile": sorted(t for t, s in comb.per_task.items() if not s.heads),
    }


def _timing(prep: Prepared, ranking: Ranking, ev: Evaluator, total_s: float, threads_used: dict) -> dict[str, Any]:
    """Seconds per phase, the extrapolated cost of brute force, and what the machine was doing."""
    exact_evals = [r for r in prep.store.sets.values() if r.get("heads")]
    full_pass = [r["seconds"] / max(r.get("cost_fraction", 1.0), 1e-9) for r in exact_evals
                 if r["part"] == SEARCH and len(r["heads"]) == 1 and r.get("seconds")]
    per_full = float(np.median(full_pass)) if full_pass else None
    return {"total_s": total_s, **{f"{k}_s": v for k, v in ev.seconds.items()},
            "ranking_s": ranking.seconds, "exact_evaluations": len(exact_evals),
            "full_pass_s_median": per_full,  # one exact search-part pass of a head alone, from layer 0
            "brute_force_extrapolated_s": per_full * len(prep.candidates) if per_full else None,
            "loadavg_start": list(prep.load_start), "loadavg_end": list(os.getloadavg()),
            "cpu_count": os.cpu_count(), "torch_threads": _torch_threads(),
            "hf_threads_used": {str(k): v for k, v in sorted(threads_used.items())},
            "machine": platform.machine(), "resumed_records": prep.store.resumed}


def _torch_threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except Exception:  # pragma: no cover
        return None
