"""Readable summary (Markdown) of a search report (the JSON written by ``run_search``).

Everything here is computed from the report dict alone, so ``act-plugin search`` writes it
next to the JSON and it can be regenerated from any saved report.
"""

from __future__ import annotations

from typing import Any

__all__ = ["report_markdown"]


def _heads(heads: dict[str, list[int]] | list) -> str:
    if isinstance(heads, dict):
        by_layer = sorted(heads.items(), key=lambda kv: int(kv[0]))
        return ", ".join(f"L{lyr}: {','.join(map(str, hs))}" for lyr, hs in by_layer)
    return ", ".join(f"L{a}H{b}" for a, b in heads)


def _fmt(x: Any, spec: str = "+.4f") -> str:
    return "-" if x is None else format(x, spec)


def report_markdown(report: dict[str, Any], top: int = 20) -> str:
    r = report
    score = r["score"]
    base = r["baseline"]
    sel = r["selected"]
    tm = r["timing"]
    lines = [
        f"# Head search: {r['name']}",
        "",
        f"- model `{r['model']}` ({r['shape']['layers']} layers x {r['shape']['heads']} heads, "
        f"{r['shape']['kv_heads']} KV heads); beta {r['beta']}, threshold {r['threshold']}",
        f"- calibration set: {r['prompts']} training-split prompts ({r['prompt_tokens']} tokens): "
        + ", ".join(f"{t} {n}" for t, n in r["tasks"].items()) + f"; seed {r['seed']}",
        f"- method `{r['method']}`" + (f" (first-order ranking of every head, top {r['top_k']} scored exactly)"
                                       if r["method"] == "fast" else " (every candidate scored exactly)")
        + f", exact scores in `{r['exact_backend']}`, score `{score}`",
        f"- wall time {tm['total_s'] / 60:.1f} min"
        + "".join(f"; {k[:-2].replace('_', ' ')} {tm[k]:.0f} s" for k in
                  ("ranking_s", "baseline_s", "verify_s", "check_s", "combine_s") if (tm.get(k) or 0) >= 0.5)
        + f" (load average {tm['loadavg_start'][0]:.1f} at start, {tm['cpu_count']} CPUs)"
        + (f"; this run resumed {tm['resumed_records']} stored results of an interrupted run, so its wall time "
           "covers only the rest (benchmarks/search_speed.py times a search from scratch)"
           if tm.get("resumed_records") else ""),
        "",
        "## Result",
        "",
        "| | accuracy | margin |",
        "|---|---:|---:|",
        f"| baseline (no calibration) | {base['accuracy']:.4f} | {base['margin']:.4f} |",
        f"| selected set ({sel['count']} heads) | {sel['scores']['accuracy']:.4f} | {sel['scores']['margin']:.4f} |",
        "",
        f"Selected heads: {_heads(sel['heads']) or '(none)'}."
        + (f" {sel['note'][0].upper()}{sel['note'][1:]}." if sel.get("note") else ""),
        "",
        f"{len(r['kept'])} exactly scored heads beat the baseline alone; the combined-set step started from "
        f"{len(r['combine']['start'])} of them and made {r['combine']['evaluations']} evaluations"
        + ("" if r["combine"].get("complete", True) else " (stopped at its cap)") + ".",
    ]
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
    rows = [c for c in r["candidates"] if "exact" in c]
    rows.sort(key=lambda c: -c["exact"]["delta_margin"])
    lines += [
        "",
        f"## Exactly scored heads (best {min(top, len(rows))} of {len(rows)} by exact margin gain)",
        "",
        "| head | rank (estimate) | estimated margin gain | exact margin gain | exact accuracy gain | why | kept |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    base_acc = base["accuracy"]
    for c in rows[:top]:
        e = c["exact"]
        lines.append(f"| L{c['layer']}H{c['head']} | {c.get('rank') or '-'} | {_fmt(c.get('estimate_delta_margin'))} | "
                     f"{e['delta_margin']:+.4f} | {e['accuracy'] - base_acc:+.4f} | {e['why']} | "
                     f"{'yes' if c.get('kept') else 'no'} |")
    if tm.get("brute_force_extrapolated_s"):
        lines += ["", f"Brute force (every candidate alone, one full calibration pass each, "
                      f"{tm['full_pass_s_median']:.0f} s per pass here) would take about "
                      f"{tm['brute_force_extrapolated_s'] / 3600:.1f} h."]
    return "\n".join(lines) + "\n"
