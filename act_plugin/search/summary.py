"""Readable summary (Markdown) of a search report (the JSON written by ``run_search``).

Everything here is computed from the report dict alone, so ``act-plugin search`` writes it
next to the JSON and it can be regenerated from any saved report.
"""

from __future__ import annotations

from typing import Any

from act_plugin.stats import describe_mde

__all__ = ["report_markdown"]


def _heads(heads: dict[str, list[int]] | list) -> str:
    if isinstance(heads, dict):
        by_layer = sorted(heads.items(), key=lambda kv: int(kv[0]))
        return ", ".join(f"L{lyr}: {','.join(map(str, hs))}" for lyr, hs in by_layer)
    return ", ".join(f"L{a}H{b}" for a, b in heads)


def _fmt(x: Any, spec: str = "+.4f") -> str:
    return "-" if x is None else format(x, spec)


def _pt(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.2f} pt"


def report_markdown(report: dict[str, Any], top: int = 20) -> str:
    """The Markdown summary of a search report, one section after the other."""
    lines = _overview(report) + _dedup(report) + _search_part(report) + _validation(report) + _rules(report)
    lines += _objectives(report) + _objectives_per_task(report) + _ranking(report) + _exact_heads(report, top)
    return "\n".join(lines) + "\n"


def _overview(r: dict[str, Any]) -> list[str]:
    tm = r["timing"]
    return [
        f"# Head search: {r['name']}",
        "",
        f"- model `{r['model']}` ({r['shape']['layers']} layers x {r['shape']['heads']} heads, "
        f"{r['shape']['kv_heads']} KV heads); beta {r['beta']}, threshold {r['threshold']}",
        f"- training splits divided (seed {r['seed']}) into a SEARCH part of {r['prompts']} prompts "
        f"({r['prompt_tokens']} tokens: " + ", ".join(f"{t} {n}" for t, n in r["tasks"].items())
        + f") and a VALIDATION part of {r['validation_prompts']} prompts ("
        + ", ".join(f"{t} {n}" for t, n in r["validation_tasks"].items()) + "); rows in the JSON report",
        f"- method `{r['method']}`" + (f" (first-order ranking of every head, top {r['top_k']} scored exactly)"
                                       if r["method"] == "fast" else " (every candidate scored exactly)")
        + f", exact scores in `{r['exact_backend']}`, objective `{r['score']}` on the search part",
        f"- wall time {tm['total_s'] / 60:.1f} min"
        + "".join(f"; {k[:-2].replace('_', ' ')} {tm[k]:.0f} s" for k in
                  ("ranking_s", "baseline_s", "verify_s", "check_s", "validate_singles_s", "combine_s",
                   "per_task_s") if (tm.get(k) or 0) >= 0.5)
        + f" (load average {tm['loadavg_start'][0]:.1f} at start, {tm['cpu_count']} CPUs)"
        + (f"; this run resumed {tm['resumed_records']} stored results of an interrupted run, so its wall time "
           "covers only the rest" if tm.get("resumed_records") else ""),
    ]


def _dedup(r: dict[str, Any]) -> list[str]:
    d = (r.get("split") or {}).get("deduplication")
    if not d:
        return []
    lines = ["", "## Texts shared with evaluated splits", "",
             f"Rule: {d['rule']}. Checked against the evaluated split of {len(d['evaluated_splits'])} tasks"
             + (f"; NOT checked (data missing): {', '.join(d['not_checked'])}" if d["not_checked"] else "") + ".",
             "", "| task | drawn documents dropped | held by the evaluated split of |", "|---|---:|---|"]
    for t, x in d["tasks"].items():
        held = ", ".join(f"{e} {n}" for e, n in x["by_evaluated_task"].items()) or "-"
        lines.append(f"| {t} | {x['dropped']} | {held} |")
    return lines


