"""Data-parallel exact scores (``data_parallel: N``): N scoring replicas side by side.

Each replica is a process (``python -m act_plugin.search.replica SPEC.json``) with its own
placement (:mod:`act_plugin.vllm.placement`: a block of cores and 1/N of the KV cache on CPU,
its own GPUs on CUDA) that rebuilds the search's inputs from the same config, checks that its
settings hash is the parent's, and opens the exact-score backend one process would open (one
vLLM engine, or the transformers model with ``fast.verify: hf``). It then serves evaluations:
the parent sends one ``(part, heads, first_token)`` at a time on its stdin and reads the answer
log-probabilities back (JSON floats: exact) from its stdout. ``first_token`` (a search over
rules, transformers path) holds the heads scaled by the first_token rule in the same forward,
as ``[layer, head, gamma]`` rows (JSON has no tuple keys; a gamma is a float, exact in JSON).

Sharded by candidate, not by prompt: one evaluation -- a head set on every prompt of one
part -- is made whole by one replica, with the same prompts in the same batch as one process
sends, so the margins are the ones N = 1 computes (the vLLM engine's arithmetic does not
depend on how many cores it has; see the README for what was measured) and the parent
derives them with the same code. :meth:`ReplicaPool.evaluate_many` hands the next
evaluation to whichever replica is free (the verify step: every candidate alone, on every
part; the first_token candidates alone; a selection step's validation parts); one evaluation
at a time (the greedy combination, whose steps depend on each other) goes to a free replica too.
Layers whose inputs a transformers replica should keep (``plan_cache``: the restart layers of
the first_token candidates, known only after the parent's ranking of them) travel with every
job of the part, so each replica plans the same cache one process plans.

Resuming is the search store's: the parent appends each result to the partial-results file
as it arrives (:meth:`act_plugin.search.evaluator.Evaluator.prefetch`), so a killed run loses
at most the evaluations in flight, and a rerun -- with any N, the file's settings hash does
not include N -- computes only what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from act_plugin.atomic_files import atomic_write_json
from act_plugin.search.store import first_token_rows, head_rows

__all__ = ["ReplicaPool", "ReplicaPart", "REPLICA_MODULE"]

logger = logging.getLogger("act_plugin.search")

REPLICA_MODULE = "act_plugin.search.replica"
_STOP = None  # a job queue item that ends a replica's serving thread


class ReplicaError(RuntimeError):
    """A replica that failed to start or to score (the message names its log)."""


class ReplicaPool:
    """N replica processes and one serving thread each (see the module docs)."""

    def __init__(self, spec: dict[str, Any], envs: list[dict[str, str]], folder: Path, backend_name: str):
        self.name = backend_name
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.n = len(envs)
        self._jobs: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self.procs: list[subprocess.Popen] = []
        self.placement = envs
        self._closed = False
        self._plans: dict[str, set[int]] = {}  # part -> layers whose inputs the replicas keep
        for k, env in enumerate(envs):
            spec_file = atomic_write_json(folder / f"replica-{k}-of-{self.n}.spec.json", {**spec, "replica": k})
            with open(self.log(k), "w") as log:  # the child keeps its own handle
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", REPLICA_MODULE, str(spec_file)], env={**os.environ, **env},
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1))
        self._threads = [threading.Thread(target=self._serve, args=(k,), daemon=True, name=f"search-replica-{k}")
                         for k in range(self.n)]
        for t in self._threads:
            t.start()
        logger.warning("search: data_parallel %d: replicas started (logs: %s)", self.n, folder)

    def log(self, k: int) -> Path:
        return self.folder / f"replica-{k}-of-{self.n}.log"

    # ------------------------------------------------------------------ serving threads
    def _serve(self, k: int) -> None:
        """Replica k's thread: wait until it is ready, then take jobs until told to stop."""
        proc = self.procs[k]
        assert proc.stdin is not None and proc.stdout is not None
        try:
            hello = self._read(k)
            if "ready" not in hello:
                raise self._failure(k, f"an unexpected first message {sorted(hello)}")
            while True:
                job = self._jobs.get()
                if job is _STOP:
                    return
                i, msg = job
                proc.stdin.write(json.dumps(msg) + "\n")
                proc.stdin.flush()
                reply = self._read(k)
                self._results.put((i, reply, None))
        except (ReplicaError, OSError, ValueError) as e:
            self._results.put((None, None, e if isinstance(e, ReplicaError) else self._failure(k, repr(e))))

    def _read(self, k: int) -> dict:
        out = self.procs[k].stdout
        assert out is not None
        line = out.readline()
        if not line:
            raise self._failure(k, f"it exited (code {self.procs[k].wait()})")
        msg = json.loads(line)
        if "error" in msg:
            raise self._failure(k, msg["error"])
        return msg

    def _failure(self, k: int, what: str) -> ReplicaError:
        tail = ""
        try:
            tail = "\n".join(self.log(k).read_text(errors="replace").splitlines()[-15:])
        except OSError:
            pass
        return ReplicaError(f"data_parallel: search replica {k} of {self.n} failed: {what} (log: {self.log(k)})"
                            + (f"\n{tail}" if tail else "") + "\nrerun the same command to resume (finished scores "
                            "are kept in the partial-results file)")

    # ------------------------------------------------------------------ evaluations
    def plan_cache(self, part: str, layers: Iterable[int]) -> None:
        """Layers whose inputs every replica's backend of ``part`` keeps (sent with its jobs)."""
        self._plans.setdefault(part, set()).update(int(x) for x in layers)

    def _message(self, part: str, heads: Iterable, first_token: Mapping | None) -> dict[str, Any]:
        msg: dict[str, Any] = {"part": part, "heads": [list(map(int, h)) for h in heads]}
        if first_token:
            msg["first_token"] = first_token_rows(first_token)
        if self._plans.get(part):
            msg["plan_cache"] = sorted(self._plans[part])
        return msg

    def evaluate_many(self, jobs: list[tuple[str, list, Mapping | None]]
                      ) -> Iterator[tuple[int, np.ndarray, float, float]]:
        """``(index, answer log-probabilities, seconds, cost fraction)`` of each ``(part, heads,
        first_token)`` job (``first_token``: (layer, head) -> gamma, or None), in the order they
        finish, each made whole by one free replica."""
        if self._closed:
            raise ReplicaError("data_parallel: the search replicas were already closed")
        for i, (part, heads, first_token) in enumerate(jobs):
            self._jobs.put((i, self._message(part, heads, first_token)))
        for _ in jobs:
            i, reply, err = self._results.get()
            if err is not None:
                raise err
            yield i, np.asarray(reply["lp"], dtype=np.float64), float(reply["seconds"]), float(reply["cost"])

    def evaluate(self, part: str, heads: Iterable, first_token: Mapping | None = None) -> tuple[np.ndarray, float]:
        """One evaluation (log-probabilities, cost fraction), by a free replica."""
        for _, lp, _, cost in self.evaluate_many([(part, list(heads), first_token)]):
            return lp, cost
        raise AssertionError("unreachable: one job gives one result")  # pragma: no cover

    def close(self) -> None:
        """Stop every replica (each closes its engine when its stdin ends; one that does not is
        terminated)."""
        if self._closed:
            return
        self._closed = True
        while True:  # jobs nobody took (an interrupted run) are dropped
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._jobs.put(_STOP)
        for p in self.procs:
            try:
                assert p.stdin is not None
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


