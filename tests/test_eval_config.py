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
