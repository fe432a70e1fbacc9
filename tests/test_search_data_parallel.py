"""Data-parallel head search (``data_parallel: N``): the setting, the replica protocol, and
real searches on SmolLM2-135M whose exact scores are made by two replica processes (one core
each on this 2-core machine), interrupted once and resumed: the same scores, bit for bit, the
same kept heads and the same selected sets as one process -- for ACT, and for a search over
rules (first_token sets, and ACT + first_token heads in one forward, the "both" check)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from act_plugin.config import ACTConfigError
from act_plugin.search.config import SearchConfigError, load_search_config
from act_plugin.search.store import SearchStore


def _cfg(tmp, name, shared_data, **kw):
    return load_search_config({
        "name": name, "model": "smollm2-135m", "tasks": ["sst2", "trec"], "samples_per_task": 4,
        "validation_per_task": 6, "seed": 5, "data_dir": str(shared_data), "hf": {"threads": 1},
        "output": str(tmp / name / "searched.yaml"), "run_dir": str(tmp / name / "run"),
        "state_dir": str(tmp / name / "state"), **kw})


def test_data_parallel_setting(tmp_path, shared_data):
    assert _cfg(tmp_path, "a", shared_data).data_parallel == 1
    assert _cfg(tmp_path, "a", shared_data, data_parallel="2").data_parallel == 2  # --data-parallel 2
    for bad in (0, -2, True, "two", 1.5):
        with pytest.raises(ACTConfigError, match=r"data_parallel must be a positive whole number"):
            _cfg(tmp_path, "a", shared_data, data_parallel=bad)


def test_more_replicas_than_cores_refused_before_anything_runs(tmp_path, shared_data, capsys):
    from act_plugin.cli import main

    cores = len(os.sched_getaffinity(0))
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps({"model": "smollm2-135m", "tasks": ["sst2"], "data_dir": str(shared_data)}))
    assert main(["search", str(path), "--check", "--data-parallel", str(cores + 1)]) == 2
    assert f"data_parallel: {cores + 1} replicas need a CPU core each" in capsys.readouterr().err
    assert main(["search", str(path), "--check", "--data-parallel", str(cores)]) == 0
    assert f"{cores} scoring replicas" in capsys.readouterr().out


def test_a_running_engine_is_not_shared_with_replicas(tmp_path, shared_data):
    from act_plugin.search.run import run_search

    cfg = _cfg(tmp_path, "llm", shared_data, method="exact", candidates="12:0", data_parallel=2)
    with pytest.raises(SearchConfigError, match=r"data_parallel 2 starts its own scoring replicas"):
        run_search(cfg, llm=object(), progress=False, quiet=True)


class _Stop(Exception):
    pass


def _stop_after(monkeypatch, n, first_token_only=False):
    """Interrupt the search once this process has stored ``n`` exact scores (of first_token
    sets only, with ``first_token_only``)."""
    orig = SearchStore.add_set
    done = []

    def add_set(self, *args, **kw):
        rec = orig(self, *args, **kw)
        if first_token_only and "first_token" not in rec:
            return rec
        done.append(rec)
        if len(done) == n:
            raise _Stop
        return rec

    monkeypatch.setattr(SearchStore, "add_set", add_set)
    return done


def _scores(report_path, state_dir):
    """Every stored exact score: (backend, part, heads, first_token scales) -> margins."""
    key = json.loads(report_path.read_text())["settings_hash"]
    lines = [json.loads(x) for x in (state_dir / f"{key}.jsonl").read_text().splitlines()]
    sets = [x for x in lines if x["kind"] == "set"]
    out = {(x["backend"], x["part"], json.dumps(x["heads"]), json.dumps(x.get("first_token"))): x["margins"]
           for x in sets}
    assert len(out) == len(sets), "a finished score was computed twice"
    return out


def _same_search(one, two, tmp_path):
    a, b = (json.loads(r.report_path.read_text()) for r in (one, two))
    for key in ("baseline", "candidates", "kept", "selected", "validation", "split"):
        assert a[key] == b[key], key
    assert a["settings_hash"] == b["settings_hash"]  # a store of one N resumes under another
    assert b["data_parallel"] == 2 and a["data_parallel"] == 1
    assert _scores(one.report_path, tmp_path / "one" / "state") == _scores(two.report_path, tmp_path / "two" / "state")
    heads = [r.config and {k: v for k, v in r.config.to_dict().items() if k != "name"} for r in (one, two)]
    assert heads[0] == heads[1]  # the shared set (its name is the run's)


def _two_replicas_interrupted_then_resumed(cfg, monkeypatch, first_token_only=False, **kw):
    from act_plugin.search.run import run_search

    done = _stop_after(monkeypatch, 3 if not first_token_only else 2, first_token_only)
    with pytest.raises(_Stop):
        run_search(cfg, progress=False, quiet=True, **kw)
    assert len(done) == (3 if not first_token_only else 2)
    monkeypatch.undo()
    resumed = run_search(cfg, progress=False, quiet=True, **kw)
    assert json.loads(resumed.report_path.read_text())["timing"]["resumed_records"] >= 3
    return resumed


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_transformers_replicas_equal_one_including_a_resumed_run(tmp_path, shared_data, monkeypatch):
    """Method fast, exact scores in transformers (``fast.verify: hf``), one torch thread in every
    process: the ranking pass in this process, the exact scores in two replicas."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two replicas need two cores")
    from act_plugin.search.run import run_search

    fast = {"method": "fast", "candidates": "20:0-2", "fast": {"top_k": 2, "verify": "hf", "check_layers": "20"}}
    one = run_search(_cfg(tmp_path, "one", shared_data, **fast), progress=False, quiet=True)
    two = _two_replicas_interrupted_then_resumed(_cfg(tmp_path, "two", shared_data, data_parallel=2, **fast),
                                                 monkeypatch)
    _same_search(one, two, tmp_path)


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_engine_replicas_equal_one_including_a_resumed_run(tmp_path, shared_data, monkeypatch):
    """Method exact in vLLM: one engine per replica (a core and 1 GiB of KV cache each), each
    candidate switched in at runtime; the scores equal one engine's on both cores, bit for bit."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two replicas need two cores")
    from act_plugin.search.run import run_search

    exact = {"method": "exact", "candidates": "12:0-2", "engine": {"max_model_len": 1024, "seed": 0}}
    one = run_search(_cfg(tmp_path, "one", shared_data, **exact), progress=False, quiet=True)
    two = _two_replicas_interrupted_then_resumed(_cfg(tmp_path, "two", shared_data, data_parallel=2, **exact),
                                                 monkeypatch)
    _same_search(one, two, tmp_path)


# ----------------------------------------------------------------------------- search over rules


class _PlanningBackend:
    """A part backend that records the calls a replica makes (answers: the call's own numbers)."""

    name = "hf"

    def __init__(self):
        self.calls = []
        self.planned = set()

    def plan_cache(self, layers):
        self.planned |= set(layers)

    def evaluate(self, heads, first_token=None):
        self.calls.append((list(heads), first_token))
        return np.array([[len(heads), sum((first_token or {}).values())]], dtype=np.float64)

    def cost_fraction(self, heads):
        return min((a for a, _ in heads), default=0) / 10


def test_replica_job_carries_first_token_rows_and_planned_layers():
    """The parent's job message (JSON rows, planned layers) and the replica's answer to it: ACT
    heads and first_token scales go to the part backend in one evaluate call, as in one process."""
    from types import SimpleNamespace

    from act_plugin.search.replica import _answer
    from act_plugin.search.replicas import ReplicaPart, ReplicaPool

    pool = ReplicaPool.__new__(ReplicaPool)  # the message logic only: no processes
    pool._plans, pool.name = {}, "hf"
    part = ReplicaPart(pool, "val:sst2")
    part.plan_cache({3, 1})
    msg = pool._message("val:sst2", [(2, 0)], {(4, 1): 2.0, (3, 5): 0.5})
    assert msg == {"part": "val:sst2", "heads": [[2, 0]], "first_token": [[3, 5, 0.5], [4, 1, 2.0]],
                   "plan_cache": [1, 3]}
    assert pool._message("search", [], None) == {"part": "search", "heads": []}  # ACT only: as before

    be = _PlanningBackend()
    ev = SimpleNamespace(backends={"val:sst2": be})
    reply = _answer(ev, json.loads(json.dumps(msg)))  # through JSON, as on the pipe
    assert be.planned == {1, 3}
    assert be.calls == [([(2, 0)], {(3, 5): 0.5, (4, 1): 2.0})]
    assert reply["lp"] == [[1.0, 2.5]] and reply["cost"] == 0.2  # cost over ACT and first_token heads
    _answer(ev, {"part": "val:sst2", "heads": [[7, 1]]})
    assert be.calls[-1] == ([(7, 1)], None)

    # the part backend keeps the reported cost under every head the evaluation changed
    pool.evaluate = lambda part, heads, first_token=None: (np.zeros(1), 0.25)
    part.evaluate([(5, 1)], {(6, 2): 2.0})
    assert part.cost_fraction([(6, 2), (5, 1)]) == 0.25 and part.cost_fraction([(5, 1)]) == 1.0


def _records(report_path, state_dir):
    """Every stored exact score, without its seconds: (backend, part, heads, first_token) -> record."""
    key = json.loads(report_path.read_text())["settings_hash"]
    lines = [json.loads(x) for x in (state_dir / f"{key}.jsonl").read_text().splitlines()]
    sets = [{k: v for k, v in x.items() if k != "seconds"} for x in lines if x["kind"] == "set"]
    out = {json.dumps([x["backend"], x["part"], x["heads"], x.get("first_token")]): x for x in sets}
    assert len(out) == len(sets), "a finished score was computed twice"
    return out


RULES = {"method": "fast", "candidates": "20:0-2", "fast": {"top_k": 2, "verify": "hf", "check_layers": "20"},
         "rules": ["act", "first_token"], "first_token": {"gammas": [0.5, 2.0], "top_k": 2, "uniform": True}}
BOTH = ([(20, 0)], {(20, 1): 2.0, (20, 2): 0.5})  # ACT heads and first_token scales in one forward


def _both_margins(cfg):
    """Margins of :data:`BOTH` on every part, with the backends ``cfg`` opens (the "both" check's calls)."""
    from act_plugin.search.backends import close_backends, open_exact_backends, open_ranking_backend
    from act_plugin.search.evaluator import SEARCH, Evaluator
    from act_plugin.search.steps import Ranking, prepare

    prep = prepare(cfg)
    ev = Evaluator(prep.store, prep.data)
    backends = open_ranking_backend(prep, ev)
    try:
        open_exact_backends(prep, ev, backends, Ranking())
        correct = ev.validation_correct(BOTH[0], "both", None, BOTH[1])
        out = {p: ev.margins(p, BOTH[0], "both", BOTH[1]) for p in [SEARCH, *(f"val:{t}" for t in correct)]}
    finally:
        close_backends(ev, backends)
    return out


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_two_transformers_replicas_equal_one_over_rules_including_a_resumed_run(tmp_path, shared_data, monkeypatch):
    """``rules: [act, first_token]``: both rankings in this process, the exact scores of ACT heads,
    first_token sets and their selections in two replicas, interrupted after two first_token
    scores and resumed: the same report and records as one process; ACT + first_token heads in
    one forward (the "both" check) give one process's margins too."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two replicas need two cores")
    from act_plugin.search.run import run_search

    one = run_search(_cfg(tmp_path, "one", shared_data, **RULES), progress=False, quiet=True)
    two_cfg = _cfg(tmp_path, "two", shared_data, data_parallel=2, **RULES)
    two = _two_replicas_interrupted_then_resumed(two_cfg, monkeypatch, first_token_only=True)
    _same_search(one, two, tmp_path)
    a, b = (json.loads(r.report_path.read_text()) for r in (one, two))
    for section in (a["rules"], b["rules"]):
        section["first_token"].pop("ranking_s")
    assert a["rules"] == b["rules"]
    assert len(a["rules"]["first_token"]["exact"]) == 4  # 2 singles + 2 uniform sets, scored by the replicas
    records = [_records(r.report_path, tmp_path / n / "state") for r, n in ((one, "one"), (two, "two"))]
    assert records[0] == records[1]  # margins, cost fractions, keys (first_token included)
    assert sum("first_token" in x for x in records[1].values()) >= 4
    profiles = [{t: {k: v for k, v in p.to_dict().items() if k != "source"} for t, p in r.profiles.items()}
                for r in (one, two)]
    assert profiles[0] == profiles[1]

    single, replicas = _both_margins(_cfg(tmp_path, "one", shared_data, **RULES)), _both_margins(two_cfg)
    assert set(single) == set(replicas) == {"search", "val:sst2", "val:trec"}
    for part in single:
        assert np.array_equal(single[part], replicas[part]), part
