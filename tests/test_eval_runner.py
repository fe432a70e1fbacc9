"""The eval runner's arms and files, through the real lm-eval harness with a stand-in engine.

``FakeEngine`` takes the place of the vLLM-backed ``ActVLLM``: it reads its ACT setting the
way the engine does (``additional_config={"act": False}``: ACT off; no setting: the
exported ``ACT_CONFIG``), resolves each request's arm against it, and scores every choice
with a hash of (calibration in force, prompt, choice), so a different calibration gives
different predictions. No engine start: these tests take seconds.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from lm_eval.api.model import LM

from act_plugin.config import ACTConfig, ACTEngineConfig
from act_plugin.eval import runner
from act_plugin.eval.config import load_eval_config
from act_plugin.eval.report import read_samples
from act_plugin.eval.results import EvalResults

TASKS = ["sst2", "cb"]  # small splits: lm-eval builds each task's whole split per call
ACT = {"beta": 0.4, "heads": "2-27:0,4"}
LEAKED = {"beta": 0.0, "heads": "2-27:*"}  # what an exported ACT_CONFIG holds
_UNSET = object()


class FakeEngine(LM):
    """A stand-in for ``ActVLLM`` (see the module docs)."""

    started: list[FakeEngine] = []
    honours_act_off = True  # False: an engine that reads ACT_CONFIG even when told ACT is off
    crash_after_calls: int | None = None
    calls = 0

    def __init__(self, pretrained, act=None, next_token=True, batch_size="auto", additional_config=None, **engine):
        super().__init__()
        setting = act if act is not None else (additional_config or {}).get("act", _UNSET)
        self.setting = setting
        if setting is False and self.honours_act_off:
            self.config = None
        elif setting is _UNSET or setting is False:
            env = os.environ.get("ACT_CONFIG")
            self.config = ACTEngineConfig.from_any(env) if env else None
        else:
            self.config = ACTEngineConfig.from_any(setting)
        self.arm = None
        self.model = self
        FakeEngine.started.append(self)

    def set_arm(self, arm):
        self.arm = arm

    def status(self) -> dict:
        return {"config": self.config.to_dict() if self.config else None, "preemptions": 0}

    def loglikelihood(self, requests, disable_tqdm=False):
        FakeEngine.calls += 1
        if FakeEngine.crash_after_calls is not None and FakeEngine.calls > FakeEngine.crash_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        if self.config is None:
            if self.arm is not None:
                raise ValueError("ACT is off on this engine: requests may not name an arm")
            calibration = None
        else:
            profile = self.config.resolve_request(self.arm)
            calibration = self.config.profiles[profile] if profile else None
        tag = "off" if calibration is None or calibration.is_identity else calibration.hash
        out = []
        for r in requests:
            context, continuation = r.args
            h = hashlib.sha256(f"{tag}|{context}|{continuation}".encode()).digest()
            out.append((-h[0] / 25.6, False))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):  # pragma: no cover
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):  # pragma: no cover
        raise NotImplementedError


@pytest.fixture
def fake_engine(monkeypatch):
    import act_plugin.eval.model as eval_model

    monkeypatch.setattr(eval_model, "ActVLLM", FakeEngine)
    monkeypatch.setattr(runner, "engine_status", lambda lm: lm.status())
    monkeypatch.delenv("ACT_CONFIG", raising=False)
    FakeEngine.started = []
    FakeEngine.honours_act_off = True
    FakeEngine.crash_after_calls = None
    FakeEngine.calls = 0
    return FakeEngine


def make_cfg(shared_data, **changes):
    data = {
        "name": "fake", "model": "/nonexistent-model-folder", "tasks": TASKS, "limit": 12,
        "data_dir": str(shared_data), "bootstrap_resamples": 200,
        "arms": {"baseline": None, "act": ACT, "identity": {"control": True, "beta": 1.0, "heads": "2-27:0,4"}},
    }
    data.update(changes)
    return load_eval_config(data)


def _numbers(out) -> dict:
    """What must not change between an uninterrupted and a resumed run: every sample row and
    every number of results.json except timings and dates."""
    results = json.loads((out / "results.json").read_text())
    for key in ("created", "engine_start_s"):
        results.pop(key)
    for arm in results["arms"].values():
        arm.pop("wall_time_s")
    samples = {p.name: read_samples(p) for p in sorted(out.glob("samples_*.jsonl"))}
    return {"results": results, "samples": samples}


# ------------------------------------------------------------------------ issue 11 finding 5
@pytest.mark.parametrize("share_engine", [False, True])
def test_every_engine_is_told_its_arm_so_act_config_cannot_leak(share_engine, fake_engine, shared_data, tmp_path,
                                                                monkeypatch):
    leaked = tmp_path / "leaked.yaml"
    leaked.write_text(json.dumps(LEAKED))
    monkeypatch.setenv("ACT_CONFIG", str(leaked))
    cfg = make_cfg(shared_data, share_engine=share_engine)
    run = runner.run_eval(cfg, output_dir=tmp_path / "out", progress=False)
    # no engine was left to pick up ACT_CONFIG: each got an explicit setting
    assert all(e.setting is not _UNSET for e in fake_engine.started)
    arm = run.results.arms["baseline"]
    if not share_engine:  # the baseline's own engine is vanilla: ACT explicitly off
        base_engine = fake_engine.started[0]
        assert base_engine.setting is False and base_engine.config is None
        assert arm.engine.act_setting is False and arm.engine.config is None and arm.engine.request is None
    else:  # one engine holding the calibrated arms; the baseline's requests say "off"
        assert arm.engine.request == "off" and set(arm.engine.config["profiles"]) == {"act", "identity"}
    assert arm.engine.calibration is None
    assert run.results.arms["act"].engine.calibration == ACTConfig.from_any(ACT).to_dict()
    # and the baseline's predictions are those of an uncalibrated engine
    monkeypatch.delenv("ACT_CONFIG")
    clean = runner.run_eval(cfg, output_dir=tmp_path / "clean", progress=False)
    for task in TASKS:
        assert run.results.tasks[task].accuracy == clean.results.tasks[task].accuracy
        assert read_samples(run.output_dir / f"samples_baseline_{task}.jsonl") == \
            read_samples(clean.output_dir / f"samples_baseline_{task}.jsonl")


def test_an_engine_running_another_calibration_is_refused(fake_engine, shared_data, tmp_path, monkeypatch):
    leaked = tmp_path / "leaked.yaml"
    leaked.write_text(json.dumps(LEAKED))
    monkeypatch.setenv("ACT_CONFIG", str(leaked))
    fake_engine.honours_act_off = False  # an engine that ignores "ACT off"
    with pytest.raises(RuntimeError, match=r"arm 'baseline': the engine runs .*Refusing to report a different arm"):
        runner.run_eval(make_cfg(shared_data, share_engine=False), output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "results.json").exists()


# ------------------------------------------------------------------------ issue 11 finding 7
def test_interrupted_run_resumes_without_loss_or_change(fake_engine, shared_data, tmp_path):
    cfg = make_cfg(shared_data)
    whole = runner.run_eval(cfg, output_dir=tmp_path / "whole", progress=False)
    calls_per_run = fake_engine.calls
    assert not whole.reused

    out = tmp_path / "cut"
    fake_engine.calls = 0
    fake_engine.crash_after_calls = calls_per_run // 2
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(cfg, output_dir=out, progress=False)
    state = json.loads((out / runner.STATE_FILE).read_text())
    finished = sorted(state["pieces"])
    assert 0 < len(finished) < len(cfg.arms) * len(TASKS) and not state["complete"]
    assert not (out / "results.json").exists() and not (out / "report.md").exists()
    # every finished piece is on disk, whole; nothing else looks like a result
    on_disk = sorted(p.name for p in out.glob("samples_*.jsonl"))
    assert on_disk == sorted(p["samples"] for p in state["pieces"].values())
    kept = {name: (out / name).read_bytes() for name in on_disk}

    fake_engine.calls = 0
    fake_engine.crash_after_calls = None
    resumed = runner.run_eval(cfg, output_dir=out, progress=False)
    assert sorted(f"{a}/{t}" for a, t in resumed.reused) == finished
    assert all((out / name).read_bytes() == data for name, data in kept.items())  # reused, not re-run
    assert _numbers(out) == _numbers(whole.output_dir)
    assert json.loads((out / runner.STATE_FILE).read_text())["complete"] is True
    EvalResults.from_json((out / "results.json").read_text())  # valid against the schema


def test_stale_and_foreign_files_and_other_runs(fake_engine, shared_data, tmp_path):
    cfg = make_cfg(shared_data)
    out = tmp_path / "out"
    runner.run_eval(cfg, output_dir=out, progress=False)
    # a samples file no piece accounts for (an earlier run's arm) is removed on resume
    (out / "samples_old_sst2.jsonl").write_text('{"doc_id": 0}\n')
    again = runner.run_eval(cfg, output_dir=out, progress=False)
    assert len(again.reused) == len(cfg.arms) * len(TASKS)
    assert not (out / "samples_old_sst2.jsonl").exists()
    # a different run in the same folder is refused, naming what differs
    with pytest.raises(Exception, match=r"holds a different run \(differs in: limit\)"):
        runner.run_eval(make_cfg(shared_data, limit=11), output_dir=out, progress=False)
    # a folder with files no eval run wrote is refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "samples_baseline_sst2.jsonl").write_text("{}\n")
    with pytest.raises(Exception, match="not empty and holds no eval run"):
        runner.run_eval(cfg, output_dir=foreign, progress=False)
    # a changed samples file is not trusted: that piece runs again
    state = json.loads((out / runner.STATE_FILE).read_text())
    victim = out / state["pieces"]["act/sst2"]["samples"]
    victim.write_text(victim.read_text().replace('"correct": 0.0', '"correct": 1.0'))
    third = runner.run_eval(cfg, output_dir=out, progress=False)
    assert ("act", "sst2") not in third.reused and len(third.reused) == len(cfg.arms) * len(TASKS) - 1
    assert _numbers(out) == _numbers(tmp_path / "out") and "correct" in victim.read_text()


# ------------------------------------------------------------------------ report
def test_report_flags_controls_and_unresolved_effects(fake_engine, shared_data, tmp_path):
    run = runner.run_eval(make_cfg(shared_data), output_dir=tmp_path / "out", progress=False)
    report = (run.output_dir / "report.md").read_text()
    assert "**control** (calibrates nothing: should match the baseline)" in report
    assert run.results.arms["identity"].control and not run.results.arms["identity"].calibrates
    for task in TASKS:
        c = run.results.tasks[task].comparisons["act"]
        assert c.mde is not None and c.resolved == (not 0 < abs(c.delta) < c.mde)
        if not c.resolved:
            assert any(w.startswith(f"{task}, act: n = 12 documents resolves effects of at least")
                       for w in run.results.warnings)
    assert "MDE (points)" in report and "power 0.8" in report
    assert run.results.arms["baseline"].engine.request == "off"  # shared engine: told per request
