"""ACT's and first_token's sets side by side, per task: none, ACT, first_token, both.

An engine profile carries ONE rule, so "both" cannot be shipped as one profile. The two
accepted sets are therefore compared side by side, and "both" is a check, not a candidate:

* **chosen** (what the written config gets): ``first_token`` if its set was accepted on
  validation and its validation gain beats ACT's (or ACT has no accepted set); else ACT's
  accepted set; else nothing (the task runs uncalibrated). The gain compared is the mean
  per-task validation accuracy change of each accepted set (for a per-task set: that task's
  change) -- the same numbers the acceptance rule judged.
* **both**: the two accepted sets applied in the same forward (the transformers search path,
  ACT heads and first_token heads; sets sharing a head are not combined) and judged by the same
  paired rule against the uncalibrated model. It tells whether shipping one rule leaves a gain
  on the table (``beats_chosen``); the validation part has already been used to choose, so a
  small "both" advantage is optimistic.
"""

from __future__ import annotations

from typing import Any

from act_plugin.search.evaluator import Evaluator
from act_plugin.search.first_token import FirstTokenSearch, unit_label, unit_scales
from act_plugin.search.report import heads_map
from act_plugin.search.select import Decision, Selection, judge
from act_plugin.search.steps import Combination, Prepared, Verification

__all__ = ["CHOICE_RULE", "compare_rules", "rules_section"]

CHOICE_RULE = ("first_token if its set is accepted on validation and its validation gain is larger than the ACT "
               "set's (or ACT has no accepted set); else ACT's accepted set; else none")


def _arm(sel: Selection) -> dict[str, Any] | None:
    d = sel.decision
    if not sel.heads or d is None:
        return None
    return {"gain": d.mean_gain, "per_task_delta": {t: e.delta for t, e in d.effects.items()},
            "per_task_p": {t: e.p for t, e in d.effects.items()}}


def _choose(act: Selection, ft: Selection) -> str:
    a, f = act.decision if act.heads else None, ft.decision if ft.heads else None
    if f is not None and (a is None or f.mean_gain > a.mean_gain):
        return "first_token"
    return "act" if a is not None else "none"


def _both(ev: Evaluator, ver: Verification, act: Selection, ft: Selection, tasks: list[str] | None,
          alpha: float, significant: bool, chosen_gain: float) -> dict[str, Any]:
    if not act.heads or not ft.heads:
        return {"evaluated": False, "why": "only one rule (or none) has an accepted set"}
    shared = sorted(set(map(tuple, act.heads)) & set(unit_scales(ft.heads)))
    if shared:
        return {"evaluated": False, "why": "the sets share heads " + ", ".join(f"L{a}H{b}" for a, b in shared)}
    trial = ev.validation_correct(act.heads, "both", tasks, unit_scales(ft.heads))
    base = {t: ver.validation_baseline[t] > 0 for t in trial}
    d: Decision = judge([], base, trial, alpha, significant)
    return {"evaluated": True, "accepted": d.accepted, "gain": d.mean_gain, "reason": d.reason,
            "per_task_delta": {t: e.delta for t, e in d.effects.items()},
            "per_task_p": {t: e.p for t, e in d.effects.items()},
            "beats_chosen": bool(d.accepted and d.mean_gain > chosen_gain)}


def _row(ev: Evaluator, ver: Verification, act: Selection, ft: Selection, tasks: list[str] | None,
         alpha: float, significant: bool) -> dict[str, Any]:
    chosen = _choose(act, ft)
    gain = {"act": act.decision.mean_gain if act.decision else 0.0,
            "first_token": ft.decision.mean_gain if ft.decision else 0.0, "none": 0.0}[chosen]
    names = tasks or list(ver.validation_baseline)
    return {
        "none": {"accuracy": {t: float((ver.validation_baseline[t] > 0).mean()) for t in names}},
        "act": None if _arm(act) is None else {"heads": {str(k): v for k, v in heads_map(act.heads).items()},
                                               **(_arm(act) or {})},
        "first_token": None if _arm(ft) is None else {"scale": {f"{a}:{b}": g for (a, b), g in
                                                               sorted(unit_scales(ft.heads).items())},
                                                      "sets": [unit_label(u) for u in ft.heads], **(_arm(ft) or {})},
        "both": _both(ev, ver, act, ft, tasks, alpha, significant, gain),
        "chosen": chosen,
    }


def compare_rules(prep: Prepared, ev: Evaluator, ver: Verification, comb: Combination,
                  ft: FirstTokenSearch) -> dict[str, Any]:
    """The shared row and one row per task (with ``per_task``): none / act / first_token / both / chosen."""
    alpha, significant = prep.cfg.alpha, prep.cfg.gain == "significant"
    out: dict[str, Any] = {"choice_rule": CHOICE_RULE,
                           "shared": _row(ev, ver, comb.shared, ft.shared, None, alpha, significant), "per_task": {}}
    for task, act_sel in comb.per_task.items():
        other = ft.per_task.get(task, Selection([], None))
        out["per_task"][task] = _row(ev, ver, act_sel, other, [task], alpha, significant)
    out["tasks_without_profile"] = sorted(t for t, r in out["per_task"].items() if r["chosen"] == "none")
    return out


def rules_section(prep: Prepared, ft: FirstTokenSearch, comparison: dict[str, Any]) -> dict[str, Any]:
    """The report's ``rules`` section: the first_token grid, its candidates and sets, and the comparison."""
    cfg = prep.cfg
    rank_of = {x: i + 1 for i, x in enumerate(sorted(ft.estimates, key=lambda x: (-ft.estimates[x], x)))}
    rows = []
    for u in ft.units:
        row: dict[str, Any] = {"candidate": unit_label(u), "why": ft.reasons[u], "gain": ft.gains[u],
                               "per_task_gain": ft.task_gains[u], "kept": u in ft.kept}
        if len(u) == 1:
            row["estimate"], row["rank"] = ft.estimates[u[0]], rank_of[u[0]]
        rows.append(row)
    return {
        "rules": list(cfg.rules),
        "first_token": {"options": cfg.first_token.model_dump(mode="json"), "candidate_heads": len(ft.heads),
                        "ranked": len(ft.estimates), "ranking_s": ft.ranking_seconds, "exact": rows,
                        "shared": ft.shared.to_dict(), "per_task": {t: s.to_dict() for t, s in ft.per_task.items()}},
        "comparison": comparison,
    }
