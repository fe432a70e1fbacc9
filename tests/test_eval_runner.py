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
from act_plugin.eval import engine_arms, runner
from act_plugin.eval.config import load_eval_config
from act_plugin.eval.report import read_samples
from act_plugin.eval.results import EvalResults
from act_plugin.stats import resolution

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
    seen: list[tuple[str | None, str | None]] = []  # (request's act value, hash of the calibration it ran with)

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
        FakeEngine.seen.append((self.arm, calibration.hash if calibration is not None else None))
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
    monkeypatch.setattr(engine_arms, "engine_status", lambda lm: lm.status())
    monkeypatch.delenv("ACT_CONFIG", raising=False)
    FakeEngine.started = []
    FakeEngine.honours_act_off = True
    FakeEngine.crash_after_calls = None
    FakeEngine.calls = 0
    FakeEngine.seen = []
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
        # the exact MDE at the observed discordance (none resolvable at n = 12 unless almost every
        # document flips), and the resolution the shared statistics give
        expected = resolution(c.n, c.docs_better + c.docs_worse, c.delta)
        assert (c.mde, c.resolved) == (expected.mde, expected.resolved)
        if not c.resolved:
            assert f"{task}, act: {expected.note}: not resolved at this n" in " ".join(run.results.warnings)
            assert f"| {task} |" in report and "(!)" in report
    assert "| MDE |" in report and "power 0.8" in report and "exact McNemar" in report
    assert run.results.arms["baseline"].engine.request == "off"  # shared engine: told per request


# ------------------------------------------------------------------------ per-task arms
SST2_PROFILE = {"beta": 0.4, "heads": "1:0"}
CB_PROFILE = {"beta": 0.3, "heads": "19:3"}


def _per_task_arms(profiles: dict) -> dict:
    return {"baseline": None, "act": ACT, "per_task": {"profiles": profiles}}


def _hash(act: dict) -> str:
    return ACTConfig.from_any(act).hash


