"""Driving lm-evaluation-harness: start each engine, score each (arm, task) piece with
``lm_eval.simple_evaluate`` for every few-shot seed, and record the piece as it finishes.

With ``share_engine: true`` one engine serves every arm (the arm is chosen per request);
otherwise each arm gets its own engine, started one after the other, never two at once.
Before a piece is scored, the engine's calibration is read back and checked
(:func:`act_plugin.eval.engine_arms.read_back`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from act_plugin.eval import engine_arms
from act_plugin.eval import report as _report
from act_plugin.eval.config import EvalConfig
from act_plugin.eval.records import primary_metric, records_from_samples
from act_plugin.eval.run_state import RunState
from act_plugin.tasks import REPO_ROOT, write_lm_eval_tasks

__all__ = ["run_pieces", "tasks_folder"]

logger = logging.getLogger("act_plugin.eval")


class _DropNoise(logging.Filter):
    """lm-eval warns once per custom-dataset task about --metadata; ours use it on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Custom kwargs can be passed" not in msg


def _quiet_logs(verbose: bool) -> None:
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("lm_eval"):
            logging.getLogger(name).addFilter(_DropNoise())
    if not verbose:
        for name in ("lm_eval", "vllm"):
            logging.getLogger(name).setLevel(logging.WARNING)


def tasks_folder() -> Path:
    """The lm-eval task folder: the repository's ``evals/tasks`` or a freshly written copy."""
    shipped = REPO_ROOT / "evals" / "tasks"
    if (shipped / "utils.py").is_file():
        return shipped
    return write_lm_eval_tasks(Path(tempfile.mkdtemp(prefix="act-eval-tasks-")))


@functools.lru_cache(maxsize=4)
def _task_manager(folder: str, include_defaults: bool, data_dir: str):
    """lm-eval's task index (indexing the task folders takes seconds; it is the same for
    every run of a process with these arguments)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=folder, include_defaults=include_defaults, metadata={"data_dir": data_dir})


@contextlib.contextmanager
def _env_info_once():
    """Every ``simple_evaluate`` call collects torch's environment report (pip and conda
    subprocesses, over a second each time); it cannot change within a run, and the runner
    makes one call per (arm, task, seed), so it is collected once and reused."""
    try:
        import torch.utils.collect_env as collect_env
    except ImportError:  # pragma: no cover
        yield
        return
    original = collect_env.get_pretty_env_info
    collect_env.get_pretty_env_info = functools.lru_cache(maxsize=1)(original)
    try:
        yield
    finally:
        collect_env.get_pretty_env_info = original


def _numeric(metrics: dict) -> dict[str, float | None]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else float(v)
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(_report.clean(obj), default=str))


def _shutdown(lm: Any) -> None:
    try:
        engine = lm.model.llm_engine
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    except Exception as e:  # pragma: no cover - best effort
        logger.debug("engine shutdown: %s", e)
    del lm
    gc.collect()


class _Harness:
    """What every piece of one session shares: the config, the run state, lm-eval's task
    index and the engine arguments."""

    def __init__(self, cfg: EvalConfig, state: RunState, model_path: str, data_dir: Path,
                 lm_tasks: dict[str, str], seeds: list[int]):
        self.cfg, self.state, self.lm_tasks, self.seeds = cfg, state, lm_tasks, seeds
        # lm-eval's own task index (thousands of YAMLs) is only scanned when a config names one of them
        own = any(t.startswith("lm_eval:") for t in cfg.tasks)
        self.task_manager = _task_manager(str(tasks_folder()), own, str(data_dir))
        self.engine_kwargs = {**cfg.engine, "pretrained": model_path, "batch_size": cfg.batch_size,
                              "next_token": cfg.next_token}

    def start_engine(self, arm: str) -> Any:
        """An engine told ``arm``'s ACT setting (a shared engine: every arm's profiles)."""
        from act_plugin.eval.model import ActVLLM

        setting = engine_arms.engine_setting(self.cfg, arm)
        t0 = time.perf_counter()
        if setting is False:  # vanilla engine: ACT explicitly off (ACT_CONFIG ignored)
            lm = ActVLLM(additional_config={"act": False}, **self.engine_kwargs)
        else:
            lm = ActVLLM(act=setting, **self.engine_kwargs)
        self.state.engine_started(time.perf_counter() - t0)
        return lm

    def run_piece(self, lm: Any, arm: str, task: str, bar: Any) -> None:
        """Score (arm, task) for every seed after checking the engine's calibration; write its
        samples file and record it in the run state."""
        from lm_eval import simple_evaluate

        cfg, lm_task = self.cfg, self.lm_tasks[task]
        t0 = time.perf_counter()
        # per task: a per-task arm names another profile on every task
        lm.set_arm(engine_arms.request_value(cfg, arm, task))
        status = engine_arms.engine_status(lm)
        engine = engine_arms.read_back(cfg, arm, task, status)
        records: list[dict] = []
        lm_eval_out: dict[str, dict] = {}
        raw: dict[str, dict] = {}
        for seed in self.seeds:
            bar.set_description(f"arm {arm}, {task}, seed {seed}")
            res = simple_evaluate(
                model=lm, tasks=[lm_task], num_fewshot=cfg.num_fewshot, limit=cfg.lm_eval_limit,
                log_samples=True, task_manager=self.task_manager, fewshot_random_seed=seed, bootstrap_iters=1000,
            )
            if res is None:  # pragma: no cover - non-zero rank
                raise RuntimeError("lm-eval returned no results")
            lm_eval_out[str(seed)] = _numeric(res["results"].get(lm_task, {}))
            raw[str(seed)] = {"results": res["results"], "n-samples": res.get("n-samples"),
                              "config": res.get("config"), "versions": res.get("versions")}
            records += records_from_samples(task, lm_task, arm, seed, res["samples"][lm_task], primary_metric(task))
            bar.update(1)
        before, after = status.get("preemptions"), engine_arms.engine_status(lm).get("preemptions")
        name = _report.samples_filename(arm, task.replace(":", "-"))
        _report.write_samples(self.state.out / name, records)
        self.state.record({
            "arm": arm, "task": task, "samples": name, "records": len(records),
            "wall_time_s": time.perf_counter() - t0, "lm_eval": lm_eval_out, "lm_eval_raw": _jsonable(raw),
            "engine": engine,
            "preemptions": (after - before) if isinstance(after, int) and isinstance(before, int) else None,
        })


def run_pieces(cfg: EvalConfig, state: RunState, todo: dict[str, list[str]], model_path: str, data_dir: Path,
               lm_tasks: dict[str, str], seeds: list[int], verbose: bool, progress: bool) -> None:
    """Run the pieces in ``todo`` (arm -> its tasks to run), one engine for all arms or one
    engine per arm, shut down after use."""
    from tqdm import tqdm

    _quiet_logs(verbose)
    harness = _Harness(cfg, state, model_path, data_dir, lm_tasks, seeds)
    total = sum(len(t) for t in todo.values()) * len(seeds)
    # one engine for every arm, or one engine per arm
    sessions = [list(todo)] if cfg.share_engine else [[arm] for arm in todo]
    with _env_info_once(), tqdm(total=total, desc="A/B runs", unit="run", disable=not progress,
                                file=sys.stderr) as bar:
        for arms in sessions:
            lm = harness.start_engine(arms[0])
            try:
                for arm in arms:
                    for task in todo[arm]:
                        harness.run_piece(lm, arm, task, bar)
            finally:
                _shutdown(lm)
