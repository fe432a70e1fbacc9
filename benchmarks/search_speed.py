"""Wall time of a full single-head sweep (method ``fast``) of a model's heads.

    python benchmarks/search_speed.py                       # SmolLM2-135M, 30 x 9 heads, ~300 prompts
    python benchmarks/search_speed.py --top-k 16 --verify hf --json runs/search_speed.json

Runs ``act-plugin search`` (method fast: one first-order ranking pass over every head, then
the top-K candidates scored exactly, then the combined-set step) from scratch (fresh
partial-results folder) on the ACT classification suite's TRAINING splits, and prints the
measured wall time with its phases, the machine load (``os.getloadavg()``) before and after,
and the brute-force time extrapolated from the measured exact scores (one full calibration
pass per candidate x every candidate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

TASKS = ["sst2", "sst5", "mr", "subj", "agnews", "trec", "cb", "dbpedia"]


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="path or embedded model name")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--samples-per-task", type=int, default=38, help="38 x 8 tasks = 304 prompts")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--verify", choices=["hf", "vllm"], default="vllm")
    ap.add_argument("--score", choices=["margin", "clipped_margin", "accuracy", "worst_task"], default="margin")
    ap.add_argument("--validation-per-task", type=int, default=0,
                    help="validation prompts per task (0: the single-head sweep alone, as timed before)")
    ap.add_argument("--candidates", default=None, help="compact head spec (default: every head)")
    ap.add_argument("--no-combine", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--state-dir", default=None, help="keep the partial results here (started fresh either way); "
                    "a later `act-plugin search` with the same settings and state_dir reuses them")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    return ap.parse_args()


def main() -> int:
    args = _parse_args()
    from act_plugin.search.config import load_search_config
    from act_plugin.search.run import run_search

    out = tempfile.mkdtemp(prefix="act-search-speed-")
    cfg = load_search_config({
        "name": "search-speed", "model": args.model, "tasks": args.tasks.split(","),
        "samples_per_task": args.samples_per_task, "validation_per_task": args.validation_per_task,
        "score": args.score, "method": "fast",
        "candidates": args.candidates, "combine": not args.no_combine,
        "fast": {"top_k": args.top_k, "verify": args.verify},
        "hf": {"threads": args.threads} if args.threads else {},
        "output": os.path.join(out, "searched.yaml"), "run_dir": out, "state_dir": args.state_dir or os.path.join(out, "state"),
    })
    load0 = os.getloadavg()
    t = time.perf_counter()
    res = run_search(cfg, progress=args.progress, resume=False)
    wall = time.perf_counter() - t
    load1 = os.getloadavg()
    figures = _figures(args, res.report, wall, load0, load1)
    _print_figures(args, res.report, figures)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)
    return 0


def _figures(args: argparse.Namespace, r: dict, wall: float, load0, load1) -> dict:
    """The figures the benchmark reports (and writes with --json), from the search's report."""
    tm = r["timing"]
    return {
        "model": args.model, "candidates": len(r["candidates"]), "prompts": r["prompts"],
        "prompt_tokens": r["prompt_tokens"],
        "top_k_verified": args.top_k, "verify": args.verify, "score": args.score, "wall_s": wall,
        "phases_s": {k: v for k, v in tm.items() if k.endswith("_s") and k not in
                     ("total_s", "brute_force_extrapolated_s", "full_pass_s_median")},
        "sweep_s": sum(tm.get(k, 0.0) for k in ("load_hf_s", "ranking_s", "engine_start_s", "baseline_s",
                                                 "verify_s")),
        "exact_evaluations": tm["exact_evaluations"],
        "brute_force_extrapolated_s": tm["brute_force_extrapolated_s"],
        "full_pass_s_median": tm["full_pass_s_median"],
        "heads_selected": r["selected"]["count"], "delta_score": r["selected"]["delta_score"],
        "loadavg_before": load0, "loadavg_after": load1, "cpu_count": os.cpu_count(),
        "torch_threads": tm["torch_threads"],
    }


def _print_figures(args: argparse.Namespace, r: dict, figures: dict) -> None:
    tm = r["timing"]
    wall, load0, load1 = figures["wall_s"], figures["loadavg_before"], figures["loadavg_after"]
    print(f"full single-head sweep: {figures['candidates']} heads x {r['prompts']} prompts "
          f"({r['prompt_tokens']} tokens), "
          f"method fast, top-{args.top_k} verified exactly in {args.verify}")
    print(f"  wall time: {wall:.1f} s ({wall / 60:.1f} min)  [target: < 30 min]")
    print(f"  single-head sweep (load + ranking + baseline + top-{args.top_k} exact): {figures['sweep_s']:.1f} s; "
          f"combined-set step: {tm.get('combine_s', 0.0):.1f} s")
    for k, v in figures["phases_s"].items():
        if isinstance(v, (int, float)) and v is not None:
            print(f"    {k:<28} {v:8.1f} s")
    print(f"  exact evaluations: {tm['exact_evaluations']} (median full calibration pass "
          f"{tm['full_pass_s_median']:.1f} s)")
    if tm["brute_force_extrapolated_s"]:
        print(f"  brute force (every head alone, one full pass each) extrapolated: "
              f"{tm['brute_force_extrapolated_s'] / 3600:.2f} h")
    print(f"  heads selected: {r['selected']['count']}, calibration {args.score} delta "
          f"{r['selected']['delta_score']:+.4f}")
    print(f"  load average before {tuple(round(x, 2) for x in load0)}, after {tuple(round(x, 2) for x in load1)} "
          f"on {os.cpu_count()} CPUs (torch threads {tm['torch_threads']})")


if __name__ == "__main__":
    sys.exit(main())
