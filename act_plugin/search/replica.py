"""One search scoring replica: ``python -m act_plugin.search.replica SPEC.json``.

Started by :class:`act_plugin.search.replicas.ReplicaPool` with its placement in the
environment. It rebuilds the search's inputs from the config (:func:`~act_plugin.search.steps.prepare`,
with a throw-away partial-results folder: the parent keeps the real one), refuses to serve if
its settings hash differs from the parent's, opens the exact-score backend one process opens,
and answers one job line on stdin with one ``{"lp", "seconds", "cost"}`` line on stdout until
stdin ends. A job is ``{"part", "heads"}`` (the ACT heads, ``[[layer, head], ...]``) with, when
given, ``"first_token": [[layer, head, gamma], ...]`` (heads scaled by the first_token rule in
the same forward) and ``"plan_cache": [layer, ...]`` (layers whose inputs the part's backend
keeps: :meth:`~act_plugin.search.hf_backend.HFSearchBackend.plan_cache`). Its stdout carries
only these lines: whatever else the process prints goes to its log (stderr).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

__all__ = ["main", "serve"]


def _pin_to_bound_cores() -> None:
    """A transformers replica runs torch on the cores of its placement (vLLM binds its own)."""
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
    cores: set[int] = set()
    for part in filter(None, bind.split(",")):
        lo, _, hi = part.partition("-")
        if not (lo.isdigit() and (not hi or hi.isdigit())):
            return  # 'auto', 'nobind' or a per-rank list ('|'): leave the affinity alone
        cores |= set(range(int(lo), int(hi or lo) + 1))
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)


def _open(spec: dict[str, Any], state_dir: str):
    """The replica's evaluator and backends (the same ones a single process opens)."""
    from act_plugin.search.backends import Backends, open_exact_backends, open_ranking_backend
    from act_plugin.search.config import load_search_config
    from act_plugin.search.evaluator import Evaluator
    from act_plugin.search.steps import Ranking, prepare

    cfg = load_search_config({**spec["config"], "data_parallel": 1, "state_dir": state_dir})
    prep = prepare(cfg, resume=False)
    if prep.settings_key != spec["key"]:
        raise RuntimeError(f"this replica's search settings hash to {prep.settings_key}, the parent's to "
                           f"{spec['key']} (different data, model files or code?)")
    ev = Evaluator(prep.store, prep.data)
    if prep.exact_backend == "hf":
        _pin_to_bound_cores()
        backends = open_ranking_backend(prep, ev)
    else:
        backends = Backends()
    ranking = Ranking({(int(a), int(b)): float(v) for a, b, v in spec.get("estimates", [])})
    open_exact_backends(prep, ev, backends, ranking)
    return ev, backends


def serve(spec: dict[str, Any], jobs: TextIO, answers: TextIO) -> None:
    """Open the backend, then answer every job line until ``jobs`` ends."""
    from act_plugin.search.backends import close_backends

    state_dir = tempfile.mkdtemp(prefix="act-search-replica-")
    backends = None
    try:
        t = time.perf_counter()
        ev, backends = _open(spec, state_dir)
        _send(answers, {"ready": True, "seconds": time.perf_counter() - t})
        for line in jobs:
            _send(answers, _answer(ev, json.loads(line)))
    finally:
        if backends is not None:
            close_backends(ev, backends)
        shutil.rmtree(state_dir, ignore_errors=True)


def _answer(ev: Any, job: dict[str, Any]) -> dict[str, Any]:
    """One job's answer, computed with the calls :meth:`~act_plugin.search.evaluator.Evaluator.margins`
    makes in one process."""
    be = ev.backends[job["part"]]
    if job.get("plan_cache"):
        be.plan_cache(job["plan_cache"])
    heads = [(int(a), int(b)) for a, b in job["heads"]]
    first_token = {(int(a), int(b)): float(g) for a, b, g in job.get("first_token") or []}
    t = time.perf_counter()
    lp = be.evaluate(heads, first_token=first_token) if first_token else be.evaluate(heads)
    return {"lp": lp.tolist(), "seconds": time.perf_counter() - t,
            "cost": be.cost_fraction(heads + list(first_token))}


def _send(answers: TextIO, msg: dict) -> None:
    answers.write(json.dumps(msg) + "\n")  # NaN (a padded answer column) travels as JSON's NaN
    answers.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m act_plugin.search.replica SPEC.json", file=sys.stderr)
        return 2
    # the answers go to the real stdout; anything printed from here on goes to the log
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        serve(json.loads(Path(args[0]).read_text()), sys.stdin, answers)
    except Exception as e:
        traceback.print_exc()
        _send(answers, {"error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
