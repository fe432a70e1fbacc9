"""Results assembly and reports from lm-eval-style logged samples (no engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from act_plugin.eval import runner
from act_plugin.eval.config import load_eval_config
from act_plugin.eval.records import records_from_samples
from act_plugin.eval.report import accuracy_from_samples, read_samples, write_samples


def _fake_samples(correct: list[int], gold: list[int]) -> list[dict]:
    out = []
    for doc_id, (c, g) in enumerate(zip(correct, gold)):
        lls = [-1.0, -2.0]
        if (g == 0) != bool(c):
            lls = [-2.0, -1.0]
        out.append({"doc_id": doc_id, "doc": {"gold": g, "row": 100 + doc_id, "choices": ["negative", "positive"]},
                    "target": g, "arguments": [("prompt", " negative"), ("prompt", " positive")],
                    "filtered_resps": [(lls[0], lls[0] == -1.0), (lls[1], lls[1] == -1.0)], "acc": float(c)})
    return out


def test_multi_seed_assembly_and_files(tmp_path):
    cfg = load_eval_config({"name": "fake", "model": "smollm2-135m", "tasks": ["sst2"], "num_fewshot": 1,
                            "seeds": [0, 1], "bootstrap_resamples": 500,
                            "arms": {"baseline": None, "act": {"beta": 0.4, "heads": "2:0"}}})
    rng = np.random.default_rng(0)
    gold = list(rng.integers(0, 2, 12))
    correct = {arm: {s: list(rng.integers(0, 2, 12)) for s in (0, 1)} for arm in cfg.arms}
    versions = {"act_plugin": "0", "lm_eval": "0", "vllm": "0", "torch": "0", "python": "3"}
    state = runner.RunState.open(tmp_path, runner.run_inputs(cfg, "/m", tmp_path, versions))
    for arm in cfg.arms:
        records, lm_eval = [], {}
        for s in (0, 1):
            samples = _fake_samples(correct[arm][s], gold)
            records += records_from_samples("sst2", "act_sst2", arm, s, samples, "acc")
            lm_eval[str(s)] = {"acc,none": float(np.mean(correct[arm][s]))}
        name = f"samples_{arm}_sst2.jsonl"
        write_samples(tmp_path / name, records)
        state.record({"arm": arm, "task": "sst2", "samples": name, "records": len(records), "wall_time_s": 1.0,
                      "lm_eval": lm_eval, "lm_eval_raw": {}, "preemptions": 0,
                      "engine": {"act_setting": None, "request": None, "config": None, "calibration": None,
                                 "preemptions": 0}})
    results = runner.assemble(cfg, state, "/m", tmp_path, "test", {"sst2": "act_sst2"}, [0, 1], versions)
    files = runner.write_outputs(tmp_path, cfg, state, results)
    saved = json.loads((tmp_path / "results.json").read_text())
    task = saved["tasks"]["sst2"]
    for arm in cfg.arms:
        expected = np.mean([correct[arm][0], correct[arm][1]])
        assert task["accuracy"][arm] == pytest.approx(expected)
        assert accuracy_from_samples(tmp_path / task["samples"][arm]) == pytest.approx(expected)
        per_seed = task["accuracy_per_seed"][arm]
        assert per_seed == {str(s): pytest.approx(np.mean(correct[arm][s])) for s in (0, 1)}
        for r in read_samples(tmp_path / task["samples"][arm]):
            assert r["correct"] == float(r["pred"] == r["gold"]) and r["row"] == 100 + r["doc_id"]
    c = task["comparisons"]["act"]
    b = np.array([correct["baseline"][0], correct["baseline"][1]]).T
    t = np.array([correct["act"][0], correct["act"][1]]).T
    assert c["seeds"] == 2 and c["n"] == 12
    assert c["improved"] == int(((b == 0) & (t == 1)).sum()) and c["worsened"] == int(((b == 1) & (t == 0)).sum())
    assert c["delta"] == pytest.approx(t.mean() - b.mean())
    assert saved["summary"]["act"]["mean_delta"] == pytest.approx(c["delta"])
    assert files["deltas.png"].read_bytes()[:4] == b"\x89PNG"
    assert "| sst2 | acc | 12 |" in (tmp_path / "report.md").read_text()


def test_committed_results_schema_is_current():
    """docs/eval_results.schema.json is generated from the model; regenerate it with
    ``python -m act_plugin.eval.results > docs/eval_results.schema.json``."""
    from pathlib import Path

    from act_plugin.eval.results import json_schema

    committed = Path(__file__).resolve().parents[1] / "docs" / "eval_results.schema.json"
    assert json.loads(committed.read_text()) == json_schema(), "regenerate docs/eval_results.schema.json"


def test_assembly_with_a_per_task_arm_reuses_the_baseline_on_a_task_without_a_profile(tmp_path):
    """sst2 has a profile in the per-task arm, mr none: mr's comparison is the baseline's
    records against themselves (delta 0), marked uncalibrated in results.json and report.md."""
    from act_plugin.eval.results import EvalResults

    cfg = load_eval_config({"name": "fake", "model": "smollm2-135m", "tasks": ["sst2", "mr"],
                            "bootstrap_resamples": 500,
                            "arms": {"baseline": None, "per_task": {"profiles": {"sst2": {"beta": 0.4,
                                                                                         "heads": "2-5:0,4;7:1"}}}}})
    rng = np.random.default_rng(1)
    gold = list(rng.integers(0, 2, 12))
    versions = {"act_plugin": "0", "lm_eval": "0", "vllm": "0", "torch": "0", "python": "3"}
    state = runner.RunState.open(tmp_path, runner.run_inputs(cfg, "/m", tmp_path, versions))
    correct = {}
    for arm, task in cfg.pieces:
        correct[(arm, task)] = list(rng.integers(0, 2, 12))
        records = records_from_samples(task, f"act_{task}", arm, 0, _fake_samples(correct[(arm, task)], gold), "acc")
        name = f"samples_{arm}_{task}.jsonl"
        write_samples(tmp_path / name, records)
        request = "off" if arm == "baseline" else f"per_task.{task}"
        state.record({"arm": arm, "task": task, "samples": name, "records": len(records), "wall_time_s": 1.0,
                      "lm_eval": {"0": {"acc,none": float(np.mean(correct[(arm, task)]))}}, "lm_eval_raw": {},
                      "preemptions": 0, "engine": {"act_setting": None, "request": request, "config": None,
                                                   "calibration": None, "preemptions": 0}})
    assert ("per_task", "mr") not in correct  # never run
    results = runner.assemble(cfg, state, "/m", tmp_path, "test", {"sst2": "act_sst2", "mr": "act_mr"}, [0],
                              versions)
    runner.write_outputs(tmp_path, cfg, state, results)
    saved = EvalResults.from_json((tmp_path / "results.json").read_text())  # valid against the schema

    mr = saved.tasks["mr"]
    c = mr.comparisons["per_task"]
    assert not c.calibrated and c.delta == 0 and c.improved == c.worsened == 0 and c.n == 12
    assert mr.samples["per_task"] == "samples_baseline_mr.jsonl" and mr.accuracy["per_task"] == mr.accuracy["baseline"]
    assert mr.lm_eval["per_task"] == mr.lm_eval["baseline"]
    sst2 = saved.tasks["sst2"].comparisons["per_task"]
    assert sst2.calibrated and sst2.delta == pytest.approx(np.mean(correct[("per_task", "sst2")]) -
                                                           np.mean(correct[("baseline", "sst2")]))
    arm = saved.arms["per_task"]
    assert arm.per_task and arm.act is None and arm.tasks["sst2"].calibrated and arm.tasks["sst2"].act["beta"] == 0.4
    assert arm.tasks["mr"].model_dump() == {"calibrated": False, "profile": None, "act": None, "act_hash": None,
                                            "engine": None}
    assert arm.engine.request == "per_task.sst2" and arm.documents == 24 and arm.wall_time_s == 1.0
    assert saved.summary["per_task"].uncalibrated_tasks == ["mr"]
    assert saved.summary["per_task"].mean_delta == pytest.approx(sst2.delta / 2)
    assert saved.arms["baseline"].tasks is None and not saved.arms["baseline"].per_task

    report = (tmp_path / "report.md").read_text()
    assert "| mr (**uncalibrated: no profile for this task**) | acc | 12 |" in report
    assert "| sst2 | acc | 12 |" in report
    assert "| sst2 | `per_task.sst2` | beta 0.4, tau 0.1 | `2-5:0,4; 7:1` (9 heads in 5 layers) |" in report
    assert "| mr | **uncalibrated (no profile)**" in report
    assert "per-task profiles: 1 of 2 tasks calibrated" in report and "**uncalibrated (no profile): mr**" in report
    assert "Uncalibrated in per_task (no profile for the task): mr." in report
    assert (tmp_path / "deltas.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("spec", ["2-27:0,4", "1:0", "2-5:0;7:1-3,5;8:*;9:*", "3:1;5:1", "0:0-7,9"])
def test_heads_spec_reads_back_as_the_same_heads(spec):
    from act_plugin.config import ACTConfig
    from act_plugin.eval.report import heads_spec

    act = ACTConfig.from_any({"heads": spec})
    shown = heads_spec(act.to_dict()["heads"])
    assert ACTConfig.from_any({"heads": shown}).heads == act.heads
    assert heads_spec(ACTConfig.from_any({"heads": "2-5:0;7:1-3,5;8:*;9:*"}).to_dict()["heads"]) == \
        "2-5:0; 7:1-3,5; 8-9:*"


def _assemble_one_seed(tmp_path, correct: dict[tuple[str, str], list[int]], tasks: list[str]):
    """Results of a baseline / act run whose per-document correctness is ``correct[(arm, task)]``."""
    cfg = load_eval_config({"name": "fake", "model": "smollm2-135m", "tasks": tasks, "bootstrap_resamples": 200,
                            "arms": {"baseline": None, "act": {"beta": 0.4, "heads": "2:0"}}})
    versions = {"act_plugin": "0", "lm_eval": "0", "vllm": "0", "torch": "0", "python": "3"}
    state = runner.RunState.open(tmp_path, runner.run_inputs(cfg, "/m", tmp_path, versions))
    for (arm, task), corr in correct.items():
        gold = [0] * len(corr)
        name = f"samples_{arm}_{task}.jsonl"
        write_samples(tmp_path / name, records_from_samples(task, f"act_{task}", arm, 0, _fake_samples(corr, gold),
                                                            "acc"))
        state.record({"arm": arm, "task": task, "samples": name, "records": len(corr), "wall_time_s": 1.0,
                      "lm_eval": {"0": {}}, "lm_eval_raw": {}, "preemptions": 0,
                      "engine": {"act_setting": None, "request": None, "config": None, "calibration": None,
                                 "preemptions": 0}})
    results = runner.assemble(cfg, state, "/m", tmp_path, "test", {t: f"act_{t}" for t in tasks}, [0], versions)
    runner.write_outputs(tmp_path, cfg, state, results)
    return results, (tmp_path / "report.md").read_text()


def _pair(n: int, right: int, better: int, worse: int) -> tuple[list[int], list[int]]:
    """Baseline right on the first ``right`` documents; the arm turns ``worse`` of those wrong
    and ``better`` of the rest right."""
    base = [1] * right + [0] * (n - right)
    treat = base.copy()
    for i in range(worse):
        treat[i] = 0
    for i in range(right, right + better):
        treat[i] = 1
    return base, treat


def test_mde_and_resolution_reach_results_and_report(tmp_path):
    """make demo's SST-5 case (n = 100, 3 discordant documents) is not resolvable at all, and
    the report says why; a small delta at n = 400 is below its MDE; a large one is resolved."""
    from act_plugin.stats import minimum_detectable_effect

    cases = {"sst5": _pair(100, 40, 2, 1), "sst2": _pair(400, 200, 20, 14), "mr": _pair(400, 200, 60, 10)}
    correct = {(arm, t): pair[i] for t, pair in cases.items() for i, arm in enumerate(("baseline", "act"))}
    results, report = _assemble_one_seed(tmp_path, correct, list(cases))
    sst5, sst2, mr = (results.tasks[t].comparisons["act"] for t in ("sst5", "sst2", "mr"))

    assert sst5.delta == pytest.approx(0.01) and sst5.mde is None and not sst5.resolved
    assert ("sst5, act: 3 discordant pairs: an exact McNemar test cannot reach p < 0.05 with fewer than 6: "
            "not resolved at this n") in results.warnings[0]
    assert sst2.mde == pytest.approx(minimum_detectable_effect(400, 34 / 400)) and not sst2.resolved
    assert sst2.mde > 0.03 > abs(sst2.delta)
    assert "sst2, act: n = 400 documents resolves effects of at least" in " ".join(results.warnings)
    assert mr.resolved and mr.mde is not None and mr.mde < mr.delta
    assert not any(w.startswith("mr,") for w in results.warnings)

    assert "| none resolvable (!) |" in report.split("| sst5 |")[1].splitlines()[0]
    assert f"| {100 * sst2.mde:.1f} pt (!) |" in report.split("| sst2 |")[1].splitlines()[0]
    assert f"| {100 * mr.mde:.1f} pt |" in report.split("| mr |")[1].splitlines()[0]


def test_first_token_settings_are_grouped_by_gamma():
    from act_plugin.eval.report import _heads_count, _rule_settings

    every = {f"{layer}:all": 2.0 for layer in range(2, 28)}
    assert _rule_settings({"rule": "first_token", "scale": every, "name": "sst5", "model": "m"}) \
        == "rule first_token, scale x2 on 2-27:*"
    assert _rule_settings({"rule": "first_token", "scale": {"15:3,8": 2.0, "16:1": 0.5, "17:all": 2.0}}) \
        == "rule first_token, scale x2 on 15:3,8; 17:*; x0.5 on 16:1"
    assert _heads_count({"2": "all", "3": [1, 2]}) == "2 heads in 1 layers + all heads of 1 layers"
