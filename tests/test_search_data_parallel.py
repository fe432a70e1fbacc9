"""Data-parallel head search (``data_parallel: N``): the setting, and real searches on
SmolLM2-135M whose exact scores are made by two replica processes (one core each on this
2-core machine), interrupted once and resumed: the same scores, bit for bit, the same kept
heads and the same selected sets as one process."""

from __future__ import annotations

import json
import os

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


def _stop_after(monkeypatch, n):
    """Interrupt the search once this process has stored ``n`` exact scores."""
    orig = SearchStore.add_set
    done = []

    def add_set(self, *args, **kw):
        rec = orig(self, *args, **kw)
        done.append(rec)
        if len(done) == n:
            raise _Stop
        return rec

    monkeypatch.setattr(SearchStore, "add_set", add_set)
    return done


def _scores(report_path, state_dir):
    """Every stored exact score: (backend, part, heads) -> margins."""
    key = json.loads(report_path.read_text())["settings_hash"]
    lines = [json.loads(x) for x in (state_dir / f"{key}.jsonl").read_text().splitlines()]
    sets = [x for x in lines if x["kind"] == "set"]
    out = {(x["backend"], x["part"], json.dumps(x["heads"])): x["margins"] for x in sets}
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


def _two_replicas_interrupted_then_resumed(cfg, monkeypatch, **kw):
    from act_plugin.search.run import run_search

    done = _stop_after(monkeypatch, 3)
    with pytest.raises(_Stop):
        run_search(cfg, progress=False, quiet=True, **kw)
    assert len(done) == 3
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
