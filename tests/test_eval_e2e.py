"""End to end: ``run_eval`` through the real lm-eval harness and real vLLM engines: one
uninterrupted run in-process, and the same config from the command line, killed after its
first finished piece and run again (three engine starts in all)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from act_plugin.eval.config import load_eval_config
from act_plugin.eval.report import accuracy_from_samples, read_samples

pytestmark = [pytest.mark.engine, pytest.mark.slow]

TASKS = ["sst2", "piqa_ll"]  # next-token scoring and lm-eval's full-text path
ARMS = ["baseline", "act", "identity"]


def config(smollm2_path, shared_data) -> dict:
    return {
        "name": "e2e",
        "model": smollm2_path,
        "engine": {"dtype": "float32", "max_model_len": 1024, "seed": 0},
        "arms": {"baseline": None, "act": {"beta": 0.4, "heads": "2-27:0,4"},
                 "identity": {"control": True, "beta": 1.0, "heads": "2-27:0,4"}},
        "tasks": TASKS,
        "limit": 10,
        "data_dir": str(shared_data),
        "bootstrap_resamples": 1000,
    }


@pytest.fixture(scope="module")
def run(smollm2_path, shared_data, tmp_path_factory):
    from act_plugin.eval.runner import run_eval

    cfg = load_eval_config(config(smollm2_path, shared_data))
    return run_eval(cfg, output_dir=tmp_path_factory.mktemp("e2e"), progress=False)


def test_writes_every_artifact(run):
    out = run.output_dir
    for name in ("results.json", "report.md", "deltas.png", "config.yaml", "lm_eval_raw.json", "run_state.json"):
        assert (out / name).is_file(), name
    assert (out / "deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for arm in ARMS:
        for task in TASKS:
            assert (out / f"samples_{arm}_{task}.jsonl").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "act-plugin/eval-results" and results["schema_version"] == 2
    assert list(results["arms"]) == ARMS and list(results["tasks"]) == TASKS
    assert all(results["arms"][a]["wall_time_s"] > 0 for a in ARMS)
    assert json.loads((out / "run_state.json").read_text())["complete"] is True
    # every arm's calibration was read back from the engine and is what the config asked for
    arms = results["arms"]
    assert arms["baseline"]["engine"]["calibration"] is None and arms["baseline"]["engine"]["request"] == "off"
    assert arms["act"]["engine"]["calibration"] == arms["act"]["act"]
    assert arms["identity"]["control"] and not arms["identity"]["calibrates"]
    assert all(isinstance(arms[a]["preemptions"], int) for a in ARMS)
    report = (out / "report.md").read_text()
    assert "| sst2 | acc | 10 |" in report and "| piqa_ll | acc_norm | 10 |" in report and "deltas.png" in report


def test_accuracies_recompute_from_per_sample_files(run):
    out = run.output_dir
    results = json.loads((out / "results.json").read_text())
    raw = json.loads((out / "lm_eval_raw.json").read_text())
    for task, info in results["tasks"].items():
        metric = info["metric"]
        for arm in ARMS:
            path = out / info["samples"][arm]
            rows = read_samples(path)
            assert len(rows) == info["n"] == 10
            assert sorted(r["doc_id"] for r in rows) == list(range(10))
            for r in rows:
                assert r["correct"] == float(r["pred"] == r["gold"])
                assert len(r["loglikelihoods"]) == len(r["choices"])
            acc = accuracy_from_samples(path)
            assert acc == pytest.approx(info["accuracy"][arm], abs=1e-12)
            lm_eval_acc = raw[arm][task]["0"]["results"][info["lm_eval_task"]][f"{metric},none"]
            assert acc == pytest.approx(lm_eval_acc, abs=1e-12)
        for arm in ("act", "identity"):
            c = info["comparisons"][arm]
            assert c["delta"] == pytest.approx(info["accuracy"][arm] - info["accuracy"]["baseline"])
            assert c["ci_low"] <= c["delta"] <= c["ci_high"]
            base = {r["doc_id"]: r["correct"] for r in read_samples(out / info["samples"]["baseline"])}
            treat = {r["doc_id"]: r["correct"] for r in read_samples(out / info["samples"][arm])}
            assert c["improved"] == sum(base[d] == 0 and treat[d] == 1 for d in base)
            assert c["worsened"] == sum(base[d] == 1 and treat[d] == 0 for d in base)
    s = results["summary"]["act"]
    assert s["mean_delta"] == pytest.approx(
        sum(results["tasks"][t]["comparisons"]["act"]["delta"] for t in TASKS) / len(TASKS))


def test_beta_one_arm_reproduces_the_baseline(run):
    out = run.output_dir
    for task in TASKS:
        base = read_samples(out / f"samples_baseline_{task}.jsonl")
        same = read_samples(out / f"samples_identity_{task}.jsonl")
        assert [r["pred"] for r in base] == [r["pred"] for r in same]
        for a, b in zip(base, same):
            assert a["prompt"] == b["prompt"]
            assert all(math.isclose(x, y, abs_tol=1e-5) for x, y in zip(a["loglikelihoods"], b["loglikelihoods"]))
    comps = run.results.tasks
    assert all(comps[t].comparisons["identity"].improved == 0 for t in TASKS)
    assert all(comps[t].comparisons["identity"].worsened == 0 for t in TASKS)


# ------------------------------------------------------------------------ kill and resume
def _cli(args: list[str]) -> subprocess.Popen:
    code = "import sys; from act_plugin.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=dict(os.environ), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# Two engine runs in subprocesses; on a machine shared with other jobs an engine start alone
# has taken several minutes, so this test gets more than the suite's 20 minutes.
@pytest.mark.timeout(2400)
def test_killed_eval_resumes_without_losing_or_changing_results(run, smollm2_path, shared_data, tmp_path):
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(config(smollm2_path, shared_data)))
    out = tmp_path / "out"
    state_file = out / "run_state.json"
    proc = _cli(["eval", str(path), "-o", str(out)])
    deadline = time.monotonic() + 1000
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if state_file.is_file() and json.loads(state_file.read_text())["pieces"]:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: front end and engine core
        proc.wait()
    assert state_file.is_file(), "the eval wrote no run_state.json within 1000 s (engine start too slow?)"
    state = json.loads(state_file.read_text())
    total = len(ARMS) * len(TASKS)
    assert 0 < len(state["pieces"]) < total and not state["complete"], "the kill must land mid-run"
    assert not (out / "results.json").exists()
    kept = {p["samples"]: (out / p["samples"]).read_bytes() for p in state["pieces"].values()}

    again = _cli(["eval", str(path), "-o", str(out)])
    log, _ = again.communicate(timeout=1000)
    assert again.returncode == 0, log[-3000:]
    assert f"resumed: {len(kept)} finished (arm, task) pieces reused of {total}" in log
    assert all((out / name).read_bytes() == data for name, data in kept.items())  # reused as they were
    assert json.loads(state_file.read_text())["complete"] is True
    # nothing lost or changed against the uninterrupted run
    whole = json.loads((run.output_dir / "results.json").read_text())
    resumed = json.loads((out / "results.json").read_text())
    for task in TASKS:
        assert resumed["tasks"][task]["accuracy"] == whole["tasks"][task]["accuracy"]
        for arm in ARMS:
            a = read_samples(out / f"samples_{arm}_{task}.jsonl")
            b = read_samples(run.output_dir / f"samples_{arm}_{task}.jsonl")
            def outcome(rows):
                return [(r["doc_id"], r["pred"], r["correct"]) for r in rows]

            assert outcome(a) == outcome(b)
            for x, y in zip(a, b):
                assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-5)
        c1, c2 = resumed["tasks"][task]["comparisons"]["act"], whole["tasks"][task]["comparisons"]["act"]
        assert (c1["improved"], c1["worsened"], c1["delta"]) == (c2["improved"], c2["worsened"], c2["delta"])


# ------------------------------------------------------------------------ issue 11 finding 5
def test_vanilla_baseline_engine_ignores_an_exported_act_config(smollm2_path, shared_data, tmp_path, monkeypatch):
    """With one engine per arm, the baseline's engine is started with ACT explicitly off: an
    ACT_CONFIG exported in the shell (here: every head of layers 2-27 at beta 0) is ignored,
    as the engine's read-back shows, and the calibrated arm runs its own config."""
    from act_plugin.eval.runner import run_eval

    leaked = tmp_path / "leaked.yaml"
    leaked.write_text(yaml.safe_dump({"beta": 0.0, "heads": "2-27:*"}))
    monkeypatch.setenv("ACT_CONFIG", str(leaked))
    cfg = load_eval_config({**config(smollm2_path, shared_data), "share_engine": False, "tasks": ["sst2"],
                            "limit": 5, "arms": {"baseline": None, "act": {"beta": 0.4, "heads": "2-27:0,4"}}})
    run = run_eval(cfg, output_dir=tmp_path / "out", progress=False)
    base, act = run.results.arms["baseline"].engine, run.results.arms["act"].engine
    assert base.act_setting is False and base.config is None and base.calibration is None and base.request is None
    assert act.calibration == cfg.arms["act"].to_dict() and list(act.config["profiles"]) == ["act"]
    assert run.results.arms["baseline"].preemptions == 0


