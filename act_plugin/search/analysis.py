"""What a search's numbers say beyond the chosen set: how well the first-order ranking agrees
with the exact scores (:func:`ranking_agreement`), and which search-part objective predicts
the validation accuracy change of single heads (:func:`objective_comparison`, over heads)
and of (head, task) pairs (:func:`objective_comparison_per_task`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from act_plugin.search.evaluator import val_part
from act_plugin.search.scoring import OBJECTIVES, objective_gain
from act_plugin.search.steps import Head, Prepared, Verification

__all__ = ["ranking_agreement", "objective_comparison", "objective_comparison_per_task"]


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
            rec = prep.store.get_set(prep.exact_backend, val_part(t), [h])
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

