"""Results assembly and reports from lm-eval-style logged samples (no engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from act_plugin.eval import runner
from act_plugin.eval.config import load_eval_config
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
            records += runner._records("sst2", "act_sst2", arm, s, samples, "acc")
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