def _search_part(r: dict[str, Any]) -> list[str]:
    base, sel = r["baseline"], r["selected"]
    return [
        "",
        "## Search part",
        "",
        "| | accuracy | margin |",
        "|---|---:|---:|",
        f"| baseline (no calibration) | {base['accuracy']:.4f} | {base['margin']:.4f} |",
        f"| shared set ({sel['count']} heads) | {sel['scores']['accuracy']:.4f} | {sel['scores']['margin']:.4f} |",
        "",
        f"Shared set: {_heads(sel['heads']) or '(none)'}."
        + (f" {sel['note'][0].upper()}{sel['note'][1:]}." if sel.get("note") else ""),
        "",
        f"{len(r['kept'])} exactly scored heads gain alone on the search part.",
    ]


def _validation(r: dict[str, Any]) -> list[str]:
    v = r.get("validation")
    if not v:
        return []
    lines = ["", f"## Validation (paired per task, exact McNemar, alpha {v['alpha']})", "", "Rule: " + v["rule"] + ".",
             ""]
    dec = (v["shared"] or {}).get("decision")
    lines += ["| task | n | MDE (10% flips) | baseline | shared set | delta | + / - | p | "
              + ("per-task set (heads): delta |" if v["per_task"] else ""),
              "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if v["per_task"] else "")]
    for t, base_acc in v["baseline_accuracy"].items():
        e = dec["per_task"][t] if dec else None
        row = (f"| {t} | {v['mde'][t]['n']} | {describe_mde(v['mde'][t]['at_10pct_discordance'])} | "
               f"{base_acc * 100:.1f} | " + (f"{e['accuracy'] * 100:.1f} | {e['delta'] * 100:+.1f} | "
                                             f"{e['better']} / {e['worse']} | {e['mcnemar_p']:.3g} |"
                                             if e else "- | - | - | - |"))
        if v["per_task"]:
            pt = v["per_task"].get(t) or {}
            pd = pt.get("decision")
            row += f" {pd['per_task'][t]['delta'] * 100:+.1f} ({len(pt['heads'])} heads) |" if pd else " no profile |"
        lines.append(row)
    steps = (v["shared"] or {}).get("steps") or []
    if steps:
        lines += ["", "Combined-set steps (forward, each judged on validation):", ""]
        lines += [f"- add L{s['add'][0]}H{s['add'][1]}: mean {s['mean_gain'] * 100:+.2f} pt -> "
                  f"{'accepted' if s['accepted'] else 'refused: ' + s['why']}" for s in steps]
    return lines


def _objectives(r: dict[str, Any]) -> list[str]:
    oc = r.get("objective_comparison")
    if not oc:
        return []
    lines = ["", f"## Which search-part objective predicts validation accuracy ({oc['heads']} single heads)",
             "", "| objective | Spearman vs validation accuracy gain | kept | kept: mean validation gain | "
             "kept: share helping | top-3: mean validation gain |", "|---|---:|---:|---:|---:|---:|"]
    for name, o in oc["objectives"].items():
        lines.append(f"| {name} | {_fmt(o['spearman_vs_validation_accuracy'], '+.3f')} | {o['kept']} | "
                     f"{_pt(o['kept_mean_validation_accuracy_gain'])} | "
                     f"{_fmt(o['kept_share_helping_on_validation'], '.2f')} | "
                     f"{o['top3_mean_validation_accuracy_gain'] * 100:+.2f} pt |")
    return lines


def _objectives_per_task(r: dict[str, Any]) -> list[str]:
    op = r.get("objective_comparison_per_task")
    if not op:
        return []
    lines = ["", f"## Which search-part objective predicts validation accuracy per task ({op['pairs']} "
             "(head, task) pairs scored on validation)", "",
             "| objective | Spearman vs validation accuracy change | sign agreement | kept (gain > 0) | "
             "kept: mean validation change | kept: share helping |", "|---|---:|---:|---:|---:|---:|"]
    for name, o in op["objectives"].items():
        lines.append(f"| {name} | {_fmt(o['spearman_vs_validation_accuracy'], '+.3f')} | "
                     f"{o['sign_agreement']:.2f} | {o['kept']} | "
                     f"{_pt(o['kept_mean_validation_accuracy_change'])} | "
                     f"{_fmt(o['kept_share_helping_on_validation'], '.2f')} |")
    return lines


def _ranking(r: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    chk = r.get("ranking_check")
    if chk and "spearman" in chk.get("vs_exact_margin", {}):
        m = chk["vs_exact_margin"]
        lines += [
            "",
            "## Ranking check (first-order estimate vs exact, every head of the check layers)",
            "",
            f"Layers {', '.join(map(str, chk['layers']))}: {m['n']} heads, Spearman {m['spearman']:.3f}, "
            f"sign agreement {m['sign_agreement']:.2f}, top-k overlap "
            + ", ".join(f"top-{k} {v:.2f}" for k, v in m["topk_overlap"].items()) + ".",
        ]
    rv = r.get("ranking_vs_verified")
    if rv and "spearman" in rv:
        lines += ["", f"Over all {rv['n']} exactly scored heads: Spearman {rv['spearman']:.3f}, sign agreement "
                      f"{rv['sign_agreement']:.2f}."]
    return lines


def _exact_heads(r: dict[str, Any], top: int) -> list[str]:
    score = r["score"]
    rows = sorted((c for c in r["candidates"] if "exact" in c), key=lambda c: -c["exact"]["gain"])
    lines = [
        "",
        f"## Exactly scored heads (best {min(top, len(rows))} of {len(rows)} by exact {score} gain, search part)",
        "",
        f"| head | rank (estimate) | estimated gain | exact {score} gain | exact margin gain | exact accuracy gain "
        "| why | kept |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    base_acc = r["baseline"]["accuracy"]
    for c in rows[:top]:
        e = c["exact"]
        lines.append(f"| L{c['layer']}H{c['head']} | {c.get('rank') or '-'} | {_fmt(c.get('estimate'))} | "
                     f"{e['gain']:+.4f} | {e['delta_margin']:+.4f} | {e['accuracy'] - base_acc:+.4f} | {e['why']} | "
                     f"{'yes' if c.get('kept') else 'no'} |")
    return lines


def _arm_cell(arm: dict[str, Any] | None, task: str | None) -> str:
    if arm is None:
        return "-"
    delta = arm["gain"] if task is None else arm["per_task_delta"][task]
    return f"{delta * 100:+.1f}" + ("" if task is None else f" (p {arm['per_task_p'][task]:.2g})")


def _both_cell(both: dict[str, Any], task: str | None) -> str:
    if not both.get("evaluated"):
        return "- (" + both["why"] + ")"
    delta = both["gain"] if task is None else both["per_task_delta"][task]
    verdict = "accepted" if both["accepted"] else "refused"
    return f"{delta * 100:+.1f} ({verdict}{', beats the chosen set' if both['beats_chosen'] else ''})"


def _rules(r: dict[str, Any]) -> list[str]:
    """ACT and first_token side by side (only in a search over rules)."""
    rules = r.get("rules")
    if not rules:
        return []
    comp, ft = rules["comparison"], rules["first_token"]
    opt = ft["options"]
    lines = ["", "## Rules per task (validation accuracy change, points)", "",
             f"first_token grid: gammas {', '.join(f'{g:g}' for g in opt['gammas'])} over {ft['candidate_heads']} "
             f"heads ({ft['ranked']} (head, gamma) ranked to first order, {len(ft['exact'])} candidates scored "
             f"exactly, {sum(x['kept'] for x in ft['exact'])} gain on the search part). Choice rule: "
             f"{comp['choice_rule']}. 'both': the two accepted sets in one forward (a check: an engine profile "
             "carries one rule).", "",
             "| task | none (accuracy) | ACT | first_token | both | chosen |", "|---|---:|---:|---:|---|---|"]
    rows = [(t, row, t) for t, row in comp["per_task"].items()] + [("(shared set)", comp["shared"], None)]
    for name, row, task in rows:
        acc = row["none"]["accuracy"]
        base = acc[task] * 100 if task else sum(acc.values()) / len(acc) * 100
        ft_sets = f" {', '.join(row['first_token']['sets'])}" if row["first_token"] else ""
        lines.append(f"| {name} | {base:.1f} | {_arm_cell(row['act'], task)} | "
                     f"{_arm_cell(row['first_token'], task)}{ft_sets} | {_both_cell(row['both'], task)} | "
                     f"{row['chosen']} |")
    return lines
