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
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from act_plugin.eval import engine_arms
from act_plugin.eval import report as _report
from act_plugin.eval.config import EvalConfig
from act_plugin.eval.records import primary_metric, records_from_samples
from act_plugin.eval.run_state import RunState
from act_plugin.eval.scored import ScoredPiece, numeric_metrics
from act_plugin.eval.shards import fewshot_in_document_order
from act_plugin.tasks import REPO_ROOT, write_lm_eval_tasks

__all__ = ["run_pieces", "score_pieces", "tasks_folder", "load_lm_eval_task", "task_manager_for",
           "BOOTSTRAP_ITERS", "record_piece"]

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


BOOTSTRAP_ITERS = 1000  # lm-eval's stderr bootstrap (the data-parallel merge recomputes with the same)


class _Harness:
    """What every piece of one session shares: the config, lm-eval's task index, the engine
    arguments, and which documents this process scores (``shard``: replica k of N)."""

    def __init__(self, cfg: EvalConfig, model_path: str, data_dir: Path, lm_tasks: dict[str, str],
                 seeds: list[int], on_engine_start: Callable[[float], None], shard: tuple[int, int] | None = None):
        self.cfg, self.lm_tasks, self.seeds, self.shard = cfg, lm_tasks, seeds, shard
        self.on_engine_start = on_engine_start
        self.task_manager = task_manager_for(cfg, data_dir)
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
        self.on_engine_start(time.perf_counter() - t0)
        return lm

    def _documents(self, lm_task: str) -> dict[str, Any]:
        """simple_evaluate's document selection: the config's limit, or this shard's documents
        (lm-eval's ``samples``, which takes no limit)."""
        if self.shard is None:
            return {"limit": self.cfg.lm_eval_limit}
        from act_plugin.eval.shards import shard_documents

        task = load_lm_eval_task(lm_task, self.task_manager)
        return {"limit": None, "samples": {lm_task: shard_documents(task, self.cfg.lm_eval_limit, *self.shard)}}

    def score_piece(self, lm: Any, arm: str, task: str, bar: Any) -> ScoredPiece:
        """Score (arm, task) for every seed after checking the engine's calibration."""
        from lm_eval import simple_evaluate

        cfg, lm_task = self.cfg, self.lm_tasks[task]
        t0 = time.perf_counter()
        # per task: a per-task arm names another profile on every task
        lm.set_arm(engine_arms.request_value(cfg, arm, task))
        status = engine_arms.engine_status(lm)
        engine = engine_arms.read_back(cfg, arm, task, status)
        scored = ScoredPiece(arm, task, [], {}, {}, engine, None, 0.0)
        docs = self._documents(lm_task)
        for seed in self.seeds:
            bar.set_description(f"arm {arm}, {task}, seed {seed}")
            if "samples" not in docs or docs["samples"][lm_task]:  # an empty shard scores nothing
                with fewshot_in_document_order() if "samples" in docs else contextlib.nullcontext():
                    res = simple_evaluate(
                        model=lm, tasks=[lm_task], num_fewshot=cfg.num_fewshot, log_samples=True,
                        task_manager=self.task_manager, fewshot_random_seed=seed, bootstrap_iters=BOOTSTRAP_ITERS,
                        **docs,
                    )
                if res is None:  # pragma: no cover - non-zero rank
                    raise RuntimeError("lm-eval returned no results")
                _add_seed(scored, res, lm_task, seed)
            bar.update(1)
        before, after = status.get("preemptions"), engine_arms.engine_status(lm).get("preemptions")
        scored.preemptions = (after - before) if isinstance(after, int) and isinstance(before, int) else None
        scored.wall_time_s = time.perf_counter() - t0
        return scored


def _add_seed(scored: ScoredPiece, res: dict, lm_task: str, seed: int) -> None:
    """One seed's lm-eval output into the scored piece."""
    samples = res["samples"][lm_task]
    scored.lm_eval[str(seed)] = numeric_metrics(res["results"].get(lm_task, {}))
    scored.lm_eval_raw[str(seed)] = _jsonable({"results": res["results"], "n-samples": res.get("n-samples"),
                                               "config": res.get("config"), "versions": res.get("versions")})
    scored.records += records_from_samples(scored.task, lm_task, scored.arm, seed, samples,
                                           primary_metric(scored.task))
    items = [{"doc_id": int(s["doc_id"]), "filter": s["filter"], "values": {m: s[m] for m in s["metrics"]}}
             for s in samples]
    scored.metric_items[str(seed)] = _jsonable(sorted(items, key=lambda x: x["doc_id"]))


def load_lm_eval_task(lm_task: str, task_manager: Any) -> Any:
    """lm-eval's task object (its documents and aggregation functions)."""
    from lm_eval.tasks import get_task_dict

    return get_task_dict([lm_task], task_manager)[lm_task]


def task_manager_for(cfg: EvalConfig, data_dir: Path) -> Any:
    """lm-eval's task index for this config's tasks (lm-eval's own index, thousands of YAMLs,
    is only scanned when a config names one of its tasks)."""
    return _task_manager(str(tasks_folder()), any(t.startswith("lm_eval:") for t in cfg.tasks), str(data_dir))


def record_piece(state: RunState, scored: ScoredPiece, **extra: Any) -> None:
    """Write a fully scored piece's samples file, then its entry in the run state (``extra``:
    more fields of the entry)."""
    name = _report.samples_filename(scored.arm, scored.task.replace(":", "-"))
    _report.write_samples(state.out / name, scored.records)
    state.record({
        "arm": scored.arm, "task": scored.task, "samples": name, "records": len(scored.records),
        "wall_time_s": scored.wall_time_s, "lm_eval": scored.lm_eval, "lm_eval_raw": scored.lm_eval_raw,
        "engine": scored.engine, "preemptions": scored.preemptions, **extra,
    })


def run_pieces(cfg: EvalConfig, state: RunState, todo: dict[str, list[str]], model_path: str, data_dir: Path,
               lm_tasks: dict[str, str], seeds: list[int], verbose: bool, progress: bool) -> None:
    """Run the pieces in ``todo`` (arm -> its tasks to run) on every document, recording each
    in the run state as it finishes."""
    score_pieces(cfg, todo, model_path, data_dir, lm_tasks, seeds, verbose, progress,
                 on_engine_start=state.engine_started, on_piece=functools.partial(record_piece, state))


def score_pieces(cfg: EvalConfig, todo: dict[str, list[str]], model_path: str, data_dir: Path,
                 lm_tasks: dict[str, str], seeds: list[int], verbose: bool, progress: bool, *,
                 on_engine_start: Callable[[float], None], on_piece: Callable[[ScoredPiece], None],
                 shard: tuple[int, int] | None = None) -> None:
    """Score the pieces in ``todo`` (on ``shard``'s documents only, if given), one engine for
    all arms or one engine per arm, shut down after use; ``on_piece`` gets each as it finishes."""
    from tqdm import tqdm

    _quiet_logs(verbose)
    harness = _Harness(cfg, model_path, data_dir, lm_tasks, seeds, on_engine_start, shard)
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
                        on_piece(harness.score_piece(lm, arm, task, bar))
            finally:
                _shutdown(lm)