@pytest.mark.parametrize("share_engine", [True, False])
def test_per_task_arm_runs_each_task_with_its_profile_and_reuses_the_baseline_without_one(
        share_engine, fake_engine, shared_data, tmp_path):
    # sst2 has a profile, cb none (dbpedia's is not in this eval: ignored)
    cfg = make_cfg(shared_data, share_engine=share_engine,
                   arms=_per_task_arms({"sst2": SST2_PROFILE, "dbpedia": CB_PROFILE}))
    run = runner.run_eval(cfg, output_dir=tmp_path / "out", progress=False)
    out, r = run.output_dir, run.results

    # routing: the arm's sst2 requests name its sst2 profile and ran with it; cb was never sent
    sent = {arm for arm, _ in fake_engine.seen}
    assert {h for arm, h in fake_engine.seen if arm == "per_task.sst2"} == {_hash(SST2_PROFILE)}
    assert not any(arm and arm.startswith("per_task") and arm != "per_task.sst2" for arm in sent)
    assert {h for arm, h in fake_engine.seen if arm == "act"} == {_hash(ACT)}
    if share_engine:  # one engine holding every arm's profiles
        (engine,) = fake_engine.started
        assert set(engine.config.profiles) == {"act", "per_task.sst2"} and engine.config.default is None
    else:  # baseline vanilla, then each arm's own engine; the per-task arm's with no default
        base, act, per_task = fake_engine.started
        assert base.setting is False and act.config.default == "act"
        assert set(per_task.config.profiles) == {"per_task.sst2"} and per_task.config.default is None

    # only the pieces that run were run: cb in the per-task arm is the baseline's
    state = json.loads((out / runner.STATE_FILE).read_text())
    assert sorted(state["pieces"]) == ["act/cb", "act/sst2", "baseline/cb", "baseline/sst2", "per_task/sst2"]
    assert not (out / "samples_per_task_cb.jsonl").exists()
    raw = json.loads((out / "lm_eval_raw.json").read_text())
    assert list(raw["per_task"]) == ["sst2"]

    arm = r.arms["per_task"]
    assert arm.per_task and arm.act is None and arm.calibrates and not arm.control
    assert arm.tasks is not None and r.arms["act"].tasks is None and not r.arms["act"].per_task
    sst2, cb = arm.tasks["sst2"], arm.tasks["cb"]
    assert sst2.calibrated and sst2.profile == "per_task.sst2" and sst2.act_hash == _hash(SST2_PROFILE)
    assert sst2.engine.request == "per_task.sst2"
    assert sst2.engine.calibration == ACTConfig.from_any(SST2_PROFILE).to_dict()  # read back from the engine
    assert arm.engine.request == "per_task.sst2"
    assert not cb.calibrated and cb.profile is None and cb.act is None and cb.engine is None
    assert arm.documents == r.arms["baseline"].documents

    # the uncovered task: the baseline's records, delta 0, marked
    c = r.tasks["cb"].comparisons["per_task"]
    assert not c.calibrated and c.delta == 0 and c.improved == c.worsened == 0 and c.resolved
    assert r.tasks["cb"].samples["per_task"] == r.tasks["cb"].samples["baseline"] == "samples_baseline_cb.jsonl"
    assert r.tasks["cb"].accuracy["per_task"] == r.tasks["cb"].accuracy["baseline"]
    assert r.tasks["cb"].comparisons["act"].calibrated  # a single arm runs every task
    # the covered task ran calibrated: other scores than the baseline's
    assert r.tasks["sst2"].comparisons["per_task"].calibrated
    base = read_samples(out / "samples_baseline_sst2.jsonl")
    mine = read_samples(out / "samples_per_task_sst2.jsonl")
    assert [x["loglikelihoods"] for x in base] != [x["loglikelihoods"] for x in mine]
    assert r.summary["per_task"].uncalibrated_tasks == ["cb"] and r.summary["act"].uncalibrated_tasks == []
    assert r.summary["per_task"].mean_delta == pytest.approx(r.tasks["sst2"].comparisons["per_task"].delta / 2)
    assert any(w.startswith("arm 'per_task' has no profile for task(s) cb: UNCALIBRATED") for w in r.warnings)

    saved = EvalResults.from_json((out / "results.json").read_text())  # valid against the schema
    assert saved.arms["per_task"].tasks["cb"].calibrated is False
    report = (out / "report.md").read_text()
    assert "| cb (**uncalibrated: no profile for this task**) |" in report
    assert "### per_task: profile per task" in report
    assert "| sst2 | `per_task.sst2` | beta 0.4, tau 0.1 | `1:0`" in report
    assert "| cb | **uncalibrated (no profile)**" in report and "Uncalibrated in per_task (no profile" in report
    assert "**uncalibrated (no profile): cb**" in report  # the arms table
    assert (out / "deltas.png").read_bytes()[:4] == b"\x89PNG"


def test_read_back_checks_every_task_of_a_per_task_arm(shared_data):
    cfg = make_cfg(shared_data, tasks=["sst2", "cb", "mr"], arms=_per_task_arms({"sst2": SST2_PROFILE,
                                                                                  "cb": CB_PROFILE}))
    right = {"config": runner.engine_setting(cfg, "per_task"), "preemptions": 0}
    for task, profile in (("sst2", SST2_PROFILE), ("cb", CB_PROFILE)):
        got = runner.read_back(cfg, "per_task", task, right)
        assert got["request"] == f"per_task.{task}"
        assert got["calibration"] == ACTConfig.from_any(profile).to_dict()
    assert runner.read_back(cfg, "act", "mr", right)["request"] == "act"
    with pytest.raises(ValueError, match="no profile for task 'mr'"):
        runner.request_value(cfg, "per_task", "mr")
    # an engine holding the tasks' profiles swapped: each task would run the other's
    swapped = ACTEngineConfig.from_any(right["config"]).to_dict()
    p = swapped["profiles"]
    p["per_task.sst2"], p["per_task.cb"] = p["per_task.cb"], p["per_task.sst2"]
    with pytest.raises(RuntimeError, match=r"arm 'per_task', task 'sst2': the engine runs .*'19'.* for requests "
                                           r"with act='per_task.sst2'.*Refusing to report a different arm"):
        runner.read_back(cfg, "per_task", "sst2", {"config": swapped})
    # an engine without the task's profile
    del p["per_task.cb"]
    with pytest.raises(RuntimeError, match=r"arm 'per_task', task 'cb': unknown ACT profile 'per_task.cb'"):
        runner.read_back(cfg, "per_task", "cb", {"config": swapped})
    # one engine per arm: the per-task arm's own engine holds its profiles, no default
    own = make_cfg(shared_data, tasks=["sst2", "cb", "mr"], share_engine=False,
                   arms=_per_task_arms({"sst2": SST2_PROFILE, "cb": CB_PROFILE}))
    assert runner.engine_setting(own, "per_task") == {
        "profiles": {"per_task.sst2": ACTConfig.from_any(SST2_PROFILE).to_dict(),
                     "per_task.cb": ACTConfig.from_any(CB_PROFILE).to_dict()}, "default": None}
    assert runner.request_value(own, "per_task", "cb") == "per_task.cb" and runner.request_value(own, "baseline",
                                                                                                "cb") is None
    with pytest.raises(RuntimeError, match=r"arm 'per_task', task 'sst2': the engine runs no calibration"):
        runner.read_back(own, "per_task", "sst2", {"config": None})