# ------------------------------------------------------------------------ per-task arms
def test_per_task_arm_on_the_real_engine(smollm2_path, shared_data, tmp_path):
    """One shared engine; a per-task arm with a profile for sst2 only: sst2's requests run
    that profile (read back from the engine) and score differently from the baseline; mr has
    no profile, is not run in the arm, and its records are the baseline's."""
    from act_plugin.eval.results import EvalResults
    from act_plugin.eval.runner import run_eval

    profile = {"beta": 0.4, "heads": "2-27:0,4"}
    cfg = load_eval_config({**config(smollm2_path, shared_data), "tasks": ["sst2", "mr"], "limit": 4,
                            "arms": {"baseline": None, "per_task": {"profiles": {"sst2": profile}}}})
    run = run_eval(cfg, output_dir=tmp_path / "out", progress=False)
    out, r = run.output_dir, run.results
    assert EvalResults.from_json((out / "results.json").read_text()) == r

    arm = r.arms["per_task"]
    sst2, mr = arm.tasks["sst2"], arm.tasks["mr"]
    # read back from the engine: the one engine holds the task's profile; sst2's requests ran exactly it
    assert list(sst2.engine.config["profiles"]) == ["per_task.sst2"] and sst2.engine.config["default"] is None
    assert sst2.engine.request == "per_task.sst2" and sst2.engine.calibration == cfg.act_for("per_task",
                                                                                             "sst2").to_dict()
    assert sst2.calibrated and not mr.calibrated and mr.engine is None and mr.act is None
    assert r.arms["baseline"].engine.request == "off" and r.arms["baseline"].engine.calibration is None

    # sst2: calibrated, so other log-likelihoods than the baseline's on the same prompts
    base = read_samples(out / "samples_baseline_sst2.jsonl")
    mine = read_samples(out / "samples_per_task_sst2.jsonl")
    assert [x["prompt"] for x in base] == [x["prompt"] for x in mine] and len(mine) == 4
    assert max(abs(a - b) for x, y in zip(base, mine) for a, b in zip(x["loglikelihoods"], y["loglikelihoods"])) > 1e-3
    # mr: not run in the arm; the baseline's records, delta 0, marked
    assert not (out / "samples_per_task_mr.jsonl").exists()
    assert list(json.loads((out / "lm_eval_raw.json").read_text())["per_task"]) == ["sst2"]
    c = r.tasks["mr"].comparisons["per_task"]
    assert not c.calibrated and c.delta == 0 and r.tasks["mr"].samples["per_task"] == "samples_baseline_mr.jsonl"
    assert r.summary["per_task"].uncalibrated_tasks == ["mr"]
    assert "mr (**uncalibrated: no profile for this task**)" in (out / "report.md").read_text()
