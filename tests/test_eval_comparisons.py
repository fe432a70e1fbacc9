"""Comparisons of two calibrated arms (the eval config's ``comparisons``), through the real
lm-eval harness with the stand-in engine of ``test_eval_runner``: the statistics equal
:func:`act_plugin.stats.compare` on the per-sample files, an arm without a profile for a task
stands there as the baseline's records, and adding comparisons to a finished run re-uses every
piece."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_eval_runner import ACT, TASKS, _numbers, fake_engine, make_cfg  # noqa: F401 - fake_engine is a fixture

from act_plugin.eval import runner
from act_plugin.eval.records import correctness_matrix
from act_plugin.eval.report import read_samples
from act_plugin.eval.results import EvalResults
from act_plugin.stats import compare, describe_mde, macro_bootstrap_ci, resolution

SST2_PROFILE = {"beta": 0.4, "heads": "1:0"}
CB_FIRST_TOKEN = {"rule": "first_token", "scale": 2.0, "heads": "3:1"}
# three arms: the baseline, one ACT config for every task, per-task profiles with none for cb
THREE_ARMS = {"baseline": None, "act": ACT, "rules": {"profiles": {"sst2": SST2_PROFILE}}}


def _matrix(out, results: EvalResults, arm: str, task: str) -> np.ndarray:
    """The arm's correctness on the task, read from the per-sample file results.json names."""
    return correctness_matrix(read_samples(out / results.tasks[task].samples[arm]), results.settings.seeds)[1]


def _pct(x: float, signed: bool = False) -> str:
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _p(x: float) -> str:
    return f"{x:.3g}" if x >= 0.001 else "<0.001"


def _expected_row(label: str, c, mde_cell: str) -> str:
    return (f"| {label} | acc | {c.n} | {_pct(c.base_acc)} | {_pct(c.treat_acc)} | {_pct(c.delta, True)} | "
            f"[{_pct(c.ci_low, True)}, {_pct(c.ci_high, True)}] | {c.improved} / {c.worsened} | "
            f"{_p(c.p_value)} / {_p(c.p_value_midp)} | {mde_cell} |")


def test_a_pair_of_arms_is_compare_on_their_samples(fake_engine, shared_data, tmp_path):  # noqa: F811
    cfg = make_cfg(shared_data, arms=THREE_ARMS, comparisons=[["rules", "act"]])
    run = runner.run_eval(cfg, output_dir=tmp_path / "out", progress=False)
    out, r = run.output_dir, run.results
    saved = EvalResults.from_json((out / "results.json").read_text())  # valid against the schema
    assert saved.comparisons == r.comparisons and len(r.comparisons) == 1
    pair = r.comparisons[0]
    assert (pair.treatment, pair.reference) == ("rules", "act") and list(pair.tasks) == TASKS
    # cb: rules has no profile, so its records are the baseline's file
    assert r.tasks["cb"].samples["rules"] == "samples_baseline_cb.jsonl"
    report = (out / "report.md").read_text()
    section = report.split("## rules vs act\n")[1].split("\n## ")[0]
    assert report.index("## rules vs act") > report.index("## act vs baseline")
    assert "| task | metric | n | act | rules | delta (points) |" in section

    pairs = []
    for task in TASKS:
        act, rules = _matrix(out, r, "act", task), _matrix(out, r, "rules", task)
        pairs.append((act, rules))
        expected = compare(act, rules, cfg.bootstrap_resamples, cfg.confidence, cfg.stats_seed)
        got = pair.tasks[task]
        assert {k: getattr(got, k) for k in expected.to_dict()} == pytest.approx(expected.to_dict())
        res = resolution(expected.n, expected.docs_better + expected.docs_worse, expected.delta)
        assert (got.mde, got.resolved) == (res.mde, res.resolved)
        assert got.discordant_rate == pytest.approx((expected.docs_better + expected.docs_worse) / expected.n)
        if not res.resolved:
            assert f"{task}, rules vs act: {res.note}: not resolved at this n" in "\n".join(r.warnings)
        label = task if task == "sst2" else "cb (**rules uncalibrated: no profile for this task**)"
        mde_cell = describe_mde(res.mde, expected.docs_better + expected.docs_worse > 0) + \
            ("" if res.resolved else " (!)")
        assert _expected_row(label, expected, mde_cell) in section.splitlines()
    assert pair.tasks["sst2"].treatment_calibrated and pair.tasks["sst2"].reference_calibrated
    assert not pair.tasks["cb"].treatment_calibrated and pair.tasks["cb"].reference_calibrated
    # on cb the pair is the baseline against act, seen from the other side
    assert pair.tasks["cb"].delta == pytest.approx(-r.tasks["cb"].comparisons["act"].delta)
    assert pair.tasks["cb"].improved == r.tasks["cb"].comparisons["act"].worsened

    s = pair.summary
    lo, hi = macro_bootstrap_ci(pairs, cfg.bootstrap_resamples, cfg.confidence, cfg.stats_seed)
    assert s.mean_delta == pytest.approx(np.mean([pair.tasks[t].delta for t in TASKS]))
    assert (s.ci_low, s.ci_high) == pytest.approx((lo, hi))
    assert s.improved == sum(pair.tasks[t].improved for t in TASKS)
    assert s.treatment_uncalibrated_tasks == ["cb"] and s.reference_uncalibrated_tasks == []
    assert (f"| **mean over tasks** | | | | | **{_pct(s.mean_delta, True)}** | "
            f"[{_pct(lo, True)}, {_pct(hi, True)}] | {s.improved} / {s.worsened} | | |") in section
    assert "Uncalibrated in rules (no profile for the task): cb: the baseline's records stand for rules" in section
    # the comparisons with the baseline are what they were without the pair
    assert set(r.summary) == {"act", "rules"}


