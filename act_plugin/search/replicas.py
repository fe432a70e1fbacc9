"""Data-parallel exact scores (``data_parallel: N``): N scoring replicas side by side.

Each replica is a process (``python -m act_plugin.search.replica SPEC.json``) with its own
placement (:mod:`act_plugin.vllm.placement`: a block of cores and 1/N of the KV cache on CPU,
its own GPUs on CUDA) that rebuilds the search's inputs from the same config, checks that its
settings hash is the parent's, and opens the exact-score backend one process would open (one
vLLM engine, or the transformers model with ``fast.verify: hf``). It then serves evaluations:
the parent sends one ``(part, heads)`` at a time on its stdin and reads the answer
log-probabilities back (JSON floats: exact) from its stdout.

Sharded by candidate, not by prompt: one evaluation -- a head set on every prompt of one
part -- is made whole by one replica, with the same prompts in the same batch as one process
sends, so the margins are the ones N = 1 computes (the vLLM engine's arithmetic does not
depend on how many cores it has; see the README for what was measured) and the parent
derives them with the same code. :meth:`ReplicaPool.evaluate_many` hands the next
evaluation to whichever replica is free (the verify step: every candidate alone, on every
part); one evaluation at a time (the greedy combination, whose steps depend on each other)
goes to a free replica too.

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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from act_plugin.atomic_files import atomic_write_json

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
                i, part, heads = job
                proc.stdin.write(json.dumps({"part": part, "heads": heads}) + "\n")
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
    def evaluate_many(self, jobs: list[tuple[str, list]]) -> Iterator[tuple[int, np.ndarray, float, float]]:
        """``(index, answer log-probabilities, seconds, cost fraction)`` of each ``(part, heads)``
        job, in the order they finish, each made whole by one free replica."""
        if self._closed:
            raise ReplicaError("data_parallel: the search replicas were already closed")
        for i, (part, heads) in enumerate(jobs):
            self._jobs.put((i, part, [list(map(int, h)) for h in heads]))
        for _ in jobs:
            i, reply, err = self._results.get()
            if err is not None:
                raise err
            yield i, np.asarray(reply["lp"], dtype=np.float64), float(reply["seconds"]), float(reply["cost"])

    def evaluate(self, part: str, heads: Iterable) -> tuple[np.ndarray, float]:
        """One evaluation (log-probabilities, cost fraction), by a free replica."""
        for _, lp, _, cost in self.evaluate_many([(part, list(heads))]):
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
        self._cost: dict[tuple, float] = {}

    def evaluate(self, heads: Iterable) -> np.ndarray:
        key = tuple(sorted((int(a), int(b)) for a, b in heads))
        lp, self._cost[key] = self.pool.evaluate(self.part, [list(h) for h in key])
        return lp

    def cost_fraction(self, heads: Iterable) -> float:
        return self._cost.get(tuple(sorted((int(a), int(b)) for a, b in heads)), 1.0)

    def close(self) -> None:
        self.pool.close()
