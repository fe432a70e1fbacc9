"""Eval config validation and its error messages (act_plugin.eval.config, eval CLI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from act_plugin.config import ACTConfigError
from act_plugin.eval.config import load_eval_config

BASE = {
    "model": "smollm2-135m",
    "arms": {"baseline": None, "act": {"beta": 0.4, "heads": "2-5:0"}},
    "tasks": ["sst2", "arc_easy"],
}


def cfg(**changes):
    return load_eval_config({**BASE, **changes})


def test_valid_config_defaults():
    c = cfg()
    assert list(c.arms) == ["baseline", "act"]
    assert c.arms["baseline"] is None and c.arms["act"].beta == 0.4
    assert c.share_engine and c.next_token and c.num_fewshot == 0
    assert c.run_seeds == [0]  # zero-shot runs once
    assert cfg(num_fewshot=2).run_seeds == [0, 1, 2, 3, 4]
    assert cfg(tasks=["classification"]).tasks[:2] == ["sst2", "sst5"]
    assert cfg(tasks=["lm_eval:hellaswag", "sst2"]).tasks == ["lm_eval:hellaswag", "sst2"]


def test_unknown_key():
    with pytest.raises(ACTConfigError, match=r"unknown key 'arm'.*allowed: .*arms"):
        cfg(arm={})


def test_missing_required_key():
    data = dict(BASE)
    del data["model"]
    with pytest.raises(ACTConfigError, match="missing required key 'model'"):
        load_eval_config(data)


def test_missing_baseline_arm():
    with pytest.raises(ACTConfigError, match="arms must include 'baseline'"):
        cfg(arms={"act": {"beta": 0.4, "heads": "2:0"}, "act2": {"beta": 0.5, "heads": "2:1"}})


def test_baseline_must_be_uncalibrated():
    with pytest.raises(ACTConfigError, match="baseline.*no ACT config"):
        cfg(arms={"baseline": {"beta": 0.4, "heads": "2:0"}, "act": {"heads": "2:0"}})


def test_needs_a_calibrated_arm():
    with pytest.raises(ACTConfigError, match="at least one calibrated arm"):
        cfg(arms={"baseline": None})


@pytest.mark.parametrize(
    "arm,pattern",
    [
        ({"beta": 2.0, "heads": "2:0"}, r"arm 'act': .*beta must be in \[0, 1\]"),
        ({"beta": 0.4, "hedas": "2:0"}, r"arm 'act': .*unknown key 'hedas'"),
        ({"heads": "2-x:0"}, r"arm 'act': .*heads"),
        (None, r"arm 'act' has no ACT config"),
        ("missing/act.yaml", r"arm 'act': ACT config file not found: missing/act.yaml"),
    ],
)
def test_bad_arm_config(arm, pattern):
    with pytest.raises(ACTConfigError, match=pattern):
        cfg(arms={"baseline": None, "act": arm})


def test_reserved_and_bad_arm_names():
    with pytest.raises(ACTConfigError, match="reserved"):
        cfg(arms={"baseline": None, "off": {"heads": "2:0"}})
    with pytest.raises(ACTConfigError, match="arm name"):
        cfg(arms={"baseline": None, "a/b": {"heads": "2:0"}})


def test_other_field_errors():
    with pytest.raises(ACTConfigError, match="unknown task 'sst3'"):
        cfg(tasks=["sst3"])
    with pytest.raises(ACTConfigError, match="limit must be"):
        cfg(limit=-1)
    with pytest.raises(ACTConfigError, match="seeds must be distinct"):
        cfg(seeds=[1, 1])
    with pytest.raises(ACTConfigError, match="engine.additional_config is set by the eval runner"):
        cfg(engine={"additional_config": {}})


def test_arm_path_relative_to_config(tmp_path: Path):
    (tmp_path / "arms").mkdir()
    (tmp_path / "arms" / "a.yaml").write_text("beta: 0.3\nheads: '4:1'\nname: from-file\n")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**BASE, "arms": {"baseline": None, "a": "arms/a.yaml"}}))
    c = load_eval_config(path, limit=5)
    assert c.name == "exp" and c.limit == 5
    assert c.arms["a"].beta == 0.3 and c.arms["a"].name == "from-file"


def test_file_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ACTConfigError, match="eval config file not found"):
        load_eval_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({**BASE, "limt": 3}))
    with pytest.raises(ACTConfigError, match=rf"{p}: invalid eval config: unknown key 'limt'"):
        load_eval_config(p)


def test_cli_reports_config_errors(tmp_path: Path, capsys):
    from act_plugin.cli import main

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({**BASE, "arms": {"act": {"heads": "2:0"}}}))
    assert main(["eval", str(p), "--check"]) == 2
    err = capsys.readouterr().err
    assert "act-plugin eval: error:" in err and "arms must include 'baseline'" in err


# ----------------------------------------------------------------------------- arms that calibrate nothing
# Issue 11 finding 6 (eval side): an arm with no heads or beta 1 ran as if it were calibrated.
@pytest.mark.parametrize("arm, why", [({"beta": 1.0, "heads": "2-27:0,4"}, "beta is 1"),
                                      ({"beta": 0.4}, "it names no heads")])
def test_an_arm_that_calibrates_nothing_is_refused_unless_a_control(arm, why):
    with pytest.raises(ACTConfigError, match=rf"arm 'act' calibrates nothing \({why}.*'control: true' on the arm"):
        cfg(arms={"baseline": None, "act": arm})
    c = cfg(arms={"baseline": None, "act": {**arm, "control": True}})
    assert c.controls == ["act"] and not c.calibrates("act") and c.arms["act"].beta == arm["beta"]


def test_control_arm_from_a_file_and_round_trip(tmp_path: Path):
    (tmp_path / "id.yaml").write_text("beta: 1.0\nheads: '4:1'\n")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**BASE, "arms": {"baseline": None, "act": {"heads": "2:0"},
                                                     "same": {"control": True, "config": "id.yaml"}}}))
    c = load_eval_config(path)
    assert c.controls == ["same"] and c.arms["same"].beta == 1.0 and c.calibrates("act")
    again = load_eval_config(c.to_dict())  # what config.yaml holds loads back the same
    assert again.controls == c.controls and again.arms == c.arms
    with pytest.raises(ACTConfigError, match="either 'config: PATH' or the ACT config's keys"):
        cfg(arms={"baseline": None, "act": {"config": "id.yaml", "beta": 0.3}})
    with pytest.raises(ACTConfigError, match="not among the arms"):
        cfg(controls=["nope"])


@pytest.mark.parametrize("value, expected", [("all", "all"), ("ALL", "all"), (None, "all"), (50, 50), ("50", 50),
                                             ("0.25", 0.25), (0.5, 0.5)])
def test_limit_all(value, expected):
    c = cfg(limit=value) if value is not None else load_eval_config({**BASE, "limit": None})
    assert c.limit == expected
    assert c.lm_eval_limit == (None if expected == "all" else expected)
    assert cfg().limit == "all"  # the default


def test_cli_limit_all(tmp_path: Path, capsys, shared_data):
    from act_plugin.cli import main

    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump({**BASE, "limit": 10}))
    assert main(["eval", str(p), "--check", "--data-dir", str(shared_data)]) == 0
    assert "limit 10" in capsys.readouterr().out
    assert main(["eval", str(p), "--check", "--limit", "all", "--data-dir", str(shared_data)]) == 0
    assert "limit all" in capsys.readouterr().out
    assert main(["eval", str(p), "--check", "--limit", "lots"]) == 2
    assert "limit must be 'all'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- per-task arms
# A profiles file as `act-plugin search` (per_task: true) writes it: header comments, one
# profile per task a set helps, no default.
PROFILES_FILE = """# Per-task ACT profiles found by `act-plugin search` (test) for smollm2-135m
# No profile (no set helped on validation; run uncalibrated): cb
profiles:
  sst2: {beta: 0.4, threshold: 0.1, heads: {'1': [0]}, name: sst2}
  mr: {beta: 0.4, threshold: 0.1, heads: {'19': [3]}, name: mr}
  dbpedia: {beta: 0.3, threshold: 0.1, heads: {'5': [1, 2]}, name: dbpedia}
