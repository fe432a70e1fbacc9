"""Data-parallel eval (``data_parallel: N``) without an engine: the setting, the placement of
replicas on cores or GPUs, the sharding of documents, and whole runs through the real
lm-eval harness with the stand-in engine of test_eval_runner, each replica run in this
process in place of its subprocess: N = 2 and 3 write exactly what N = 1 writes, and a run
whose replica died resumes that replica's unfinished shards only."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_eval_runner import ACT, TASKS, _numbers, fake_engine, make_cfg  # noqa: F401 - fake_engine is a fixture

from act_plugin.config import ACTConfigError
from act_plugin.eval import data_parallel, harness, runner
from act_plugin.eval.config import load_eval_config
from act_plugin.eval.replica import run_replica
from act_plugin.eval.report import read_samples
from act_plugin.eval.results import EvalResults
from act_plugin.eval.shards import SHARDS_DIR, shard_documents
from act_plugin.vllm import placement


# ------------------------------------------------------------------------ the setting
def test_data_parallel_setting(shared_data):
    assert make_cfg(shared_data).data_parallel == 1
    assert make_cfg(shared_data, data_parallel="2").data_parallel == 2  # --data-parallel 2 arrives as text
    for bad in (0, -1, True, "two", 1.5):
        with pytest.raises(ACTConfigError, match=r"data_parallel must be a positive whole number"):
            make_cfg(shared_data, data_parallel=bad)
    assert make_cfg(shared_data, data_parallel=2, num_fewshot=3).num_fewshot == 3  # few-shot: replayed draws


def test_the_replica_reads_back_the_same_config(shared_data):
    cfg = make_cfg(shared_data, data_parallel=2)
    again = load_eval_config(cfg.to_dict())
    versions = {k: "x" for k in ("act_plugin", "lm_eval", "vllm", "torch")}
    assert runner.run_inputs(again, "m", shared_data, versions) == runner.run_inputs(cfg, "m", shared_data, versions)
    assert again.data_parallel == 2
    demo = load_eval_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", data_parallel=2)
    assert runner.run_inputs(load_eval_config(demo.to_dict()), "m", shared_data, versions) == runner.run_inputs(
        demo, "m", shared_data, versions)  # a per-task arm too


def test_a_new_run_marks_its_folder_at_once(shared_data, tmp_path):
    """A killed data-parallel run has recorded no piece yet, only shards: its folder must still
    be known as this run's, or the rerun would refuse it as foreign."""
    versions = {k: "x" for k in ("act_plugin", "lm_eval", "vllm", "torch")}
    inputs = runner.run_inputs(make_cfg(shared_data, data_parallel=2), "m", shared_data, versions)
    out = tmp_path / "new"
    runner.RunState.open(out, inputs)
    assert (out / runner.STATE_FILE).is_file()
    (out / SHARDS_DIR).mkdir()
    (out / SHARDS_DIR / "act__sst2.0-of-2.json").write_text("{}")
    assert runner.RunState.open(out, inputs).pieces == {}  # resumes, not refused


# ------------------------------------------------------------------------ placement
def test_cpu_replicas_split_the_cores_and_the_kv_cache():
    assert data_parallel.cpu_replicas(2, [0, 1], 2) == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_KVCACHE_SPACE": "1"},
        {"VLLM_CPU_OMP_THREADS_BIND": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}]
    binds = [e["VLLM_CPU_OMP_THREADS_BIND"] for e in data_parallel.cpu_replicas(3, [2, 3, 4, 5, 6, 7, 8], 6)]
    assert binds == ["2-3", "4-5", "6-8"]
    assert data_parallel.cpu_replicas(1, [0, 1], 2) == [{"VLLM_CPU_OMP_THREADS_BIND": "0-1",
                                                         "VLLM_CPU_KVCACHE_SPACE": "2"}]
    with pytest.raises(ACTConfigError, match=r"data_parallel: 3 replicas need a CPU core each, but this process "
                                             r"may use 2 \(0-1\)"):
        data_parallel.cpu_replicas(3, [0, 1], 8)
    with pytest.raises(ACTConfigError, match=r"data_parallel: 2 replicas need at least 1 GiB of KV cache each"):
        data_parallel.cpu_replicas(2, [0, 1], 1)


