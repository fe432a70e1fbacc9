"""``deltas.png``: per-task accuracy deltas of every calibrated arm against the baseline, with their
CIs and the mean; below them, each ``comparisons`` pair of calibrated arms."""

from __future__ import annotations

import io
import json
from pathlib import Path

from act_plugin.atomic_files import atomic_write_bytes
from act_plugin.eval.results import EvalResults

__all__ = ["write_chart", "as_dict"]


def as_dict(results: EvalResults | dict) -> dict:
    """``results.json``'s content as a dict (from the typed results or as read)."""
    return json.loads(results.to_json()) if isinstance(results, EvalResults) else results


def _num(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _series(stats: dict, summary: dict, tasks: list[str], note_of) -> tuple[list[float], list[float], list[float],
                                                                             list[str | None]]:
    """Per-task deltas (points) and their CI half-widths, then the mean's; a note per task where
    the bar needs one (an arm that ran the task uncalibrated)."""
    vals, lo, hi, notes = [], [], [], []
    for t in tasks:
        c = stats[t]
        d, cl, ch = _num(c["delta"]), _num(c["ci_low"]), _num(c["ci_high"])
        vals.append(100 * d)
        lo.append(100 * (d - cl))
        hi.append(100 * (ch - d))
        notes.append(note_of(c))
    d, cl, ch = _num(summary["mean_delta"]), _num(summary["ci_low"]), _num(summary["ci_high"])
    return vals + [100 * d], lo + [100 * (d - cl)], hi + [100 * (ch - d)], notes + [None]


def _panel(ax, series: list[tuple[str, tuple]], labels: list[str], ylabel: str) -> None:
    """Grouped bars, one group per task (and the mean), one bar per series, CI error bars."""
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (label, (vals, lo, hi, notes)) in enumerate(series):
        pos = x - 0.4 + width * (i + 0.5)
        for j, note in enumerate(notes):
            if note:  # a zero bar would read as "calibrated, no change"
                ax.text(pos[j], 0, note, rotation=90, ha="center", va="bottom", fontsize=7, color="#495057")
        colors: list[str] | tuple[float, float, float, float]
        if len(series) == 1:  # one series: colour says the sign
            colors = ["#2b8a3e" if v > 0 else "#c92a2a" if v < 0 else "#868e96" for v in vals]
        else:  # several: one colour per series, so the legend reads right (the zero line shows the sign)
            colors = plt.get_cmap("tab10")(i % 10)
        ax.bar(pos, vals, width * 0.9, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=3, color=colors,
               edgecolor="black", linewidth=0.5, label=label, alpha=0.85)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend()


def write_chart(path: Path, results: EvalResults | dict) -> Path | None:
    """Grouped bars of per-task deltas (percentage points) with CI error bars, plus the mean: every
    calibrated arm against the baseline, and below, each ``comparisons`` pair (treatment minus
    reference) where the config asks for them."""
    results = as_dict(results)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a, info in results["arms"].items() if not info["baseline"]]
    tasks = list(results["tasks"])
    if not arms or not tasks:
        return None
    labels = tasks + ["mean"]
    conf = int(round(100 * results["settings"]["confidence"]))
    vs_base = []
    for arm in arms:
        stats = {t: results["tasks"][t]["comparisons"][arm] for t in tasks}
        label = f"{arm} (per-task profiles)" if results["arms"][arm].get("per_task") else arm
        vs_base.append((label, _series(stats, results["summary"][arm], tasks,
                                       lambda c: None if c.get("calibrated", True) else "uncalibrated (no profile)")))
    pairs = results.get("comparisons") or []
    vs_pair = [(f"{p['treatment']} - {p['reference']}",
                _series(p["tasks"], p["summary"], tasks,
                        lambda c: "uncalibrated in both" if not (c["treatment_calibrated"] or c["reference_calibrated"])
                        else None)) for p in pairs]
    rows = 2 if vs_pair else 1
    fig, axes = plt.subplots(rows, 1, figsize=(max(6.0, 1.1 * len(labels) + 2), 4.2 * rows), squeeze=False)
    _panel(axes[0][0], vs_base, labels, f"accuracy delta vs baseline (points, {conf}% CI)")
    title = f"{results.get('name') or 'eval'}: {results['model']['name']}"
    if len(arms) == 1 and results["arms"][arms[0]].get("per_task"):  # no legend to say it
        title += f" ({arms[0]}: per-task profiles)"
    axes[0][0].set_title(title)
    if vs_pair:
        _panel(axes[1][0], vs_pair, labels, f"accuracy difference between arms (points, {conf}% CI)")
        axes[1][0].set_title("pairs of calibrated arms (same documents): " + ", ".join(lbl for lbl, _ in vs_pair))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
