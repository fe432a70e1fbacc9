"""``run_search``: prepare -> rank -> verify -> combine -> report -> write.

Data (:mod:`act_plugin.search.split`): each task's TRAINING split is divided, seeded, into a
search part and a validation part. Steps, each a function returning a dataclass:

* :func:`prepare` -- model shape, candidates, the two parts, the partial-results store;
* :func:`rank` (method ``fast``) -- one first-order pass over the search part ranks every
  candidate (gates on each head's calibrated output, one backward per batch:
  :mod:`act_plugin.search.hf_backend`);
* :func:`verify` -- the top-K candidates (method ``exact``: every candidate; plus every head of
  ``check_layers`` as a brute-force check of the ranking) are calibrated alone and scored
  exactly on the search part (in vLLM or in transformers from cached hidden states); heads
  whose objective gain is positive are kept; with ``validate_singles`` each verified head is
  also scored on validation (which objective generalises);
* :func:`combine` -- greedy forward selection over the kept heads, every step accepted only
  by its paired, per-task effect on the validation part (:mod:`act_plugin.search.select`);
  with ``per_task`` the same per task, giving one profile per task that a set helps;
* :func:`build_report` / :func:`write_outputs` -- the ACT config, the per-task engine config,
  the JSON report (+ Markdown summary) and the heatmap, each written atomically.

Every exact evaluation is appended to a JSONL keyed by a hash of the settings
(:mod:`act_plugin.search.store`), so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import datetime as _dt
import gc
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from act_plugin.config import ACTConfig, model_shape
from act_plugin.heads import group_by_layer
from act_plugin.search.config import SearchConfig
from act_plugin.search.scoring import OBJECTIVES, CalibrationSet, objective_gain, per_sample, scores_from_margins
from act_plugin.search.select import Selection, min_detectable_effect, select_forward
from act_plugin.search.split import SearchData, build_search_data, digest
from act_plugin.search.store import SearchStore, maths_version, model_fingerprint, settings_hash

__all__ = ["run_search", "SearchResult", "ranking_agreement", "prepare", "rank", "verify", "combine",
           "build_report", "write_outputs"]

logger = logging.getLogger("act_plugin.search")
Head = tuple[int, int]
SEARCH = "search"


def _val_part(task: str) -> str:
    return f"val:{task}"


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[act-plugin search] {msg}", file=sys.stderr, flush=True)


def ranking_agreement(estimate: dict[Head, float], exact: dict[Head, float], ks=(1, 3, 5, 9)) -> dict[str, Any]:
    """Spearman correlation and top-k overlap between estimated and exact gains."""
    from scipy.stats import spearmanr

    common = sorted(set(estimate) & set(exact))
    if len(common) < 3:
        return {"n": len(common)}
    e = np.array([estimate[h] for h in common])
    x = np.array([exact[h] for h in common])
    rho = spearmanr(e, x).statistic
    order_e = [common[i] for i in np.lexsort((np.arange(len(common)), -e))]
    order_x = [common[i] for i in np.lexsort((np.arange(len(common)), -x))]
    overlap = {str(k): len(set(order_e[:k]) & set(order_x[:k])) / k for k in ks if k <= len(common)}
    sign = float(np.mean(np.sign(e) == np.sign(x)))
    return {"n": len(common), "spearman": None if np.isnan(rho) else float(rho), "topk_overlap": overlap,
            "sign_agreement": sign}


# ----------------------------------------------------------------------------- exact evaluations


class Evaluator:
    """Exact per-prompt margins of a head set on one part, through the store (never twice)."""

    def __init__(self, store: SearchStore, data: SearchData):
        self.store = store
        self.data = data
        self.backends: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}

    def calib(self, part: str) -> CalibrationSet:
        return self.data.search if part == SEARCH else self.data.validation[part.removeprefix("val:")]

    def margins(self, part: str, heads, phase: str) -> np.ndarray:
        be = self.backends[part]
        rec = self.store.get_set(be.name, part, heads)
        if rec is None:
            t = time.perf_counter()
            lp = be.evaluate(list(heads))
            sec = time.perf_counter() - t
            _, valid = self.calib(part).choice_matrix()
            _, m = per_sample(lp, self.calib(part).gold, valid)
            rec = self.store.add_set(be.name, part, heads, m.tolist(), sec, be.cost_fraction(list(heads)))
            self.seconds[phase] = self.seconds.get(phase, 0.0) + sec
        return np.asarray(rec["margins"], dtype=np.float64)

    def validation_correct(self, heads, phase: str, tasks: list[str] | None = None) -> dict[str, np.ndarray]:
        return {t: self.margins(_val_part(t), heads, phase) > 0 for t in (tasks or list(self.data.validation))}

    def close(self) -> None:
        seen = set()
        for be in self.backends.values():
            if id(be) not in seen:
                seen.add(id(be))
                be.close()


# ----------------------------------------------------------------------------- steps


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
    base = ev.margins(SEARCH, [], "baseline")
    val_base = {t: ev.margins(_val_part(t), [], "baseline") for t in prep.data.validation}
    singles, gains, task_gains, val_singles = {}, {}, {}, {}
    with tqdm(total=len(heads), desc=f"exact scores ({prep.exact_backend})", unit="head", disable=not progress,
              dynamic_ncols=True) as bar:
        for h in heads:
            m = ev.margins(SEARCH, [h], "verify" if reasons[h] != "check" else "check")
            singles[h] = m
            gains[h], task_gains[h] = objective_gain(cfg.score, m, base, tasks, cfg.clip)
            if cfg.validate_singles and prep.data.validation:
                val_singles[h] = {t: ev.margins(_val_part(t), [h], "validate_singles") for t in prep.data.validation}
            bar.set_postfix_str(f"L{h[0]}H{h[1]} {cfg.score} {gains[h]:+.4f}")
            bar.update(1)
            if on_candidate:
                on_candidate(h, {"gain": gains[h], "per_task": task_gains[h]})
    kept = sorted((h for h in heads if gains[h] > 0), key=lambda h: (-gains[h], h))
    return Verification(base, singles, gains, task_gains, reasons, kept, val_base, val_singles)


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


# ----------------------------------------------------------------------------- report


def objective_comparison(prep: Prepared, ver: Verification) -> dict[str, Any] | None:
    """Which search-part objective predicts the validation accuracy change of single heads."""
    heads = sorted(ver.validation_singles)
    if len(heads) < 3:
        return None
    vtasks = list(prep.data.validation)
    v_tasks_flat = [t for t in vtasks for _ in range(len(ver.validation_baseline[t]))]
    v_base = np.concatenate([ver.validation_baseline[t] for t in vtasks])
    val_acc = {}
    for h in heads:
        v = np.concatenate([ver.validation_singles[h][t] for t in vtasks])
        val_acc[h] = objective_gain("accuracy", v, v_base, v_tasks_flat)[0]
    y = np.array([val_acc[h] for h in heads])
    out: dict[str, Any] = {"heads": len(heads), "validation_accuracy_gain": {f"L{a}H{b}": val_acc[(a, b)]
                                                                             for a, b in heads}, "objectives": {}}
    for obj in OBJECTIVES:
        g = np.array([objective_gain(obj, ver.singles[h], ver.baseline, prep.data.search.tasks, prep.cfg.clip)[0]
                      for h in heads])
        fit = _predicts_validation(g, y)
        top = np.argsort(-g, kind="stable")[:3]
        out["objectives"][obj] = {
            "spearman_vs_validation_accuracy": fit["spearman"],
            "kept": fit["kept"],
            "kept_mean_validation_accuracy_gain": fit["kept_mean"],
            "kept_share_helping_on_validation": fit["kept_share_helping"],
            "top3_mean_validation_accuracy_gain": float(np.mean(y[top])),
        }
    return out


def _predicts_validation(gain: np.ndarray, change: np.ndarray) -> dict[str, Any]:
    """How well an objective's search-part gains predict the validation accuracy changes of
    the same items: rank correlation (None when either is constant) and what the items the
    objective keeps (gain > 0) do on validation."""
    from scipy.stats import spearmanr

    rho = spearmanr(gain, change).statistic if np.ptp(gain) > 0 and np.ptp(change) > 0 else float("nan")
    kept = gain > 0
    return {
        "spearman": None if np.isnan(rho) else float(rho),
        "kept": int(kept.sum()),
        "kept_mean": float(change[kept].mean()) if kept.any() else None,
        "kept_share_helping": float(np.mean(change[kept] > 0)) if kept.any() else None,
    }


def objective_comparison_per_task(prep: Prepared, ver: Verification) -> dict[str, Any] | None:
    """Which search-part objective predicts the validation accuracy change, over every
    (verified head, task) pair whose single-head validation score the search already holds
    (the per-task selection and the first combined-set step score single heads on validation,
    so this costs nothing extra). Per task, ``margin`` and ``worst_task`` are the same number."""
    tasks = list(prep.data.search.tasks)
    pairs: list[tuple[Head, str, float]] = []  # (head, task, validation accuracy change)
    for h in sorted(ver.singles):
        for t, base in ver.validation_baseline.items():
            rec = prep.store.get_set(prep.exact_backend, _val_part(t), [h])
            if rec is not None:
                pairs.append((h, t, float(np.mean(np.asarray(rec["margins"]) > 0) - np.mean(base > 0))))
    if len(pairs) < 3:
        return None
    y = np.array([d for _, _, d in pairs])
    out: dict[str, Any] = {
        "pairs": len(pairs),
        "validation_accuracy_change": {f"L{h[0]}H{h[1]}/{t}": d for h, t, d in pairs},
        "objectives": {},
    }
    for obj in OBJECTIVES:
        if obj == "worst_task":
            continue  # per task it is the margin
        g = np.array([objective_gain(obj, ver.singles[h], ver.baseline, tasks, prep.cfg.clip)[1][t]
                      for h, t, _ in pairs])
        fit = _predicts_validation(g, y)
        out["objectives"][obj] = {
            "spearman_vs_validation_accuracy": fit["spearman"],
            "sign_agreement": float(np.mean((g > 0) == (y > 0))),
            "kept": fit["kept"],
            "kept_mean_validation_accuracy_change": fit["kept_mean"],
            "kept_share_helping_on_validation": fit["kept_share_helping"],
        }
    return out


@dataclass
class SearchResult:
    config: ACTConfig | None  # the shared set (None: no set passed validation)
    profiles: dict[str, ACTConfig]  # per-task sets (task -> profile), when per_task
    report: dict[str, Any]
    output: Path
    profiles_path: Path | None
    report_path: Path
    heatmap_path: Path


def _heads_map(heads) -> dict[int, list[int]]:
    return group_by_layer((lyr, int(h)) for lyr, h in sorted(heads))


def _act_config(prep: Prepared, heads, name: str, what: str) -> ACTConfig:
    cfg = prep.cfg
    date = prep.started.strftime("%Y-%m-%d")
    source = (f"act-plugin search {date}: {what}; method {cfg.method}"
              + (f" (first-order ranking, top {cfg.fast.top_k} verified in {prep.exact_backend})"
                 if cfg.method == "fast" else " (every candidate alone)")
              + f", objective {cfg.score}, model {cfg.model}, tasks {','.join(cfg.tasks)} (train splits: "
              f"<= {cfg.samples_per_task} search + {cfg.validation_per_task} validation prompts per task, seed "
              f"{cfg.seed}), accepted on validation (paired per task, alpha {cfg.alpha})")
    act = ACTConfig(beta=cfg.beta, threshold=cfg.threshold, heads=_heads_map(heads), name=name, source=source,
                    model=cfg.model)
    act.validate_for(prep.shape)
    return act


def build_report(prep: Prepared, ranking: Ranking, ver: Verification, comb: Combination,
                 ev: Evaluator, total_s: float, threads_used: dict) -> dict[str, Any]:
    cfg = prep.cfg
    L, H = prep.shape.num_layers, prep.shape.num_heads
    tasks = prep.data.search.tasks
    base_scores = scores_from_margins(ver.baseline, tasks)
    shared = comb.shared.heads
    sel_search = ev.margins(SEARCH, shared, "combine") if shared else ver.baseline
    sel_gain = objective_gain(cfg.score, sel_search, ver.baseline, tasks, cfg.clip)[0]
    delta_margin = {h: scores_from_margins(m, tasks).margin - base_scores.margin for h, m in ver.singles.items()}
    check_est = {h: ranking.estimates[h] for h in ver.singles if "check" in ver.reasons[h] and h in ranking.estimates}
    check = None
    if prep.check_layers:
        check = {"layers": prep.check_layers,
                 "vs_exact_margin": ranking_agreement(check_est, {h: delta_margin[h] for h in check_est}),
                 "vs_exact_score": ranking_agreement(check_est, {h: ver.gains[h] for h in check_est})}
    verified_agreement = (ranking_agreement({h: ranking.estimates[h] for h in ver.singles}, ver.gains)
                          if ranking.estimates else None)
    rank_of = {h: i + 1 for i, h in enumerate(sorted(prep.candidates, key=lambda h: (-ranking.estimates[h], h)))} \
        if ranking.estimates else {}
    cand_rows = []
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
        cand_rows.append(row)
    counts = prep.data.counts
    val_n = {t: int(len(m)) for t, m in ver.validation_baseline.items()}
    validation = None
    if comb.validated:
        validation = {
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
    exact_evals = [r for r in prep.store.sets.values() if r.get("heads")]
    full_pass = [r["seconds"] / max(r.get("cost_fraction", 1.0), 1e-9) for r in exact_evals
                 if r["part"] == SEARCH and len(r["heads"]) == 1 and r.get("seconds")]
    per_full = float(np.median(full_pass)) if full_pass else None
    timing = {"total_s": total_s, **{f"{k}_s": v for k, v in ev.seconds.items()},
              "ranking_s": ranking.seconds, "exact_evaluations": len(exact_evals),
              "full_pass_s_median": per_full,  # one exact search-part pass of a head alone, from layer 0
              "brute_force_extrapolated_s": per_full * len(prep.candidates) if per_full else None,
              "loadavg_start": list(prep.load_start), "loadavg_end": list(os.getloadavg()),
              "cpu_count": os.cpu_count(), "torch_threads": _torch_threads(),
              "hf_threads_used": {str(k): v for k, v in sorted(threads_used.items())},
              "machine": platform.machine(), "resumed_records": prep.store.resumed}
    return {
        "name": cfg.config_name, "date": prep.started.isoformat(timespec="seconds"), "model": cfg.model,
        "model_path": prep.model_path, "shape": {"layers": L, "heads": H, "kv_heads": prep.shape.num_kv_heads},
        "method": cfg.method, "score": cfg.score, "clip": cfg.clip, "beta": cfg.beta, "threshold": cfg.threshold,
        "exact_backend": prep.exact_backend, "top_k": cfg.fast.top_k if cfg.method == "fast" else None,
        "tasks": {t: c.get("search", 0) for t, c in counts.items()},
        "validation_tasks": {t: c.get("validation", 0) for t, c in counts.items()},
        "prompts": len(prep.data.search), "prompt_tokens": int(sum(len(p) for p in prep.data.search.prompts)),
        "validation_prompts": int(sum(val_n.values())), "seed": cfg.seed, "settings_hash": prep.settings_key,
        "state_file": str(prep.store.path), "split": prep.data.record(),
        "baseline": base_scores.to_dict(),
        "kept": [list(h) for h in ver.kept],
        "selected": {"heads": {str(k): v for k, v in _heads_map(shared).items()}, "count": len(shared),
                     "scores": scores_from_margins(sel_search, tasks).to_dict(), "delta_score": sel_gain,
                     "note": comb.note or comb.shared.note},
        "validation": validation,
        "objective_comparison": objective_comparison(prep, ver) if comb.validated else None,
        "objective_comparison_per_task": objective_comparison_per_task(prep, ver) if comb.validated else None,
        "ranking_check": check, "ranking_vs_verified": verified_agreement,
        "candidates": cand_rows, "timing": timing, "config": cfg.to_dict(),
    }


def write_outputs(prep: Prepared, report: dict[str, Any], shared: ACTConfig | None,
                  profiles: dict[str, ACTConfig], ranking: Ranking, ver: Verification, quiet: bool) -> None:
    """The ACT config, the per-task engine config, the report (+ .md) and the heatmap, each atomically."""
    import yaml

    from act_plugin.atomic_files import atomic_write_json, atomic_write_text
    from act_plugin.search.plot import gain_heatmap
    from act_plugin.search.summary import report_markdown

    cfg = prep.cfg
    date = prep.started.strftime("%Y-%m-%d")
    base, sel = report["baseline"], report["selected"]
    written = []
    if shared is not None:
        header = (f"# ACT head set found by `act-plugin search` ({date}) for {cfg.model}.\n"
                  f"# {sel['count']} heads; search-part {cfg.score} gain {sel['delta_score']:+.4f} on "
                  f"{report['prompts']} training prompts; accepted on {report['validation_prompts']} held-out "
                  f"training prompts ({sel['note']}).\n# Full report: {cfg.report_path}\n")
        atomic_write_text(cfg.output, header + shared.to_yaml())
        written.append(str(cfg.output))
    else:
        _log(f"NO shared head set passed validation: {cfg.output} is NOT written"
             + (" (an older file there is left as it was)" if Path(cfg.output).exists() else ""), quiet)
    if cfg.per_task:
        v = report["validation"] or {}
        none = v.get("tasks_without_profile", [])
        header = (f"# Per-task ACT profiles found by `act-plugin search` ({date}) for {cfg.model}: one profile per "
                  f"task that a head set helps on validation; requests pick one with extra_args={{'act': TASK}}.\n"
                  + (f"# No profile (no set helped on validation; run uncalibrated): {', '.join(none)}\n"
                     if none else "")
                  + f"# Full report: {cfg.report_path}\n")
        body = {"profiles": {t: p.to_dict() for t, p in profiles.items()}, "default": None}
        atomic_write_text(cfg.profiles_path, header + yaml.safe_dump(body, sort_keys=False))
        written.append(str(cfg.profiles_path))
    atomic_write_json(cfg.report_path, report)
    atomic_write_text(cfg.report_path.with_suffix(".md"), report_markdown(report))
    L, H = prep.shape.num_layers, prep.shape.num_heads
    exact_m = np.full((L, H), np.nan)
    for h, g in ver.gains.items():
        exact_m[h] = g
    gain_heatmap(cfg.heatmap_path, ranking.matrix, exact_m, ver.kept, [tuple(h) for h in _heads_list(sel)],
                 f"{cfg.model}: per-head gain of calibrating one head ({report['prompts']} search-part prompts)",
                 cfg.score)
    _log(f"wrote {', '.join(written + [str(cfg.report_path), str(cfg.heatmap_path)])} (+ .md); base accuracy "
         f"{base['accuracy']:.4f}", quiet)


def _heads_list(sel: dict) -> list[Head]:
    return [(int(k), h) for k, hs in sel["heads"].items() for h in hs]


# ----------------------------------------------------------------------------- orchestration


def run_search(
    cfg: SearchConfig,
    *,
    progress: bool = True,
    resume: bool = True,
    quiet: bool = False,
    on_candidate: Callable[[Head, dict], None] | None = None,
    hf_model: Any = None,
    llm: Any = None,
    write: bool = True,
) -> SearchResult:
    """Run the search of ``cfg`` (see the module docs) and write its outputs.

    ``on_candidate(head, record)`` is called after each exact single-head score (raise from
    it to interrupt; a rerun resumes). ``hf_model`` / ``llm`` reuse a loaded transformers
    model / a running ACT-enabled vLLM engine (tests)."""
    t0 = time.perf_counter()
    prep = prepare(cfg, resume)
    d = prep.data
    _log(f"model {cfg.model} ({prep.shape.num_layers} layers x {prep.shape.num_heads} heads), "
         f"{len(prep.candidates)} candidates; training splits divided (seed {cfg.seed}) into a search part of "
         f"{len(d.search)} prompts and a validation part of {sum(len(c) for c in d.validation.values())} prompts: "
         + ", ".join(f"{t} {c.get('search', 0)}+{c.get('validation', 0)}" for t, c in d.counts.items())
         + f"; method {cfg.method}, objective {cfg.score}; partial results: {prep.store.path}"
         + (f" (resuming: {prep.store.resumed} records)" if prep.store.resumed else ""), quiet)
    ev = Evaluator(prep.store, d)
    hf = None
    threads_used: dict[int, int] = {}
    ranking = Ranking()
    parts = [SEARCH] + [_val_part(t) for t in d.validation]
    try:
        if cfg.method == "fast" or prep.exact_backend == "hf":
            from act_plugin.search.hf_backend import HFSearchBackend

            t = time.perf_counter()
            keep_cache = cfg.hf.cache_hidden and prep.exact_backend == "hf"
            hf = HFSearchBackend(prep.model_path, d.search, beta=cfg.beta, threshold=cfg.threshold,
                                 batch_tokens=cfg.hf.batch_tokens, threads=cfg.hf.threads, cache_hidden=keep_cache,
                                 model=hf_model)
            ev.seconds["load_hf"] = time.perf_counter() - t
            if keep_cache:
                per_layer = sum(b.tokens for b in hf.batches) * hf.inner.embed_tokens.embedding_dim * 4
                cand_layers = sorted({lyr for lyr, _ in prep.candidates} | set(prep.check_layers))
                if per_layer * len(cand_layers) <= cfg.hf.cache_gib * 2**30:
                    hf.plan_cache(cand_layers)  # filled by the ranking pass itself: no extra baseline pass
        if cfg.method == "fast":
            ranking = rank(prep, hf, progress)
            _log(f"ranking pass: {ranking.seconds:.1f}s for {len(prep.candidates)} heads", quiet)
        if prep.exact_backend == "hf":
            assert hf is not None  # loaded above: exact_backend "hf" always loads the HF backend
            ev.backends[SEARCH] = hf
            for task, c in d.validation.items():
                ev.backends[_val_part(task)] = HFSearchBackend(
                    prep.model_path, c, beta=cfg.beta, threshold=cfg.threshold, batch_tokens=cfg.hf.batch_tokens,
                    threads=cfg.hf.threads, cache_hidden=cfg.hf.cache_hidden, model=hf.model, self_check=False)
            top = sorted(prep.candidates, key=lambda h: (-ranking.estimates.get(h, 0.0), h))[: cfg.fast.top_k]
            layers = {lyr for lyr, _ in top} | set(prep.check_layers)
            for p in parts:
                ev.backends[p].plan_cache(layers)
        else:
            if hf is not None:
                threads_used = dict(hf.threads.used)
                hf.close()
                hf = None
                gc.collect()
            from act_plugin.search.vllm_backend import VLLMSearchBackend

            t = time.perf_counter()
            first = VLLMSearchBackend(prep.model_path, d.search, beta=cfg.beta, threshold=cfg.threshold,
                                      engine=cfg.engine, seed=cfg.seed, llm=llm,
                                      max_prompt_tokens=max(len(p) for c in [d.search, *d.validation.values()]
                                                            for p in c.prompts))
            ev.seconds["engine_start"] = time.perf_counter() - t
            ev.backends[SEARCH] = first
            for task, c in d.validation.items():
                ev.backends[_val_part(task)] = VLLMSearchBackend(prep.model_path, c, beta=cfg.beta,
                                                                 threshold=cfg.threshold, llm=first.llm)
        ver = verify(prep, ev, ranking, progress, on_candidate)
        _log(f"{len(ver.kept)} of {len(ver.singles)} exactly scored heads gain alone on the search part", quiet)
        comb = combine(prep, ev, ver)
        _log(f"shared set: {len(comb.shared.heads)} heads ({comb.note or comb.shared.note}); per-task sets: "
             + (", ".join(f"{t} {len(s.heads)}" for t, s in comb.per_task.items()) or "not asked"), quiet)
        report = build_report(prep, ranking, ver, comb, ev, time.perf_counter() - t0,
                              dict(hf.threads.used) if hf is not None else threads_used)
    finally:
        if hf is not None:
            threads_used = dict(hf.threads.used)
        ev.close()
        if hf is not None and ev.backends.get(SEARCH) is not hf:
            hf.close()
    report["timing"]["total_s"] = time.perf_counter() - t0
    shared = (_act_config(prep, comb.shared.heads, cfg.config_name, "shared set") if comb.shared.heads else None)
    profiles = {t: _act_config(prep, s.heads, t, f"per-task set for {t}") for t, s in comb.per_task.items()
                if s.heads}
    if write:
        write_outputs(prep, report, shared, profiles, ranking, ver, quiet)
    _log(f"{len(comb.shared.heads)} heads selected; {report['timing']['total_s']:.1f}s", quiet)
    return SearchResult(config=shared, profiles=profiles, report=report, output=Path(cfg.output),
                        profiles_path=cfg.profiles_path if cfg.per_task else None, report_path=cfg.report_path,
                        heatmap_path=cfg.heatmap_path)


def _torch_threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except Exception:  # pragma: no cover
        return None
