"""Writing an A/B evaluation: ``results.json``, ``report.md``, per-sample files (the chart,
``deltas.png``, is :mod:`act_plugin.eval.chart`'s).

``results.json`` is :class:`act_plugin.eval.results.EvalResults` (schema
``act-plugin/eval-results`` v2; JSON schema in ``docs/eval_results.schema.json``).

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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from act_plugin.atomic_files import atomic_write_text
from act_plugin.config.heads import parse_heads
from act_plugin.eval.chart import as_dict, write_chart
from act_plugin.eval.results import SCHEMA, SCHEMA_VERSION, EvalResults
from act_plugin.stats import describe_mde

__all__ = ["SCHEMA", "SCHEMA_VERSION", "write_samples", "read_samples", "write_results", "write_report",
           "write_chart", "samples_filename", "accuracy_from_samples", "clean"]


def samples_filename(arm: str, task: str) -> str:
    return f"samples_{arm}_{task}.jsonl"


def write_samples(path: Path, records: Iterable[dict]) -> Path:
    """One JSON line per record, written atomically (a file is either whole or absent)."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_samples(path: str | Path) -> list[dict]:
    with Path(path).open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def accuracy_from_samples(path: str | Path) -> float:
    """Recompute an arm's accuracy on a task from its per-sample file."""
    rows = read_samples(path)
    return sum(float(r["correct"]) for r in rows) / len(rows) if rows else float("nan")


