"""Data-parallel eval (``data_parallel: N``): N engine replicas, each scoring every N-th
document of every piece, merged into exactly the pieces one process writes.

Why our own replica processes. vLLM's offline data parallelism refuses
``LLM(data_parallel_size=N)`` in one process; its multi-process recipe starts one engine per
rank and leaves the sharding of prompts to the caller, and the DP group it joins only keeps
ranks in lockstep for mixture-of-experts models (for a dense model each rank is an independent
engine, which is what we start). lm-eval's ``VLLM(data_parallel_size=N)`` needs Ray and starts
fresh engines inside every generate call, with no engine left to read the ACT calibration back
from. So each replica is an ordinary single-engine run (``python -m act_plugin.eval.replica``)
that selects its documents with lm-eval's own ``simple_evaluate(samples=...)``
(:mod:`act_plugin.eval.shards`).

Placement (:mod:`act_plugin.vllm.placement`, shared with the search): on vLLM's CPU platform
each replica is bound to its own block of the cores this process may use
(``VLLM_CPU_OMP_THREADS_BIND``) and gets 1/N of ``VLLM_CPU_KVCACHE_SPACE``; on CUDA each gets its
own GPUs (``CUDA_VISIBLE_DEVICES``; tensor x pipeline parallel size each).

Resuming: a replica saves each of its shards as it finishes; a rerun starts only the replicas
with shards left and merges. Finished pieces do not depend on N, so N may change between
sessions (pieces are reused; unfinished shards of another N are run again).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from act_plugin.atomic_files import atomic_write_json
from act_plugin.eval.config import EvalConfig
from act_plugin.eval.harness import BOOTSTRAP_ITERS, load_lm_eval_task, record_piece, task_manager_for
from act_plugin.eval.run_state import RunState
from act_plugin.eval.shards import SHARDS_DIR, merge_shards, read_shard, shard_path
from act_plugin.vllm.placement import cpu_replicas, cuda_replicas, replica_environments

__all__ = ["replica_environments", "cpu_replicas", "cuda_replicas", "run_pieces_parallel"]

logger = logging.getLogger("act_plugin.eval")

REPLICA_MODULE = "act_plugin.eval.replica"


def _shards_left(state: RunState, todo: dict[str, list[str]], n: int) -> list[dict[str, list[str]]]:
    """Per replica, the pieces whose shard it has not finished yet."""
    left = []
    for k in range(n):
        mine = {a: [t for t in tasks if read_shard(state.out, state.piece_key(a, t), a, t, k, n) is None]
                for a, tasks in todo.items()}
        left.append({a: tasks for a, tasks in mine.items() if tasks})
    return left


def _launch(state: RunState, spec: dict[str, Any], env: dict[str, str], k: int, n: int) -> subprocess.Popen:
    """Start replica k with its spec file; replica 0 shows its progress here, the others log."""
    folder = state.out / SHARDS_DIR
    spec_file = atomic_write_json(folder / f"replica-{k}-of-{n}.spec.json", {**spec, "shard": k})
    cmd = [sys.executable, "-m", REPLICA_MODULE, str(spec_file)]
    if k == 0:
        return subprocess.Popen(cmd, env={**os.environ, **env})
    with open(folder / f"replica-{k}-of-{n}.log", "w") as log:  # the replica keeps its own copy of the handle
        return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=log)


def _wait(procs: dict[int, subprocess.Popen], folder: Path, n: int) -> None:
    """Wait for every replica; one that failed is an error naming its log."""
    try:
        codes = {k: p.wait() for k, p in procs.items()}
    finally:
        for p in procs.values():  # an interrupted parent stops its replicas (they saved their finished shards)
            if p.poll() is None:
                p.terminate()
                p.wait()
    failed = [k for k, c in codes.items() if c != 0]
    if failed:
        logs = ", ".join("this terminal" if k == 0 else str(folder / f"replica-{k}-of-{n}.log") for k in failed)
        raise RuntimeError(f"data_parallel: replica(s) {failed} failed (see {logs}); rerun the same command to "
                           f"resume (finished shards are kept)")


def _merge(cfg: EvalConfig, state: RunState, todo: dict[str, list[str]], data_dir: Path,
           lm_tasks: dict[str, str], seeds: list[int], reused: dict[tuple[str, str], list[int]]) -> None:
    """Merge each piece's N shards into its samples file and run-state entry."""
    n = cfg.data_parallel
    manager = task_manager_for(cfg, data_dir)
    tasks = {t: load_lm_eval_task(lm_tasks[t], manager) for t in {t for ts in todo.values() for t in ts}}
    for arm, arm_tasks in todo.items():
        for task in arm_tasks:
            key = state.piece_key(arm, task)
            shards = [read_shard(state.out, key, arm, task, k, n) for k in range(n)]
            missing = [k for k, s in enumerate(shards) if s is None]
            if missing:
                raise RuntimeError(f"data_parallel: shard(s) {missing} of {arm}/{task} are missing after the replicas "
                                   f"finished")
            found = [s for s in shards if s is not None]
            if len({json.dumps(s["engine"]["calibration"], sort_keys=True) for s in found}) != 1:
                raise RuntimeError(f"data_parallel: the replicas of {arm}/{task} read back different calibrations")
            scored = merge_shards(found, lm_tasks[task], tasks[task], seeds, cfg.lm_eval_limit, BOOTSTRAP_ITERS)
            record_piece(state, scored, data_parallel=n, shards_reused=reused.get((arm, task), []),
                         placement=[s.get("placement") for s in found])
            for k in range(n):
                shard_path(state.out, arm, task, k, n).unlink(missing_ok=True)


def _engine_starts(state: RunState, n: int) -> None:
    """Record the engine start times the replicas of this session wrote."""
    for k in range(n):
        path = state.out / SHARDS_DIR / f"replica-{k}-of-{n}.starts.json"
        if path.is_file():
            for seconds in json.loads(path.read_text()):
                state.engine_started(float(seconds))
            path.unlink()


def run_pieces_parallel(cfg: EvalConfig, state: RunState, todo: dict[str, list[str]], model_path: str,
                        data_dir: Path, lm_tasks: dict[str, str], seeds: list[int], verbose: bool,
                        progress: bool) -> None:
    """Score ``todo`` with ``cfg.data_parallel`` replicas (only those with shards left) and
    record each piece, merged, in the run state."""
    n = cfg.data_parallel
    envs = replica_environments(n, cfg.engine)
    left = _shards_left(state, todo, n)
    reused = {(a, t): [k for k in range(n) if t not in left[k].get(a, [])] for a, ts in todo.items() for t in ts}
    if any(reused.values()):
        logger.warning("eval: resuming shards: %s", {f"{a}/{t}": ks for (a, t), ks in reused.items() if ks})
    spec = {"config": cfg.to_dict(), "out": str(state.out), "shards": n, "model_path": model_path,
            "data_dir": str(data_dir), "lm_tasks": lm_tasks, "seeds": seeds, "verbose": verbose,
            "progress": progress,
            "keys": {f"{a}/{t}": state.piece_key(a, t) for a, ts in todo.items() for t in ts}}
    procs = {k: _launch(state, {**spec, "todo": left[k]}, envs[k], k, n) for k in range(n) if left[k]}
    logger.warning("eval: data_parallel %d: replicas %s running", n, sorted(procs))
    try:
        _wait(procs, state.out / SHARDS_DIR, n)
    finally:
        _engine_starts(state, n)
    _merge(cfg, state, todo, data_dir, lm_tasks, seeds, reused)
    shutil.rmtree(state.out / SHARDS_DIR, ignore_errors=True)
