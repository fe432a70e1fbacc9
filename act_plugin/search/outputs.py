"""The files a search writes, each atomically, to the paths of
:meth:`SearchConfig.destinations <act_plugin.search.config.SearchConfig.destinations>` (the run
folder ``runs/<name>/`` unless ``--update-shipped``): the shared ACT config (only if a set
passed validation), the per-task engine config, the JSON report with its Markdown summary,
and the per-head gain heatmap."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from act_plugin.atomic_files import atomic_write_json, atomic_write_text
from act_plugin.config import ACTConfig
from act_plugin.search.config import OutputPaths
from act_plugin.search.report import heads_map
from act_plugin.search.steps import Head, Prepared, Ranking, Verification
from act_plugin.search.summary import report_markdown

__all__ = ["act_config", "write_outputs", "log"]


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[act-plugin search] {msg}", file=sys.stderr, flush=True)


def act_config(prep: Prepared, heads, name: str, what: str) -> ACTConfig:
    """The ACT config of a head set the search accepted, its provenance in ``source``."""
    cfg = prep.cfg
    date = prep.started.strftime("%Y-%m-%d")
    source = (f"act-plugin search {date}: {what}; method {cfg.method}"
              + (f" (first-order ranking, top {cfg.fast.top_k} verified in {prep.exact_backend})"
                 if cfg.method == "fast" else " (every candidate alone)")
              + f", objective {cfg.score}, model {cfg.model}, tasks {','.join(cfg.tasks)} (train splits: "
              f"<= {cfg.samples_per_task} search + {cfg.validation_per_task} validation prompts per task, seed "
              f"{cfg.seed}), accepted on validation (paired per task, alpha {cfg.alpha})")
    act = ACTConfig(beta=cfg.beta, threshold=cfg.threshold, heads=heads_map(heads), name=name, source=source,
                    model=cfg.model)
    act.validate_for(prep.shape)
    return act


def write_outputs(prep: Prepared, paths: OutputPaths, report: dict[str, Any], shared: ACTConfig | None,
                  profiles: dict[str, ACTConfig], ranking: Ranking, ver: Verification, quiet: bool) -> None:
    """The ACT config, the per-task engine config, the report (+ .md) and the heatmap, each atomically."""

    written = []
    if shared is not None:
        _write_shared(prep, paths, report, shared)
        written.append(str(paths.output))
    else:
        log(f"NO shared head set passed validation: {paths.output} is NOT written"
            + (" (an older file there is left as it was)" if Path(paths.output).exists() else ""), quiet)
    if prep.cfg.per_task:
        _write_profiles(prep, paths, report, profiles)
        written.append(str(paths.profiles))
    atomic_write_json(paths.report, report)
    atomic_write_text(paths.summary, report_markdown(report))
    _write_heatmap(prep, paths.heatmap, report, ranking, ver)
    log(f"wrote {', '.join(written + [str(paths.report), str(paths.heatmap)])} (+ .md); base accuracy "
        f"{report['baseline']['accuracy']:.4f}", quiet)


def _write_shared(prep: Prepared, paths: OutputPaths, report: dict[str, Any], shared: ACTConfig) -> None:
    cfg, sel = prep.cfg, report["selected"]
    if shared.rule == "first_token":  # the comparison of the rules chose it over ACT's set
        header = (f"# first_token set found by `act-plugin search` ({prep.started:%Y-%m-%d}) for {cfg.model}, "
                  f"chosen over the ACT set on {report['validation_prompts']} held-out training prompts "
                  f"(report section 'rules').\n# Full report: {paths.report}\n")
        atomic_write_text(paths.output, header + shared.to_yaml())
        return
    header = (f"# ACT head set found by `act-plugin search` ({prep.started:%Y-%m-%d}) for {cfg.model}.\n"
              f"# {sel['count']} heads; search-part {cfg.score} gain {sel['delta_score']:+.4f} on "
              f"{report['prompts']} training prompts; accepted on {report['validation_prompts']} held-out "
              f"training prompts ({sel['note']}).\n# Full report: {paths.report}\n")
    atomic_write_text(paths.output, header + shared.to_yaml())


def _write_profiles(prep: Prepared, paths: OutputPaths, report: dict[str, Any],
                    profiles: dict[str, ACTConfig]) -> None:
    import yaml

    none = (report["validation"] or {}).get("tasks_without_profile", [])
    rules, first_token = report.get("rules"), []
    if rules is not None:  # a search over rules: the profile of each task is the rule its comparison chose
        none = rules["comparison"]["tasks_without_profile"]
        first_token = [t for t, r in rules["comparison"]["per_task"].items() if r["chosen"] == "first_token"]
    header = (f"# Per-task ACT profiles found by `act-plugin search` ({prep.started:%Y-%m-%d}) for "
              f"{prep.cfg.model}: one profile per task that a head set helps on validation; requests pick one with "
              f"extra_args={{'act': TASK}}.\n"
              + (f"# No profile (no set helped on validation; run uncalibrated): {', '.join(none)}\n" if none else "")
              + (f"# Rule first_token (its set beat ACT's on validation; report section 'rules'): "
                 f"{', '.join(first_token)}\n" if first_token else "")
              + f"# Full report: {paths.report}\n")
    body = {"profiles": {t: p.to_dict() for t, p in profiles.items()}, "default": None}
    atomic_write_text(paths.profiles, header + yaml.safe_dump(body, sort_keys=False))


def _write_heatmap(prep: Prepared, path: Path, report: dict[str, Any], ranking: Ranking, ver: Verification) -> None:
    from act_plugin.search.plot import gain_heatmap

    exact_m = np.full((prep.shape.num_layers, prep.shape.num_heads), np.nan)
    for h, g in ver.gains.items():
        exact_m[h] = g
    selected: list[Head] = [(int(k), h) for k, hs in report["selected"]["heads"].items() for h in hs]
    gain_heatmap(path, ranking.matrix, exact_m, ver.kept, selected,
                 f"{prep.cfg.model}: per-head gain of calibrating one head ({report['prompts']} search-part prompts)",
                 prep.cfg.score)
