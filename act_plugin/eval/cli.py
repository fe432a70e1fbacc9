"""``act-plugin eval CONFIG.yaml [--output-dir DIR] [--limit N] ...``: run an A/B evaluation."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="eval config (YAML), e.g. configs/demo.yaml")
    parser.add_argument("--output-dir", "-o", default=None, help="results folder (default: the config's "
                        "output_dir, else runs/<name>; rerunning the same command resumes an interrupted run there)")
    parser.add_argument("--limit", default=None, help="documents per task, a fraction < 1, or 'all' "
                        "(overrides the config)")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (overrides the config)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="k in-context examples (overrides)")
    parser.add_argument("--data-dir", default=None, help="offline data folder (overrides; default $ACT_DATA_DIR "
                        "or ../shared/data)")
    parser.add_argument("--data-parallel", default=None, metavar="N", help="N engine replicas, each scoring "
                        "every N-th document (one per GPU; a block of cores each on CPU); overrides the config")
    parser.add_argument("--no-share-engine", action="store_true", help="one engine per arm")
    parser.add_argument("--verbose", "-v", action="store_true", help="keep lm-eval's and vLLM's info logs")
    parser.add_argument("--check", action="store_true", help="validate the config and the data files, run nothing")


def run(args: argparse.Namespace) -> int:
    from act_plugin.eval.config import load_eval_config
    from act_plugin.tasks import check_data, resolve_data_dir

    overrides = {
        "limit": args.limit,  # 'all', '50' or '0.1': the eval config reads it
        "tasks": args.tasks.split(",") if args.tasks else None,
        "num_fewshot": args.num_fewshot,
        "data_dir": args.data_dir,
        "share_engine": False if args.no_share_engine else None,
        "data_parallel": args.data_parallel,  # '2': the eval config reads it
    }
    cfg = load_eval_config(args.config, **overrides)
    data_dir, how = resolve_data_dir(cfg.data_dir)
    check_data(cfg.tasks, data_dir)
    for line in cfg.arm_notes():  # what each per-task arm calibrates, before anything runs
        print(line)
    if args.check:
        if cfg.data_parallel > 1:
            from act_plugin.eval.data_parallel import replica_environments

            replica_environments(cfg.data_parallel, cfg.engine)  # more replicas than cores or GPUs: refused
        print(f"{args.config}: OK -- arms {list(cfg.arms)}, tasks {cfg.tasks}, limit {cfg.limit}, "
              f"data {data_dir} ({how})" + (f", {cfg.data_parallel} replicas" if cfg.data_parallel > 1 else ""))
        return 0
    from act_plugin.eval.runner import run_eval

    result = run_eval(cfg, output_dir=args.output_dir, verbose=args.verbose)
    r = result.results
    print(f"\nresults: {result.output_dir}", file=sys.stderr)
    if result.reused:
        total = len(cfg.pieces)
        again = ""
        if len(result.reused) == total:
            again = (" (nothing re-run: results.json and report.md rewritten from the samples, with the config's "
                     "comparisons; delete the folder or pass another -o to run again)")
        print(f"resumed: {len(result.reused)} finished (arm, task) pieces reused of {total}{again}", file=sys.stderr)
    for arm, s in r.summary.items():
        uncal = f"; uncalibrated (no profile): {', '.join(s.uncalibrated_tasks)}" if s.uncalibrated_tasks else ""
        print(f"{arm} vs baseline: mean delta {_pts(s.mean_delta)} points "
              f"[{_pts(s.ci_low)}, {_pts(s.ci_high)}] over {len(r.tasks)} tasks "
              f"({s.improved} flips up, {s.worsened} down{uncal})")
    for pair in r.comparisons:
        mean = pair.summary
        print(f"{pair.treatment} vs {pair.reference}: mean delta {_pts(mean.mean_delta)} points "
              f"[{_pts(mean.ci_low)}, {_pts(mean.ci_high)}] over {len(r.tasks)} tasks "
              f"({mean.improved} flips up, {mean.worsened} down)")
    for w in r.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"report: {result.output_dir / 'report.md'}")
    return 0


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}"
