"""``act-plugin search CONFIG.yaml [options]``: find which heads to calibrate.

Writes the ACT config (if a set passes validation), the per-task engine config (``per_task``),
a JSON report of every candidate's scores with a Markdown summary and a per-head gain heatmap
into the run folder ``runs/<name>/`` (``--run-dir``); ``--update-shipped`` writes them to the
config's ``output`` / ``profiles_output`` / ``report`` / ``heatmap`` paths instead (for the
shipped search config: the checkout's searched profiles and ``docs/search/``). Partial
results go to ``state_dir`` so an interrupted search resumes on rerun.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="search config (YAML), e.g. configs/search_smollm2.yaml")
    parser.add_argument("--run-dir", default=None,
                        help="folder the outputs are written to (overrides 'run_dir'; default runs/<name>)")
    parser.add_argument("--update-shipped", action="store_true",
                        help="write to the config's output/profiles_output/report/heatmap paths instead of the run "
                        "folder (for configs/search_smollm2.yaml: overwrites the shipped profiles and docs/search/)")
    parser.add_argument("--output", "-o", default=None,
                        help="shared ACT config path (overrides 'output'; in the run folder only its file name counts)")
    parser.add_argument("--report", default=None, help="JSON report path (overrides 'report'; default: "
                        "<output>.search.json; in the run folder only its file name counts)")
    parser.add_argument("--heatmap", default=None, help="heatmap PNG path (overrides 'heatmap'; default: "
                        "<output>.heatmap.png; in the run folder only its file name counts)")
    parser.add_argument("--method", choices=["fast", "exact"], default=None, help="overrides 'method'")
    parser.add_argument("--score", choices=["margin", "clipped_margin", "accuracy", "worst_task"], default=None,
                        help="search-part objective (overrides 'score')")
    parser.add_argument("--validation-per-task", type=int, default=None,
                        help="validation prompts per task, held out of the search part (overrides)")
    parser.add_argument("--alpha", type=float, default=None, help="per-task paired test level on validation")
    parser.add_argument("--gain", choices=["positive", "significant"], default=None,
                        help="validation gain rule (overrides 'gain'): 'significant' also needs a task improved at "
                        "p < alpha")
    parser.add_argument("--per-task", action="store_true", help="also one head set per task, as engine profiles")
    parser.add_argument("--profiles-output", default=None, help="engine config with the per-task profiles")
    parser.add_argument("--top-k", type=int, default=None, help="fast: candidates scored exactly (overrides)")
    parser.add_argument("--verify", choices=["hf", "vllm"], default=None, help="fast: exact-score backend")
    parser.add_argument("--check-layers", default=None,
                        help="fast: layers whose heads are all scored exactly to check the ranking, e.g. '4,15,26'")
    parser.add_argument("--candidates", default=None, help="candidate heads, compact spec (e.g. '2-28:*')")
    parser.add_argument("--samples-per-task", type=int, default=None, help="search-part prompts per task")
    parser.add_argument("--tasks", default=None, help="comma-separated calibration tasks (overrides)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the calibration draw")
    parser.add_argument("--data-parallel", default=None, metavar="N",
                        help="score candidates in N replicas side by side (overrides 'data_parallel'; a block of "
                        "cores each on CPU, their own GPUs on CUDA)")
    parser.add_argument("--no-combine", action="store_true", help="skip the combined-set step")
    parser.add_argument("--state-dir", default=None, help="partial results folder (overrides 'state_dir')")
    parser.add_argument("--fresh", action="store_true", help="ignore partial results of an earlier run")
    parser.add_argument("--data-dir", default=None, help="offline data folder (overrides)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--check", action="store_true", help="validate the config and the data, run nothing")


def run(args: argparse.Namespace) -> int:
    from act_plugin.search.config import load_search_config

    overrides = {
        "output": args.output, "report": args.report, "heatmap": args.heatmap, "method": args.method,
        "score": args.score, "fast.top_k": args.top_k, "fast.verify": args.verify,
        "fast.check_layers": args.check_layers, "candidates": args.candidates,
        "samples_per_task": args.samples_per_task, "tasks": args.tasks.split(",") if args.tasks else None,
        "seed": args.seed, "combine": False if args.no_combine else None, "state_dir": args.state_dir,
        "data_dir": args.data_dir, "validation_per_task": args.validation_per_task, "alpha": args.alpha,
        "gain": args.gain, "per_task": True if args.per_task else None, "profiles_output": args.profiles_output,
        "run_dir": args.run_dir, "data_parallel": args.data_parallel,  # '2': the search config reads it
    }
    cfg = load_search_config(args.config, **overrides)
    from act_plugin.tasks import check_data, resolve_data_dir

    data_dir, how = resolve_data_dir(cfg.data_dir)
    check_data(cfg.tasks, data_dir, splits=("train",))
    paths = cfg.destinations(args.update_shipped)
    if args.check:
        if cfg.data_parallel > 1:
            from act_plugin.vllm.placement import replica_environments

            replica_environments(cfg.data_parallel, cfg.engine)  # more replicas than cores or GPUs: refused
        print(f"{args.config}: OK -- method {cfg.method}, score {cfg.score}, tasks {cfg.tasks} "
              f"({cfg.samples_per_task} search + {cfg.validation_per_task} validation prompts per task, train "
              f"splits), data {data_dir} ({how}); writes "
              + ("(--update-shipped) " if args.update_shipped else "(run folder) ")
              + f"{paths.output} (if a shared set passes), "
              + (f"{paths.profiles}, " if cfg.per_task else "") + f"{paths.report} (+ .md), {paths.heatmap}"
              + (f"; {cfg.data_parallel} scoring replicas" if cfg.data_parallel > 1 else ""))
        return 0
    from act_plugin.search.run import run_search

    res = run_search(cfg, progress=not args.no_progress, resume=not args.fresh, update_shipped=args.update_shipped)
    _print_result(res)
    return 0


def _print_result(res) -> None:
    r = res.report
    sel = r["selected"]
    if res.config is not None and res.config.rule != "act":  # a search over rules chose another rule's set
        print(f"shared set, rule {res.config.rule} (chosen over ACT's on validation): {res.config.to_dict()}")
    elif res.config is not None:
        print(f"shared set, {sel['count']} heads: {res.config.to_dict()['heads']}")
    else:
        print(f"NO shared head set passed validation ({sel['note']}); {res.output} not written")
    print(f"search part {r['score']}: gain {sel['delta_score']:+.4f}")
    v = r.get("validation")
    if v and v["shared"]["decision"]:
        d = v["shared"]["decision"]
        print("validation accuracy (paired, per task): " + ", ".join(
            f"{t} {e['delta'] * 100:+.1f} pt (n={e['n']}, p={e['mcnemar_p']:.2g})" for t, e in d["per_task"].items()))
    if res.profiles_path is not None:
        rules = r.get("rules")
        without = rules["comparison"]["tasks_without_profile"] if rules else (v or {}).get("tasks_without_profile")
        named = [f"{t} ({p.rule})" for t, p in sorted(res.profiles.items())] if rules else sorted(res.profiles)
        print(f"per-task profiles: {named or 'none'}; no profile for {without or 'none'} -> {res.profiles_path}")
    print(f"wall time {r['timing']['total_s']:.1f}s")
    print(f"report: {res.report_path}\nheatmap: {res.heatmap_path}")