def test_two_per_task_arms_without_a_profile_for_the_same_task(fake_engine, shared_data, tmp_path):  # noqa: F811
    """The rules-vs-act case: both arms per-task; on cb neither has a profile (both are the
    baseline's records: delta 0, marked), on sst2 both differ from the baseline."""
    arms = {"baseline": None, "act": {"profiles": {"sst2": SST2_PROFILE}},
            "rules": {"profiles": {"sst2": CB_FIRST_TOKEN}}}
    run = runner.run_eval(make_cfg(shared_data, arms=arms, comparisons=[["rules", "act"]]),
                          output_dir=tmp_path / "out", progress=False)
    pair = run.results.comparisons[0]
    cb = pair.tasks["cb"]
    assert not cb.treatment_calibrated and not cb.reference_calibrated
    assert cb.delta == 0 and cb.improved == cb.worsened == 0 and cb.resolved
    assert pair.summary.treatment_uncalibrated_tasks == pair.summary.reference_uncalibrated_tasks == ["cb"]
    assert pair.summary.mean_delta == pytest.approx(pair.tasks["sst2"].delta / 2)
    report = (run.output_dir / "report.md").read_text()
    assert "| cb (**uncalibrated in both: no profile for this task**) | acc |" in report
    assert "Uncalibrated in both (no profile for the task): cb: both are the baseline's records" in report


def test_adding_comparisons_to_a_finished_run_reuses_every_piece(fake_engine, shared_data, tmp_path):  # noqa: F811
    versions = {"act_plugin": "0", "lm_eval": "0", "vllm": "0", "torch": "0", "python": "3"}
    plain = make_cfg(shared_data, arms=THREE_ARMS)
    paired = make_cfg(shared_data, arms=THREE_ARMS, comparisons=[["rules", "act"]])
    assert runner.run_inputs(plain, "/m", shared_data, versions) == runner.run_inputs(paired, "/m", shared_data,
                                                                                     versions)
    out = tmp_path / "out"
    first = runner.run_eval(plain, output_dir=out, progress=False)
    assert not first.reused and first.results.comparisons == []
    assert "## rules vs act" not in (out / "report.md").read_text()
    state_before = json.loads((out / runner.STATE_FILE).read_text())
    samples_before = {p.name: p.read_bytes() for p in out.glob("samples_*.jsonl")}
    numbers_before = _numbers(out)
    chart_height_before = _png_height(out / "deltas.png")

    fake_engine.calls, fake_engine.seen, started = 0, [], len(fake_engine.started)
    second = runner.run_eval(paired, output_dir=out, progress=False)
    assert sorted(second.reused) == sorted(paired.pieces) and fake_engine.calls == 0
    assert len(fake_engine.started) == started  # no engine was even started
    assert {p.name: p.read_bytes() for p in out.glob("samples_*.jsonl")} == samples_before
    state_after = json.loads((out / runner.STATE_FILE).read_text())
    assert state_after["key"] == state_before["key"] and state_after["pieces"] == state_before["pieces"]
    # the results and report are rewritten with the pair; every other number is unchanged
    numbers_after = _numbers(out)
    pairs = numbers_after["results"].pop("comparisons")
    numbers_after["results"]["warnings"] = [w for w in numbers_after["results"]["warnings"] if " vs " not in w]
    numbers_before["results"].pop("comparisons")
    assert numbers_after == numbers_before
    assert [(p["treatment"], p["reference"]) for p in pairs] == [("rules", "act")]
    assert EvalResults.from_json((out / "results.json").read_text()).comparisons == second.results.comparisons
    assert "## rules vs act" in (out / "report.md").read_text()
    assert "comparisons" in (out / "config.yaml").read_text()
    # the chart gets a second panel for the pair, as tall as the first
    assert _png_height(out / "deltas.png") == pytest.approx(2 * chart_height_before, rel=0.05)


def _png_height(path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[20:24], "big")  # IHDR: width at 16-19, height at 20-23