default: null
"""
PER_TASK_TASKS = ["sst2", "mr", "cb"]


def _per_task(tmp_path: Path, arm, tasks=PER_TASK_TASKS, text=PROFILES_FILE, **changes):
    (tmp_path / "arms").mkdir(exist_ok=True)
    (tmp_path / "arms" / "profiles.yaml").write_text(text)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**BASE, "tasks": tasks, "arms": {"baseline": None, "per_task": arm}, **changes}))
    return load_eval_config(path)


def test_per_task_arm_from_a_file_relative_to_the_config(tmp_path: Path):
    from act_plugin.eval.config import PerTaskArm

    c = _per_task(tmp_path, {"profiles": "arms/profiles.yaml"})
    arm = c.arms["per_task"]
    assert isinstance(arm, PerTaskArm) and c.is_per_task("per_task") and not c.is_per_task("baseline")
    assert arm.source == str(tmp_path / "arms" / "profiles.yaml")
    assert c.act_for("per_task", "sst2").heads == {1: [0]} and c.act_for("per_task", "mr").heads == {19: [3]}
    assert c.act_for("per_task", "cb") is None and c.act_for("baseline", "sst2") is None
    assert [c.runs("per_task", t) for t in PER_TASK_TASKS] == [True, True, False]
    assert c.uncalibrated_tasks("per_task") == ["cb"] and c.profiles_outside("per_task") == ["dbpedia"]
    assert c.calibrates("per_task") and c.controls == []
    # the task without a profile is not a piece of the run; the baseline runs every task
    assert c.pieces == [("baseline", t) for t in PER_TASK_TASKS] + [("per_task", "sst2"), ("per_task", "mr")]
    assert c.profile_name("per_task", "sst2") == "per_task.sst2" and c.profile_name("per_task", "cb") is None
    assert list(c.engine_profiles()) == ["per_task.sst2", "per_task.mr"]  # dbpedia (not in the eval) is left out
    notes = "\n".join(c.arm_notes())
    assert "arm 'per_task': per-task profiles for sst2, mr" in notes
    assert "arm 'per_task': UNCALIBRATED (no profile) on cb" in notes
    assert "ignored profiles (tasks not in this eval): dbpedia" in notes
    again = load_eval_config(c.to_dict())  # what config.yaml holds loads back the same
    assert again.arms == c.arms and again.pieces == c.pieces


def test_per_task_arm_relative_to_the_current_directory_and_inline(tmp_path: Path, monkeypatch):
    (tmp_path / "profiles.yaml").write_text(PROFILES_FILE)
    monkeypatch.chdir(tmp_path)
    c = cfg(tasks=PER_TASK_TASKS, arms={"baseline": None, "p": {"profiles": "profiles.yaml"}})
    assert c.arms["p"].source == str(tmp_path / "profiles.yaml") and c.uncalibrated_tasks("p") == ["cb"]
    # inline; profile names are matched to the project's task names (act_sst2 is sst2's lm-eval name)
    c = cfg(tasks=["sst2", "lm_eval:hellaswag", "mr"],
            arms={"baseline": None, "p": {"profiles": {"act_sst2": {"beta": 0.4, "heads": "1:0"},
                                                       "lm_eval:hellaswag": {"beta": 0.5, "heads": "3:1"}}}})
    assert c.act_for("p", "sst2").heads == {1: [0]} and c.act_for("p", "lm_eval:hellaswag").beta == 0.5
    assert c.uncalibrated_tasks("p") == ["mr"] and c.profile_name("p", "lm_eval:hellaswag") == "p.lm_eval:hellaswag"
    # a single arm beside it keeps its one config on every task
    c = cfg(tasks=PER_TASK_TASKS, arms={"baseline": None, "act": {"heads": "2:0"}, "p": {"profiles": "profiles.yaml"}})
    assert c.runs("act", "cb") and c.profile_name("act", "cb") == "act" and c.act_for("act", "cb").heads == {2: [0]}
    assert list(c.engine_profiles()) == ["act", "p.sst2", "p.mr"]
    assert list(c.engine_profiles(["p"])) == ["p.sst2", "p.mr"]


@pytest.mark.parametrize("arm, text, pattern", [
    ({"profiles": "arms/nope.yaml"}, PROFILES_FILE, r"arm 'per_task': profiles file not found: arms/nope.yaml"),
    ({"profiles": "arms/profiles.yaml"}, "profiles:\n  sst2: {beta: 2.0, heads: '1:0'}\n",
     r"arm 'per_task': .*profiles.yaml: profile 'sst2': .*beta must be in \[0, 1\]"),
    ({"profiles": "arms/profiles.yaml"}, "profiles: [\n", r"arm 'per_task': .*profiles.yaml: not valid YAML"),
    ({"profiles": "arms/profiles.yaml"}, "beta: 0.4\nheads: '1:0'\n",
     r"arm 'per_task': .*profiles.yaml holds no 'profiles'.*give the path as the arm itself"),
    ({"profiles": "arms/profiles.yaml"}, "profiles:\n  sst2: {heads: '1:0'}\ndefault: sst2\n",
     r"arm 'per_task': .*default profile 'sst2': a per-task arm runs a task without a profile uncalibrated"),
    ({"profiles": {"sst2": {"heads": "1:0"}, "act_sst2": {"heads": "2:0"}}}, PROFILES_FILE,
     r"arm 'per_task': two profiles name task 'sst2'"),
    ({"profiles": {"sst2": {"heads": "1:0"}}, "beta": 0.4}, PROFILES_FILE,
     r"arm 'per_task': a per-task arm takes 'profiles'.*got \['beta'\]"),
    ({"profiles": "arms/profiles.yaml", "config": "x.yaml"}, PROFILES_FILE,
     r"arm 'per_task': give either 'config: PATH' .* or 'profiles'"),
    ("arms/profiles.yaml", PROFILES_FILE,
     r"arm 'per_task': .*profiles.yaml holds per-task profiles, not one ACT config: give the arm as "
     r"'\{profiles: arms/profiles.yaml\}'"),
    ({"profiles": 3}, PROFILES_FILE, r"arm 'per_task': profiles must be a path or a mapping"),
])
def test_bad_per_task_arms(tmp_path: Path, arm, text, pattern):
    with pytest.raises(ACTConfigError, match=pattern):
        _per_task(tmp_path, arm, text=text)


def test_a_per_task_arm_that_calibrates_nothing_is_refused_unless_a_control(tmp_path: Path):
    # no task of the eval has a profile
    with pytest.raises(ACTConfigError, match=r"arm 'per_task': no task of this eval \(cb, agnews\) has a profile "
                                             r"\(profiles: sst2, mr, dbpedia\).*'control: true' on the arm"):
        _per_task(tmp_path, {"profiles": "arms/profiles.yaml"}, tasks=["cb", "agnews"])
    c = _per_task(tmp_path, {"profiles": "arms/profiles.yaml", "control": True}, tasks=["cb", "agnews"])
    assert c.controls == ["per_task"] and not c.calibrates("per_task") and c.pieces == [
        ("baseline", "cb"), ("baseline", "agnews")]
    # a profile that is an identity (beta 1, or no heads)
    for bad, why in (("{beta: 1.0, heads: '1:0'}", "beta is 1"), ("{beta: 0.4}", "it names no heads")):
        text = f"profiles:\n  sst2: {{heads: '1:0'}}\n  mr: {bad}\n"
        with pytest.raises(ACTConfigError, match=rf"arm 'per_task': the profile for task 'mr' calibrates nothing "
                                                 rf"\({why}.*'control: true' on the arm"):
            _per_task(tmp_path, {"profiles": "arms/profiles.yaml"}, text=text)
        c = _per_task(tmp_path, {"profiles": "arms/profiles.yaml", "control": True}, text=text)
        assert c.calibrates("per_task") and c.runs("per_task", "mr")  # sst2's profile still calibrates
    # an identity profile for a task outside the eval is ignored, like the profile itself
    c = _per_task(tmp_path, {"profiles": "arms/profiles.yaml"}, text="profiles:\n  sst2: {heads: '1:0'}\n"
                                                                     "  trec: {beta: 1.0, heads: '1:0'}\n")
    assert c.profiles_outside("per_task") == ["trec"]


def test_engine_profile_names_must_not_collide():
    with pytest.raises(ACTConfigError, match=r"arm 'p' \(task 'sst2'\) and arm 'p.sst2' would both be the engine "
                                             r"profile 'p.sst2'; rename one of the arms"):
        cfg(arms={"baseline": None, "p.sst2": {"heads": "2:0"}, "p": {"profiles": {"sst2": {"heads": "1:0"}}}})


def test_cli_check_prints_what_a_per_task_arm_calibrates(tmp_path: Path, capsys, shared_data):
    from act_plugin.cli import main

    _per_task(tmp_path, {"profiles": "arms/profiles.yaml"})
    assert main(["eval", str(tmp_path / "exp.yaml"), "--check", "--data-dir", str(shared_data)]) == 0
    out = capsys.readouterr().out
    assert "arm 'per_task': UNCALIBRATED (no profile) on cb" in out and "dbpedia" in out and ": OK" in out


SPANS = {"rule": "spans", "alpha": 0.01, "heads": {"2": [0]}}


def test_a_spans_arm_on_a_task_without_spans_is_refused_before_any_engine_starts():
    """A spans arm needs span-marked documents: refused by arm, task and setting on any task
    whose documents mark none (plain arm, and a per-task arm's spans profile); first_token arms
    and spans arms on span-marked tasks are accepted."""
    with pytest.raises(ACTConfigError, match=r"arm 'emph' uses the 'spans' rule.*task 'sst2' \(setting 'tasks'\) "
                                             r"marks none: a spans profile needs span-marked tasks such as "
                                             r"boolq_spans"):
        cfg(tasks=["boolq_spans", "sst2"], arms={"baseline": None, "emph": SPANS})
    with pytest.raises(ACTConfigError, match=r"arm 'emph' .*task 'lm_eval:boolq'"):
        cfg(tasks=["boolq_spans", "lm_eval:boolq"], arms={"baseline": None, "emph": SPANS})
    with pytest.raises(ACTConfigError, match=r"arm 'pt' \(its profile for task 'sst2'\) uses the 'spans' rule"):
        cfg(tasks=["sst2"], arms={"baseline": None, "pt": {"profiles": {"sst2": SPANS}}})
    ok = cfg(arms={"baseline": None, "zt": {"rule": "first_token", "scale": 1.5, "heads": {"2": [0]}}})
    assert "zt" in ok.calibrated_arms
    plain = cfg(tasks=["boolq_spans"], arms={"baseline": None, "emph": SPANS})
    assert plain.act_for("emph", "boolq_spans").rule == "spans"


def test_a_per_task_spans_profile_is_checked_on_its_own_task_only():
    """A per-task arm may run spans on boolq_spans and act on sst2; a spans profile for a task
    outside the eval is ignored like any other."""
    arm = {"profiles": {"boolq_spans": SPANS, "sst2": {"beta": 0.4, "heads": "1:0"}, "mr": SPANS}}
    pt = cfg(tasks=["boolq_spans", "sst2"], arms={"baseline": None, "pt": arm})
    assert pt.act_for("pt", "boolq_spans").rule == "spans" and pt.act_for("pt", "sst2").rule == "act"
    assert pt.profiles_outside("pt") == ["mr"]


# ------------------------------------------------------------------------ comparisons of two calibrated arms
THREE_ARMS = {"baseline": None, "act": {"beta": 0.4, "heads": "2-5:0"},
              "rules": {"profiles": {"sst2": {"rule": "first_token", "scale": 2.0, "heads": "2:0"}}}}


def test_comparisons_name_pairs_of_calibrated_arms():
    assert cfg().comparisons == []
    c = cfg(arms=THREE_ARMS, comparisons=[["rules", "act"]])
    assert c.comparisons == [("rules", "act")]
    again = load_eval_config(c.to_dict())  # config.yaml of the run reads back the same
    assert again.comparisons == c.comparisons and again.to_dict()["comparisons"] == [["rules", "act"]]
    assert cfg(arms=THREE_ARMS, comparisons=None).comparisons == []


@pytest.mark.parametrize("pairs, message", [
    ([["rules", "actt"]], r"comparisons: \[rules, actt\]: arm 'actt' is not among the arms \['baseline', 'act', "
                          r"'rules'\]"),
    ([["baseline", "act"]], r"comparisons: \[baseline, act\]: every arm is compared with 'baseline' already"),
    ([["rules", "baseline"]], r"comparisons: \[rules, baseline\]: every arm is compared with 'baseline' already"),
    ([["act", "act"]], r"comparisons: \[act, act\]: compares arm 'act' with itself"),
    ([["rules", "act"], ["rules", "act"]], r"comparisons: \[rules, act\] is listed twice"),
    ([["rules", "act"], ["act", "rules"]], r"comparisons: \[act, rules\] is listed after \[rules, act\] \(the same "
                                           r"pair mirrored"),
    ("rules", r"comparisons: must be a list of \[treatment, reference\] pairs of arm names.*got 'rules'"),
    ([["rules"]], r"comparisons: each entry must be a \[treatment, reference\] pair of two arm names.*got \['rules'\]"),
    ([["rules", "act", "baseline"]], r"comparisons: each entry must be a \[treatment, reference\] pair"),
    ([["rules", 3]], r"comparisons: each entry must be a \[treatment, reference\] pair.*got \['rules', 3\]"),
])
def test_bad_comparisons_are_refused_naming_the_key_and_the_arm(pairs, message):
    with pytest.raises(ACTConfigError, match=message):
        cfg(arms=THREE_ARMS, comparisons=pairs)
