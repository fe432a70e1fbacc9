"""The run's final files, written atomically once every piece is done: ``config.yaml``,
``lm_eval_raw.json``, ``deltas.png``, ``report.md`` and, last, ``results.json`` (after the
files it names)."""

from __future__ import annotations

from pathlib import Path

from act_plugin.atomic_files import atomic_write_json, atomic_write_text
from act_plugin.eval import report as _report
from act_plugin.eval.chart import write_chart
from act_plugin.eval.config import EvalConfig
from act_plugin.eval.results import EvalResults
from act_plugin.eval.run_state import RAW_FILE, RunState

__all__ = ["write_outputs"]


def write_outputs(out: Path, cfg: EvalConfig, state: RunState, results: EvalResults) -> dict[str, Path]:
    """Write the run's final files atomically; results.json after the files it names."""
    import yaml

    files: dict[str, Path] = {}
    for piece in state.pieces.values():
        files[piece["samples"]] = out / piece["samples"]
    files["config.yaml"] = atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    raw: dict[str, dict] = {}
    for piece in state.pieces.values():
        raw.setdefault(piece["arm"], {})[piece["task"]] = piece["lm_eval_raw"]
    files[RAW_FILE] = atomic_write_json(out / RAW_FILE, raw, ensure_ascii=False)
    chart = write_chart(out / "deltas.png", results)
    if chart is not None:
        files["deltas.png"] = chart
    files["report.md"] = _report.write_report(out / "report.md", results)
    files["results.json"] = _report.write_results(out / "results.json", results)
    return files