def test_cuda_replicas_get_their_own_gpus():
    assert data_parallel.cuda_replicas(2, ["0", "1"], 1) == [{"CUDA_VISIBLE_DEVICES": "0"},
                                                             {"CUDA_VISIBLE_DEVICES": "1"}]
    assert data_parallel.cuda_replicas(2, ["4", "5", "6", "7"], 2) == [{"CUDA_VISIBLE_DEVICES": "4,5"},
                                                                       {"CUDA_VISIBLE_DEVICES": "6,7"}]
    with pytest.raises(ACTConfigError, match=r"data_parallel: 2 replicas of 1 GPU\(s\) each need 2 GPUs, but 1 "
                                             r"are visible \(0\)"):
        data_parallel.cuda_replicas(2, ["0"], 1)


def test_this_machine_refuses_more_replicas_than_cores(monkeypatch):
    monkeypatch.setattr(placement, "on_cpu_platform", lambda: True)
    monkeypatch.setattr(placement.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    assert len(data_parallel.replica_environments(2, {})) == 2
    with pytest.raises(ACTConfigError, match="data_parallel: 5 replicas need a CPU core each"):
        data_parallel.replica_environments(5, {})
    monkeypatch.setattr(placement, "on_cpu_platform", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert data_parallel.replica_environments(2, {"tensor_parallel_size": 2})[1] == {"CUDA_VISIBLE_DEVICES": "2,3"}
    with pytest.raises(ACTConfigError, match="data_parallel: 3 replicas of 2 GPU"):
        data_parallel.replica_environments(3, {"tensor_parallel_size": 2})


# ------------------------------------------------------------------------ sharding
@pytest.mark.parametrize("limit, chosen", [(None, 10), (4, 4), (50, 10), (0.35, 4)])
def test_shards_cover_the_documents_once(limit, chosen):
    task = SimpleNamespace(eval_docs=list(range(10)))
    for n in (1, 2, 3, 7):
        shards = [shard_documents(task, limit, k, n) for k in range(n)]
        assert sorted(d for s in shards for d in s) == list(range(chosen))
        assert all(d % n == k for k, s in enumerate(shards) for d in s)


# ------------------------------------------------------------------------ whole runs
class _Done:
    """A finished replica process."""

    def __init__(self, code: int):
        self.code = code

    def wait(self) -> int:
        return self.code

    def poll(self) -> int:
        return self.code


@pytest.fixture
def replicas_here(monkeypatch, fake_engine):  # noqa: F811 - the fixture imported above
    """Run each replica in this process, in order, instead of as a subprocess; ``crash``
    maps a replica to the engine call after which it dies (once)."""
    launched: list[dict] = []
    crash: dict[int, int] = {}

    def launch(state, spec, env, k, n):
        spec = json.loads(json.dumps({**spec, "shard": k}))  # what the spec file carries
        launched.append(spec)
        fake_engine.calls = 0
        fake_engine.crash_after_calls = crash.pop(k, None)
        try:
            run_replica(spec)
        except KeyboardInterrupt:
            return _Done(1)
        finally:
            fake_engine.crash_after_calls = None
        spec["docs"] = {p.name: {r["doc_id"] for r in json.loads(p.read_text())["records"]}
                        for p in (state.out / SHARDS_DIR).glob(f"*.{k}-of-{n}.json")}
        return _Done(0)

    monkeypatch.setattr(data_parallel, "_launch", launch)
    monkeypatch.setattr(data_parallel, "replica_environments", lambda n, engine: [{}] * n)
    return SimpleNamespace(launched=launched, crash=crash, engine=fake_engine)


def _report(out) -> str:
    """report.md but its date, wall times and engine start times."""
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:+]+", "DATE", (out / "report.md").read_text())
    text = re.sub(r"\| [\d.]+ \| (\d+) \|\n", r"| TIME | \1 |\n", text)  # the arms table's wall time
    return "\n".join(line for line in text.split("\n") if "engine start" not in line.lower())


def _raw(out) -> dict:
    return json.loads((out / "lm_eval_raw.json").read_text())


@pytest.mark.parametrize("n", [2, 3])
def test_n_replicas_write_what_one_process_writes(n, replicas_here, shared_data, tmp_path):
    one = runner.run_eval(make_cfg(shared_data), output_dir=tmp_path / "one", progress=False)
    assert not replicas_here.launched
    many = runner.run_eval(make_cfg(shared_data, data_parallel=n), output_dir=tmp_path / "many", progress=False)
    assert [s["shard"] for s in replicas_here.launched] == list(range(n))
    assert _numbers(many.output_dir) == _numbers(one.output_dir)  # every record, every statistic
    assert _report(many.output_dir) == _report(one.output_dir)
    assert _raw(many.output_dir) == _raw(one.output_dir)  # lm-eval's own results, merged by its aggregation
    state = json.loads((many.output_dir / runner.STATE_FILE).read_text())
    assert state["complete"] and {p["data_parallel"] for p in state["pieces"].values()} == {n}
    assert not (many.output_dir / SHARDS_DIR).exists()
    # every replica scored its own documents only (every n-th), one shard file per piece
    for spec in replicas_here.launched:
        assert len(spec["docs"]) == len(state["pieces"])
        assert all(d % n == spec["shard"] for docs in spec["docs"].values() for d in docs)
    EvalResults.from_json((many.output_dir / "results.json").read_text())


def test_few_shot_replicas_give_every_document_the_examples_one_process_gives(replicas_here, shared_data, tmp_path,
                                                                               monkeypatch):
    """lm-eval draws few-shot examples from one random stream per task, in document order:
    each replica replays the draws of the documents it skips (two few-shot seeds, so the
    stream is reseeded between calls)."""
    few = {"num_fewshot": 2, "seeds": [0, 7], "arms": {"baseline": None, "act": ACT}, "tasks": ["cb"], "limit": 6}
    one = runner.run_eval(make_cfg(shared_data, **few), output_dir=tmp_path / "one", progress=False)
    two = runner.run_eval(make_cfg(shared_data, data_parallel=2, **few), output_dir=tmp_path / "two",
                          progress=False)
    prompts = {name: [r["prompt"] for r in rows] for name, rows in _numbers(one.output_dir)["samples"].items()}
    assert all(len(set(p)) == len(p) for p in prompts.values())
    assert _numbers(two.output_dir) == _numbers(one.output_dir)
    assert _raw(two.output_dir) == _raw(one.output_dir)
    # without the replay a replica's documents get other examples (the check above can fail)
    monkeypatch.setattr(harness, "fewshot_in_document_order", contextlib.nullcontext)
    plain = runner.run_eval(make_cfg(shared_data, data_parallel=2, **few), output_dir=tmp_path / "plain",
                            progress=False)
    assert _numbers(plain.output_dir)["samples"] != _numbers(one.output_dir)["samples"]


def test_a_dead_replica_resumes_its_own_shards_only(replicas_here, shared_data, tmp_path):
    whole = runner.run_eval(make_cfg(shared_data), output_dir=tmp_path / "whole", progress=False)
    cfg = make_cfg(shared_data, data_parallel=2)
    out = tmp_path / "cut"
    replicas_here.crash[1] = 3  # replica 1 dies after 3 engine calls (it has 6 pieces)
    with pytest.raises(RuntimeError, match=r"data_parallel: replica\(s\) \[1\] failed"):
        runner.run_eval(cfg, output_dir=out, progress=False)
    state = json.loads((out / runner.STATE_FILE).read_text())
    assert not state["pieces"] and not state["complete"] and not (out / "results.json").exists()
    saved = {p.name: p.read_bytes() for p in (out / SHARDS_DIR).glob("*.json") if "-of-2.json" in p.name
             and not p.name.startswith("replica-")}
    mine = sorted(name for name in saved if ".1-of-2." in name)
    assert len([n for n in saved if ".0-of-2." in n]) == 6 and 0 < len(mine) < 6

    replicas_here.launched.clear()
    resumed = runner.run_eval(cfg, output_dir=out, progress=False)
    assert [s["shard"] for s in replicas_here.launched] == [1]  # replica 0 had finished: not started again
    (again,) = replicas_here.launched
    assert sum(len(t) for t in again["todo"].values()) == 6 - len(mine)  # only the shards it had not saved
    pieces = json.loads((out / runner.STATE_FILE).read_text())["pieces"]
    for pid, piece in pieces.items():
        arm, task = pid.split("/")
        done_before = f"{arm}__{task}.1-of-2.json" in saved
        assert piece["shards_reused"] == ([0, 1] if done_before else [0])
    assert not resumed.reused  # no whole piece was finished before
    assert _numbers(out) == _numbers(whole.output_dir) and _raw(out) == _raw(whole.output_dir)


def test_finished_pieces_do_not_depend_on_n(replicas_here, shared_data, tmp_path):
    out = tmp_path / "out"
    first = runner.run_eval(make_cfg(shared_data, data_parallel=2), output_dir=out, progress=False)
    replicas_here.launched.clear()
    again = runner.run_eval(make_cfg(shared_data, data_parallel=3), output_dir=out, progress=False)
    assert not replicas_here.launched and len(again.reused) == len(first.results.arms) * len(TASKS)
    one = runner.run_eval(make_cfg(shared_data, data_parallel=1), output_dir=out, progress=False)
    assert len(one.reused) == len(again.reused)


# ------------------------------------------------------------------------ real engines
def _cli(args: list[str]) -> subprocess.Popen:
    code = "import sys; from act_plugin.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=dict(os.environ), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_after_first_shard(proc: subprocess.Popen, out: Path) -> dict[str, bytes]:
    """Kill the run (front end and replicas) once a replica has saved its first shard; the
    shard files saved by then."""
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if [p for p in (out / SHARDS_DIR).glob("*-of-2.json") if not p.name.startswith("replica-")]:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {p.name: p.read_bytes() for p in (out / SHARDS_DIR).glob("*-of-2.json") if not p.name.startswith("replica-")}


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_engine_replicas_equal_one_including_a_killed_run(smollm2_path, shared_data, tmp_path):
    """N = 1 in this process; N = 2 from the command line (a core and 1 GiB of KV cache per
    replica on this 2-core machine), killed once a replica saved its first shard, then run
    again: the same documents, predictions and statistics as N = 1, log-probabilities within
    1e-5 (the replicas batch other documents together), and the shards saved before the kill
    reused, not scored again."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two replicas need two cores")
    tasks = ["sst2", "trec"]
    data = {"name": "dp", "model": smollm2_path, "engine": {"dtype": "float32", "max_model_len": 1024, "seed": 0},
            "arms": {"baseline": None, "act": {"beta": 0.4, "heads": "2-27:0,4"}}, "tasks": tasks, "limit": 16,
            "data_dir": str(shared_data), "bootstrap_resamples": 1000}
    one = runner.run_eval(load_eval_config(data), output_dir=tmp_path / "one", progress=False).output_dir
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "two"
    saved = _kill_after_first_shard(_cli(["eval", str(path), "-o", str(out), "--data-parallel", "2"]), out)
    assert saved, "no replica saved a shard within 900 s"
    assert not json.loads((out / runner.STATE_FILE).read_text())["complete"], "the kill must land mid-run"

    again = _cli(["eval", str(path), "-o", str(out), "--data-parallel", "2"])
    log, _ = again.communicate(timeout=900)
    assert again.returncode == 0, log[-3000:]
    pieces = json.loads((out / runner.STATE_FILE).read_text())["pieces"]
    for name in saved:  # <arm>__<task>.<k>-of-2.json
        (arm, task), k = name.split(".")[0].split("__"), int(name.split(".")[1].split("-")[0])
        assert k in pieces[f"{arm}/{task}"]["shards_reused"]
    binds = {p["VLLM_CPU_OMP_THREADS_BIND"] for piece in pieces.values() for p in piece["placement"]}
    assert len(binds) == 2 and all("," not in b and "-" not in b for b in binds)  # one core each
    a, b = json.loads((out / "results.json").read_text()), json.loads((one / "results.json").read_text())
    assert a["tasks"] == b["tasks"] and a["summary"] == b["summary"]
    for arm in data["arms"]:
        for task in tasks:
            x, y = (read_samples(d / f"samples_{arm}_{task}.jsonl") for d in (out, one))
            assert [(r["doc_id"], r["pred"], r["correct"], r["prompt"]) for r in x] == [
                (r["doc_id"], r["pred"], r["correct"], r["prompt"]) for r in y]
            diff = max(abs(p - q) for r, s in zip(x, y) for p, q in zip(r["loglikelihoods"], s["loglikelihoods"]))
            print(f"{arm}/{task}: largest log-probability difference N=2 vs N=1: {diff:.3g}")
            assert diff <= 1e-5
