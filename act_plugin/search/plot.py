"""Per-head gain heatmap (layers x heads, diverging colormap, kept/selected heads marked)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["gain_heatmap"]


def _panel(ax, data: np.ndarray, title: str, kept: Iterable, selected: Iterable, label: str):
    import matplotlib.colors as mcolors

    finite = data[np.isfinite(data)]
    vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    cmap = __import__("matplotlib").colormaps["RdBu"].with_extremes(bad="#e6e6e6")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=mcolors.TwoSlopeNorm(0.0, -vmax, vmax),
                   aspect="auto", interpolation="nearest")
    L, H = data.shape
    ax.set_xticks(range(H))
    ax.set_yticks(range(0, L, 1 if L <= 32 else max(1, L // 16)))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    kept = list(kept)
    if kept:
        ax.scatter([h for _, h in kept], [lyr for lyr, _ in kept], marker="o", s=28, facecolors="none",
                   edgecolors="black", linewidths=1.0, label="kept (beats baseline alone)")
    selected = list(selected)
    if selected:
        ax.scatter([h for _, h in selected], [lyr for lyr, _ in selected], marker="*", s=40, color="gold",
                   edgecolors="black", linewidths=0.5, label="final set")
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    cb.set_label(label, fontsize=8)
    if kept or selected:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize=7, ncol=2, frameon=False)


def gain_heatmap(path: str | Path, estimate: np.ndarray | None, exact: np.ndarray, kept: Iterable,
                 selected: Iterable, title: str, score: str) -> Path:
    """``estimate``/``exact``: ``[layers, heads]`` gains over the baseline (NaN = not computed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept, selected = list(kept), list(selected)
    panels = [] if estimate is None else [(estimate, "first-order estimate (all heads)", "est. delta margin")]
    panels.append((exact, f"exact gain ({score}), heads scored exactly", f"delta {score}"))
    L, H = exact.shape
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 0.42 * H * len(panels) + 1.2 * len(panels),
                                                        2.0 + 0.22 * L), squeeze=False)
    for ax, (data, sub, label) in zip(axes[0], panels):
        _panel(ax, data, sub, kept, selected, label)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    import io

    from act_plugin.atomic_files import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())
