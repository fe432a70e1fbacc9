"""``deltas.png``: per-task accuracy deltas of every calibrated arm, with their CIs and the mean."""

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


def write_chart(path: Path, results: EvalResults | dict) -> Path | None:
    """Grouped bars of per-task deltas (percentage points) with CI error bars, plus the mean."""
    results = as_dict(results)
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
        pos = x - 0.4 + width * (i + 0.5)
        for j, t in enumerate(tasks):
            c = results["tasks"][t]["comparisons"][arm]
            if not c.get("calibrated", True):  # a zero bar would read as "calibrated, no change"
                ax.text(pos[j], 0, "uncalibrated (no profile)", rotation=90, ha="center", va="bottom", fontsize=7,
                        color="#495057")
            d, cl, ch = _num(c["delta"]), _num(c["ci_low"]), _num(c["ci_high"])
            vals.append(100 * d)
            lo.append(100 * (d - cl))
            hi.append(100 * (ch - d))
        s = results["summary"][arm]
        d, cl, ch = _num(s["mean_delta"]), _num(s["ci_low"]), _num(s["ci_high"])
        vals.append(100 * d)
        lo.append(100 * (d - cl))
        hi.append(100 * (ch - d))
        colors: list[str] | tuple[float, float, float, float]
        if len(arms) == 1:  # one arm: colour says the sign
            colors = ["#2b8a3e" if v > 0 else "#c92a2a" if v < 0 else "#868e96" for v in vals]
        else:  # several arms: one colour per arm, so the legend reads right (the zero line shows the sign)
            colors = plt.get_cmap("tab10")(i % 10)
        label = f"{arm} (per-task profiles)" if results["arms"][arm].get("per_task") else arm
        ax.bar(pos, vals, width * 0.9, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=3, color=colors,
               edgecolor="black", linewidth=0.5, label=label, alpha=0.85)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right")
    conf = int(round(100 * results["settings"]["confidence"]))
    ax.set_ylabel(f"accuracy delta vs baseline (points, {conf}% CI)")
    title = f"{results.get('name') or 'eval'}: {results['model']['name']}"
    if len(arms) == 1 and results["arms"][arms[0]].get("per_task"):  # no legend to say it
        title += f" ({arms[0]}: per-task profiles)"
    ax.set_title(title)
    if len(arms) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