def clean(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None and keys as strings (JSON-safe)."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def write_results(path: Path, results: EvalResults) -> Path:
    return atomic_write_text(path, results.to_json())


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _p(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}" if x >= 0.001 else "<0.001"


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and runs[-1][1] == v - 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def heads_spec(heads: dict[str, Any]) -> str:
    """An ACT config's heads as the compact spec a config reads back ('2-27:0,4; 30:*');
    neighbouring layers with the same heads are merged."""
    groups: list[list[Any]] = []  # [first layer, last layer, heads]
    for layer in sorted(heads, key=int):
        h = heads[layer]
        if groups and groups[-1][2] == h and groups[-1][1] == int(layer) - 1:
            groups[-1][1] = int(layer)
        else:
            groups.append([int(layer), int(layer), h])
    return "; ".join(f"{lo if lo == hi else f'{lo}-{hi}'}:{'*' if h == 'all' else _ranges(h)}" for lo, hi, h in groups)


def _heads_count(heads_map: dict[str, Any]) -> str:
    n_layers = len(heads_map)
    n_heads = sum(len(v) if isinstance(v, list) else 0 for v in heads_map.values())
    all_layers = sum(1 for v in heads_map.values() if v == "all")
    if all_layers == n_layers and n_layers:
        return f"all heads of {n_layers} layers"
    listed = f"{n_heads} heads in {n_layers - all_layers} layers"
    return listed + (f" + all heads of {all_layers} layers" if all_layers else "")


def _scale_text(scale: Any) -> str:
    """first_token's gamma: a number, or its per-head mapping grouped by gamma ('x2 on 2-27:*')."""
    if not isinstance(scale, dict):
        return str(scale)
    by_gamma: dict[float, dict[str, Any]] = {}
    for key, gamma in scale.items():  # head specs ('12:all', '15:3,8'), as the config reads them
        for layer, heads in parse_heads(key).items():
            by_gamma.setdefault(float(gamma), {})[str(layer)] = heads
    return "; ".join(f"x{g:g} on {heads_spec(heads)}" for g, heads in by_gamma.items())


# profile keys that describe where a profile came from, not what it does
_PROFILE_METADATA = ("rule", "heads", "source", "name", "model")


def _rule_settings(act: dict) -> str:
    """A profile's rule and its settings (``act``: the profile's dict; the act rule's is written
    without its rule name, as before rules existed)."""
    rule = act.get("rule", "act")
    if rule == "act":
        return f"beta {act['beta']}, tau {act['threshold']}"
    settings = ", ".join(f"{k} {_scale_text(v) if k == 'scale' else v}" for k, v in act.items()
                         if k not in _PROFILE_METADATA and v is not None)
    return f"rule {rule}" + (f", {settings}" if settings else "")


def _uncalibrated(info: dict) -> list[str]:
    return [t for t, x in (info.get("tasks") or {}).items() if not x["calibrated"]]


def _arm_description(info: dict) -> str:
    act = info["act"]
    if info.get("per_task"):
        tasks = info["tasks"] or {}
        n = sum(x["calibrated"] for x in tasks.values())
        desc = f"per-task profiles: {n} of {len(tasks)} tasks calibrated (profiles below), hash `{info['act_hash']}`"
        missing = _uncalibrated(info)
        if missing:
            desc += f"; **uncalibrated (no profile): {', '.join(missing)}** (the baseline's records)"
    elif act is None:
        return "none (baseline)"
    else:
        desc = f"{_rule_settings(act)}, {_heads_count(act.get('heads', {}))}, " \
               f"hash `{info['act_hash']}`"
        if act.get("source"):
            desc += f"; source: {act['source']}"
    if info["control"]:
        desc += "; **control**" + ("" if info["calibrates"] else " (calibrates nothing: should match the baseline)")
    return desc


def _engine_description(arm: str, info: dict) -> str:
    eng = info["engine"]
    if info.get("per_task"):
        if not any(x["calibrated"] for x in (info["tasks"] or {}).values()):
            return "not run: uncalibrated on every task (no profile)"
        return f"request act='{arm}.<task>' on each task with a profile: that profile read back, matches"
    if eng["calibration"] is None:
        told = "ACT off" if eng["act_setting"] is False else f"request act={eng['request']!r}"
        return f"uncalibrated ({told}; read back)"
    return f"request act={eng['request']!r}: profile read back, matches"


def _profiles_table(arm: str, info: dict) -> list[str]:
    """A per-task arm's profile per task (or that the task ran uncalibrated)."""
    lines = ["", f"### {arm}: profile per task", "", "| task | engine profile | rule settings | heads | hash |",
             "|---|---|---|---|---|"]
    for t, x in (info["tasks"] or {}).items():
        act = x["act"]
        if act is None:
            lines.append(f"| {t} | **uncalibrated (no profile)**: not run, the baseline's records | | | |")
            continue
        heads = act.get("heads", {})
        lines.append(f"| {t} | `{x['profile']}` | {_rule_settings(act)} | "
                     f"`{heads_spec(heads)}` ({_heads_count(heads)}) | `{x['act_hash']}` |")
    return lines


def _header(results: dict) -> list[str]:
    st = results["settings"]
    lines = [f"# ACT A/B evaluation: {results.get('name') or 'eval'}", ""]
    if results.get("description"):
        lines += [results["description"], ""]
    return lines + [
        f"- model: `{results['model']['name']}` (`{results['model']['path']}`)",
        f"- engine: `{json.dumps(results['engine'], sort_keys=True)}`; "
        f"{'one engine for all arms (per-request switch)' if results['share_engine'] else 'one engine per arm'}",
        f"- few-shot k = {st['num_fewshot']}, seeds run = {st['seeds']}, limit = {st['limit']}, "
        f"data = `{st['data_dir']}`",
        f"- scoring: {results['scoring']['note']}",
        f"- created {results['created']} with act-plugin {results['versions']['act_plugin']}, lm-eval "
        f"{results['versions']['lm_eval']}, vLLM {results['versions']['vllm']}",
    ]


def _arms_section(results: dict) -> list[str]:
    """The arms table (calibration, engine read-back, preemptions, time), each per-task arm's
    profiles, the engine start times and the warnings."""
    lines = [
        "", "## Arms", "",
        "| arm | calibration | engine (read back) | preempted | wall time (s) | scored (documents x seeds) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for a, info in results["arms"].items():
        pre = "n/a" if info["preemptions"] is None else str(info["preemptions"])
        wall = "n/a" if info["wall_time_s"] is None else f"{info['wall_time_s']:.1f}"
        lines.append(f"| {a} | {_arm_description(info)} | {_engine_description(a, info)} | {pre} | {wall} | "
                     f"{info['documents']} |")
    lines += ["", "Preempted: calibrated requests that vLLM preempted and recomputed while the arm ran "
              "(their sink statistics come from a different pass)."]
    for a, info in results["arms"].items():
        if info.get("per_task"):
            lines += _profiles_table(a, info)
    if results.get("engine_start_s"):
        lines += ["", f"Engine start: {', '.join(f'{s:.1f}' for s in results['engine_start_s'])} s."]
    if results.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in results["warnings"]]
    return lines


def _mde_cell(c: dict) -> str:
    """The MDE at the observed discordance, in the shared words; (!) marks an unresolved delta."""
    cell = describe_mde(c["mde"], discordance_known=c["docs_better"] + c["docs_worse"] > 0)
    return cell + ("" if c["resolved"] else " (!)")


def _table_head(results: dict, title: str, reference: str, treatment: str) -> list[str]:
    conf = int(round(100 * results["settings"]["confidence"]))
    return [
        "", f"## {title}", "",
        f"| task | metric | n | {reference} | {treatment} | delta (points) | {conf}% CI | + / - "
        f"| McNemar p (exact / mid-p) | MDE |",
        "|---|---|---:|---:|---:|---:|---|---:|---|---:|",
    ]


def _row(task: str, metric: str, c: dict) -> str:
    return (f"| {task} | {metric} | {c['n']} | {_pct(c['base_acc'])} | {_pct(c['treat_acc'])} | "
            f"{_pct(c['delta'], True)} | [{_pct(c['ci_low'], True)}, {_pct(c['ci_high'], True)}] | "
            f"{c['improved']} / {c['worsened']} | {_p(c['p_value'])} / {_p(c['p_value_midp'])} | {_mde_cell(c)} |")


def _mean_row(s: dict) -> str:
    return (f"| **mean over tasks** | | | | | **{_pct(s['mean_delta'], True)}** | "
            f"[{_pct(s['ci_low'], True)}, {_pct(s['ci_high'], True)}] | {s['improved']} / {s['worsened']} | | |")


def _comparison_section(results: dict, arm: str) -> list[str]:
    """One calibrated arm against the baseline: a row per task and the mean over tasks."""
    lines = _table_head(results, f"{arm} vs baseline", "baseline", arm)
    for t, info in results["tasks"].items():
        c = info["comparisons"][arm]
        task = t if c.get("calibrated", True) else f"{t} (**uncalibrated: no profile for this task**)"
        lines.append(_row(task, info["metric"], c))
    s = results["summary"][arm]
    lines.append(_mean_row(s))
    if s.get("uncalibrated_tasks"):
        lines += ["", f"Uncalibrated in {arm} (no profile for the task): {', '.join(s['uncalibrated_tasks'])}. "
                  f"Not run: the baseline's records stand for them, so their delta is 0 by construction; "
                  f"they count in the mean (the per-task arm as deployed runs them uncalibrated)."]
    return lines


def _pair_task_label(task: str, pair: dict, c: dict) -> str:
    """The task, marked where an arm of the pair has no profile for it (its records are the baseline's)."""
    missing = [pair[k] for k in ("treatment", "reference") if not c[f"{k}_calibrated"]]
    if not missing:
        return task
    if len(missing) == 2:
        return f"{task} (**uncalibrated in both: no profile for this task**)"
    return f"{task} (**{missing[0]} uncalibrated: no profile for this task**)"


def _pair_section(results: dict, pair: dict) -> list[str]:
    """Two calibrated arms of the config's ``comparisons``: the treatment against the reference
    on the same documents, a row per task and the mean over tasks."""
    treatment, reference = pair["treatment"], pair["reference"]
    lines = _table_head(results, f"{treatment} vs {reference}", reference, treatment)
    for t, c in pair["tasks"].items():
        lines.append(_row(_pair_task_label(t, pair, c), results["tasks"][t]["metric"], c))
    s = pair["summary"]
    lines.append(_mean_row(s))
    lines += ["", f"Delta = {treatment} minus {reference} on the same documents; + / - = documents {reference} got "
              f"wrong and {treatment} right / {reference} right and {treatment} wrong."]
    both = [t for t, c in pair["tasks"].items() if not (c["treatment_calibrated"] or c["reference_calibrated"])]
    for role in ("treatment", "reference"):
        arm = pair[role]
        own = [t for t in s[f"{role}_uncalibrated_tasks"] if t not in both]
        if own:
            lines.append(f"Uncalibrated in {arm} (no profile for the task): {', '.join(own)}: the baseline's records "
                         f"stand for {arm} there, so those rows compare the other arm with the baseline.")
    if both:
        lines.append(f"Uncalibrated in both (no profile for the task): {', '.join(both)}: both are the baseline's "
                     f"records, delta 0 by construction. Every row counts in the mean.")
    return lines


def _how_to_read(results: dict) -> list[str]:
    st = results["settings"]
    conf = int(round(100 * st["confidence"]))
    return [
        "",
        f"![per-task accuracy deltas]({results['files']['chart']})",
        "",
        "## How to read and recompute",
        "",
        "- Accuracies in percent; delta = calibrated minus baseline on the same documents, in points "
        "(in an `A vs B` section of two calibrated arms: A minus B, with B in the baseline's place throughout); "
        f"CI = {conf}% percentile paired bootstrap over documents ({st['bootstrap_resamples']} resamples); "
        "the mean row is the unweighted mean over tasks with a task-stratified bootstrap.",
        "- `+ / -` = documents flipped from wrong to right / right to wrong (per seed). p = McNemar's exact "
        "test on those flips (with several seeds: an exact sign test over documents on the seed-averaged "
        "correctness) and its mid-p variant.",
        f"- MDE = minimum detectable |delta| at this n: the smallest change an exact McNemar test (two-sided "
        f"alpha {st['mde_alpha']}) detects with power {st['mde_power']}, at the discordance this run observed "
        "(power computed exactly, over the binomial counts of discordant pairs). 'none resolvable': no change "
        "reaches that power at this n; n/a: no document changed. (!) marks a delta this n cannot resolve "
        "(below the MDE, none resolvable, or too few discordant pairs for the exact test to reach p < alpha "
        "at all: see Warnings).",
        "- Every number comes from the per-sample files `samples_<arm>_<task>.jsonl` (one line per seed and "
        "document: gold, prediction, per-choice log-likelihoods, correctness, prompt); `results.json` holds "
        f"them all (schema `{SCHEMA}` v{SCHEMA_VERSION}).",
        "",
    ]


def write_report(path: Path, results: EvalResults | dict) -> Path:
    """``report.md``: the run's settings, arms, warnings, one comparison table per calibrated
    arm (against the baseline), one per pair of arms the config's ``comparisons`` name, and
    how to read and recompute every number."""
    results = as_dict(results)
    lines = _header(results) + _arms_section(results)
    for arm, info in results["arms"].items():
        if not info["baseline"]:
            lines += _comparison_section(results, arm)
    for pair in results.get("comparisons") or []:
        lines += _pair_section(results, pair)
    lines += _how_to_read(results)
    return atomic_write_text(path, "\n".join(lines))