class ReplicaPart:
    """The exact-score backend of one part, served by the pool (what :class:`Evaluator` calls)."""

    def __init__(self, pool: ReplicaPool, part: str):
        self.pool = pool
        self.part = part
        self.name = pool.name
        self._cost: dict[tuple, float] = {}  # every head an evaluation changed -> its cost fraction

    @staticmethod
    def _key(heads: Iterable) -> tuple:
        return tuple(map(tuple, head_rows(heads)))

    def evaluate(self, heads: Iterable, first_token: Mapping | None = None) -> np.ndarray:
        """``heads`` under ACT and the heads of ``first_token`` ((layer, head) -> gamma) under
        the first_token rule, in one forward (the backend one process would call)."""
        act = self._key(heads)
        lp, cost = self.pool.evaluate(self.part, [list(h) for h in act], first_token)
        self._cost[self._key([*act, *(first_token or {})])] = cost
        return lp

    def cost_fraction(self, heads: Iterable) -> float:
        """The cost the replica reported for the evaluation of ``heads`` (ACT and first_token heads)."""
        return self._cost.get(self._key(heads), 1.0)

    def plan_cache(self, layers: Iterable[int]) -> None:
        self.pool.plan_cache(self.part, layers)

    def close(self) -> None:
        self.pool.close()
