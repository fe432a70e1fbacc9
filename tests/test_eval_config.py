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
