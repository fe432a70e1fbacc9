"""Writing an A/B evaluation: ``results.json``, ``report.md``, ``deltas.png``, per-sample files.

``results.json`` (schema ``act-plugin/eval-results``, version 1; keys are only ever added
within a version)::

    {
      "schema": "act-plugin/eval-results", "schema_version": 1,
      "name": str, "description": str | null, "created": ISO-8601 UTC,
      "versions": {"act_plugin", "lm_eval", "vllm", "torch", "python"},
      "model": {"name": str, "path": str},
      "engine": {vLLM engine args as given}, "share_engine": bool, "engine_start_s": [float],
      "scoring": {"next_token": bool, "note": str},
      "settings": {"num_fewshot", "limit", "seeds" (run), "data_dir", "bootstrap_resamples",
                   "confidence", "stats_seed"},
      "arms": {ARM: {"baseline": bool, "act": ACT config dict | null, "act_hash": str | null,
                     "wall_time_s": float, "documents": int}},
      "tasks": {TASK: {"lm_eval_task": str, "metric": "acc" | "acc_norm", "n": int,
                       "num_fewshot": int, "seeds": [int],
                       "accuracy": {ARM: float},              # mean over seeds and documents
                       "accuracy_per_seed": {ARM: {SEED: float}},
                       "lm_eval": {ARM: {SEED: {metric: value}}},   # as lm-eval reported
                       "samples": {ARM: file name},
                       "comparisons": {ARM: {n, seeds, base_acc, treat_acc, delta, ci_low,
                                             ci_high, confidence, improved, worsened,
                                             both_correct, both_wrong, docs_better,
                                             docs_worse, p_value, p_value_midp}}}},
      "summary": {ARM: {"mean_delta": float, "ci_low": float, "ci_high": float,
                        "tasks_up": int, "tasks_down": int, "improved": int, "worsened": int}},
      "files": {"report": "report.md", "chart": "deltas.png", "config": "config.yaml"}
    }

Accuracies and deltas are fractions (0.1 = 10 points). ``comparisons`` are calibrated arm
minus baseline over the same documents (see :mod:`act_plugin.eval.stats`).

Per-sample files ``samples_<arm>_<task>.jsonl``, one line per (seed, document)::

    {"task", "lm_eval_task", "arm", "seed", "doc_id", "row", "gold", "pred", "correct",
     "acc", "acc_norm" (ll tasks), "loglikelihoods": [per choice], "greedy": [per choice],
     "choices": [str], "prompt": str}

``correct`` is the task's primary metric for that document (lm-eval's value), ``pred`` the
argmax behind it; the mean of ``correct`` over a file is the arm's accuracy in
``results.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

__all__ = ["SCHEMA", "SCHEMA_VERSION", "write_samples", "read_samples", "write_results", "write_report",
           "write_chart", "samples_filename", "accuracy_from_samples"]

SCHEMA = "act-plugin/eval-results"
SCHEMA_VERSION = 1


def samples_filename(arm: str, task: str) -> str:
    return f"samples_{arm}_{task}.jsonl"


def write_samples(path: Path, records: Iterable[dict]) -> Path:
    with path.open("w") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_samples(path: str | Path) -> list[dict]:
    with Path(path).open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def accuracy_from_samples(path: str | Path) -> float:
    """Recompute an arm's accuracy on a task from its per-sample file."""
    rows = read_samples(path)
    return sum(float(r["correct"]) for r in rows) / len(rows) if rows else float("nan")


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_results(path: Path, results: dict) -> Path:
    path.write_text(json.dumps(_clean(results), indent=1, ensure_ascii=False, default=str) + "\n")
    return path


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _p(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}" if x >= 0.001 else "<0.001"