def test_piece_keys_follow_each_tasks_profile(tmp_path, shared_data):
    versions = {"act_plugin": "0", "lm_eval": "0", "vllm": "0", "torch": "0", "python": "3"}

    def state(profiles, act=ACT):
        cfg = make_cfg(shared_data, arms={**_per_task_arms(profiles), "act": act})
        return runner.RunState(tmp_path, runner.run_inputs(cfg, "/m", shared_data, versions))

    a = state({"sst2": SST2_PROFILE, "cb": CB_PROFILE})
    b = state({"sst2": SST2_PROFILE, "cb": {**CB_PROFILE, "beta": 0.2}})  # cb's profile edited
    assert a.key == b.key  # the same run: it resumes in the same folder
    assert a.piece_key("per_task", "sst2") == b.piece_key("per_task", "sst2")
    assert a.piece_key("per_task", "cb") != b.piece_key("per_task", "cb")  # only that piece re-runs
    assert all(a.piece_key(arm, t) == b.piece_key(arm, t) for arm in ("baseline", "act") for t in TASKS)
    assert a.piece_key("per_task", "sst2") != a.piece_key("act", "sst2")
    assert state({"sst2": SST2_PROFILE, "cb": CB_PROFILE}, act={**ACT, "beta": 0.3}).key != a.key  # one config


def test_editing_one_tasks_profile_reruns_only_that_task(fake_engine, shared_data, tmp_path):
    out = tmp_path / "out"
    first = runner.run_eval(make_cfg(shared_data, arms=_per_task_arms({"sst2": SST2_PROFILE, "cb": CB_PROFILE})),
                            output_dir=out, progress=False)
    assert not first.reused and first.results.tasks["cb"].comparisons["per_task"].calibrated
    sst2_bytes = (out / "samples_per_task_sst2.jsonl").read_bytes()
    # cb's profile edited: every other piece is reused, cb re-runs with the new profile
    edited = {**CB_PROFILE, "beta": 0.2}
    fake_engine.seen = []
    second = runner.run_eval(make_cfg(shared_data, arms=_per_task_arms({"sst2": SST2_PROFILE, "cb": edited})),
                             output_dir=out, progress=False)
    assert sorted(second.reused) == sorted(p for p in [(a, t) for a in ("baseline", "act", "per_task")
                                                       for t in TASKS] if p != ("per_task", "cb"))
    assert {arm for arm, _ in fake_engine.seen} == {"per_task.cb"}
    assert {h for _, h in fake_engine.seen} == {_hash(edited)}
    assert (out / "samples_per_task_sst2.jsonl").read_bytes() == sst2_bytes
    assert second.results.arms["per_task"].tasks["cb"].act_hash == _hash(edited)
    # cb's profile removed: nothing runs; cb's piece is dropped and the baseline's records stand for it
    fake_engine.seen = []
    third = runner.run_eval(make_cfg(shared_data, arms=_per_task_arms({"sst2": SST2_PROFILE})), output_dir=out,
                            progress=False)
    assert not fake_engine.seen and len(third.reused) == 5
    assert not (out / "samples_per_task_cb.jsonl").exists()
    c = third.results.tasks["cb"].comparisons["per_task"]
    assert not c.calibrated and c.delta == 0 and third.results.summary["per_task"].uncalibrated_tasks == ["cb"]