def write_chart(path: Path, results: dict) -> Path | None:
    """Grouped bars of per-task deltas (percentage points) with CI error bars, plus the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = [a for a, info in results["arms"].items() if not info["baseline"]]
    tasks = list(results["tasks"])
    if not arms or not tasks:
        return None
    labels = tasks + ["mean"]
    x = np.arange(len(labels))
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.2))
    for i, arm in enumerate(arms):
        vals, lo, hi = [], [], []
        for t in tasks:
            c = results["tasks"][t]["comparisons"][arm]
            vals.append(100 * c["delta"])
            lo.append(100 * (c["delta"] - c["ci_low"]))
            hi.append(100 * (c["ci_high"] - c["delta"]))
        s = results["summary"][arm]
        vals.append(100 * s["mean_delta"])
        lo.append(100 * (s["mean_delta"] - s["ci_low"]))
        hi.append(100 * (s["ci_high"] - s["mean_delta"]))
        pos = x - 0.4 + width * (i + 0.5)
        if len(arms) == 1:  # one arm: colour says the sign
            colors = ["#2b8a3e" if v > 0 else "#c92a2a" if v < 0 else "#868e96" for v in vals]
        else:  # several arms: one colour per arm, so the legend reads right (the zero line shows the sign)
            colors = plt.get_cmap("tab10")(i % 10)
        ax.bar(pos, vals, width * 0.9, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=3, color=colors,
               edgecolor="black", linewidth=0.5, label=arm, alpha=0.85)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right")
    conf = int(round(100 * results["settings"]["confidence"]))
    ax.set_ylabel(f"accuracy delta vs baseline (points, {conf}% CI)")
    ax.set_title(f"{results.get('name') or 'eval'}: {results['model']['name']}")
    if len(arms) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(path: Path, results: dict) -> Path:
    arms = list(results["arms"])
    cal = [a for a in arms if not results["arms"][a]["baseline"]]
    st = results["settings"]
    conf = int(round(100 * st["confidence"]))
    lines = [f"# ACT A/B evaluation: {results.get('name') or 'eval'}", ""]
    if results.get("description"):
        lines += [results["description"], ""]
    lines += [
        f"- model: `{results['model']['name']}` (`{results['model']['path']}`)",
        f"- engine: `{json.dumps(results['engine'], sort_keys=True)}`; "
        f"{'one engine for all arms (per-request switch)' if results['share_engine'] else 'one engine per arm'}",
        f"- few-shot k = {st['num_fewshot']}, seeds run = {st['seeds']}, limit = {st['limit']}, "
        f"data = `{st['data_dir']}`",
        f"- scoring: {results['scoring']['note']}",
        f"- created {results['created']} with act-plugin {results['versions']['act_plugin']}, lm-eval "
        f"{results['versions']['lm_eval']}, vLLM {results['versions']['vllm']}",
        "",
        "## Arms",
        "",
        "| arm | calibration | wall time (s) | scored (documents x seeds) |",
        "|---|---|---:|---:|",
    ]
    for a in arms:
        info = results["arms"][a]
        act = info["act"]
        if act is None:
            desc = "none (baseline)"
        else:
            n_layers = len(act.get("heads", {}))
            n_heads = sum(len(v) if isinstance(v, list) else 0 for v in act.get("heads", {}).values())
            all_layers = sum(1 for v in act.get("heads", {}).values() if v == "all")
            heads = f"{n_heads} heads in {n_layers} layers" + (f" (+{all_layers} layers 'all')" if all_layers else "")
            desc = f"beta {act['beta']}, tau {act['threshold']}, {heads}, hash `{info['act_hash']}`"
            if act.get("source"):
                desc += f"; source: {act['source']}"
        lines.append(f"| {a} | {desc} | {info['wall_time_s']:.1f} | {info['documents']} |")
    if results.get("engine_start_s"):
        lines += ["", f"Engine start: {', '.join(f'{s:.1f}' for s in results['engine_start_s'])} s."]
    for arm in cal:
        lines += [
            "",
            f"## {arm} vs baseline",
            "",
            f"| task | metric | n | baseline | {arm} | delta (points) | {conf}% CI | + / - | McNemar p (exact / mid-p) |",
            "|---|---|---:|---:|---:|---:|---|---:|---|",
        ]
        for t, info in results["tasks"].items():
            c = info["comparisons"][arm]
            lines.append(
                f"| {t} | {info['metric']} | {c['n']} | {_pct(c['base_acc'])} | {_pct(c['treat_acc'])} | "
                f"{_pct(c['delta'], True)} | [{_pct(c['ci_low'], True)}, {_pct(c['ci_high'], True)}] | "
                f"{c['improved']} / {c['worsened']} | {_p(c['p_value'])} / {_p(c['p_value_midp'])} |"
            )
        s = results["summary"][arm]
        lines.append(
            f"| **mean over tasks** | | | | | **{_pct(s['mean_delta'], True)}** | "
            f"[{_pct(s['ci_low'], True)}, {_pct(s['ci_high'], True)}] | {s['improved']} / {s['worsened']} | |"
        )
    lines += [
        "",
        f"![per-task accuracy deltas]({results['files']['chart']})",
        "",
        "## How to read and recompute",
        "",
        "- Accuracies in percent; delta = calibrated minus baseline on the same documents, in points; "
        f"CI = {conf}% percentile paired bootstrap over documents ({st['bootstrap_resamples']} resamples); "
        "the mean row is the unweighted mean over tasks with a task-stratified bootstrap.",
        "- `+ / -` = documents flipped from wrong to right / right to wrong (per seed). p = McNemar's exact "
        "test on those flips (with several seeds: an exact sign test over documents on the seed-averaged "
        "correctness) and its mid-p variant.",
        "- Every number comes from the per-sample files `samples_<arm>_<task>.jsonl` (one line per seed and "
        "document: gold, prediction, per-choice log-likelihoods, correctness, prompt); `results.json` holds "
        f"them all (schema `{SCHEMA}` v{SCHEMA_VERSION}).",
        "",
    ]
    path.write_text("\n".join(lines))
    return path
