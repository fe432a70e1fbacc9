"""A profile's calibration rule and its settings (act_plugin.config.rule_settings)."""

from __future__ import annotations

import pytest

from act_plugin.config import ACTConfig, ACTConfigError, ACTEngineConfig, engine_config_from_setting
from act_plugin.config.vocabulary import Surface
from act_plugin.eval.config import load_eval_config

FIRST = {"rule": "first_token", "scale": 1.5, "heads": "2-27:*"}


@pytest.mark.parametrize("spec, message", [
    ({"rule": "zero"}, "unknown rule 'zero'"),
    ({"rule": 3}, "unknown rule 3"),
    ({**FIRST, "beta": 0.3}, "'beta' is a setting of rule 'act', not of rule 'first_token' .*takes: scale"),
    ({**FIRST, "threshold": 0.3}, "'threshold' is a setting of rule 'act'"),
    ({**FIRST, "alpha": 0.3}, "'alpha' is a setting of rule 'spans', not of rule 'first_token'"),
    ({"rule": "spans", "scale": 2, "heads": "1:*"}, "'scale' is a setting of rule 'first_token', not of rule 'spans'"),
    ({"scale": 2, "heads": "1:*"}, "'scale' is a setting of rule 'first_token', not of rule 'act'"),
    ({"alpha": 0.1, "heads": "1:*"}, "'alpha' is a setting of rule 'spans', not of rule 'act'"),
    ({"rule": "first_token", "heads": "1:*"}, "rule 'first_token' needs 'scale'"),
    ({**FIRST, "scale": 0}, "scale must be a finite number > 0"),
    ({**FIRST, "scale": -1.0}, "scale must be a finite number > 0"),
    ({**FIRST, "scale": float("inf")}, "scale must be a finite number > 0"),
    ({**FIRST, "scale": "2"}, "scale must be a number > 0"),
    ({**FIRST, "scale": True}, "scale must be a number > 0"),
    ({"rule": "first_token", "scale": {"2-4:*": 1.5, "3:0": 2.0}}, "key '3:0' names heads of layer 3 another key"),
    ({"rule": "first_token", "scale": {"2:0,1": 1.5, "2:1-3": 2.0}}, "key '2:1-3' names heads of layer 2"),
    ({"rule": "first_token", "scale": {"2": 1.5}}, "key '2' must be a head spec 'LAYERS:HEADS'"),
    ({"rule": "first_token", "scale": {"2:0": 0}}, r"scale\['2:0'\] must be a finite number > 0"),
    ({"rule": "first_token", "scale": {}}, "per-head mapping is empty"),
    ({"rule": "first_token", "scale": {"2:0": 2}, "heads": "2:0,1"}, "leave 'heads' out or name exactly"),
    ({"rule": "spans", "alpha": 0, "heads": "1:*"}, r"alpha must be in \(0, 1\]"),
    ({"rule": "spans", "alpha": 1.5, "heads": "1:*"}, r"alpha must be in \(0, 1\]"),
    ({"rule": "spans", "alpha": "x", "heads": "1:*"}, r"alpha must be a number in \(0, 1\]"),
])
def test_bad_rule_settings_are_refused_with_the_key_named(spec, message):
    with pytest.raises(ACTConfigError, match=message):
        ACTConfig.from_any(spec)


def test_act_profiles_are_unchanged():
    """An act profile dumps without 'rule' and hashes as before rules existed (pinned values
    also in tests/test_config.py); 'rule: act' written out is the same profile."""
    c = ACTConfig.from_any({"beta": 0.4, "threshold": 0.1, "heads": "2-27:0,4;30:all"})
    assert c.hash == "9da068f2417ca65a" and "rule" not in c.to_dict()
    assert ACTConfig.from_any({**c.to_dict(), "rule": "act"}) == c
    assert ACTConfig.from_any({**c.to_dict(), "rule": " act "}).hash == c.hash


def test_rule_hashes_include_the_rule_and_its_settings():
    a = ACTConfig.from_any(FIRST)
    assert a.hash != ACTConfig.from_any({"heads": "2-27:*"}).hash
    assert a.hash != ACTConfig.from_any({**FIRST, "scale": 1.6}).hash
    assert a.hash != ACTConfig.from_any({"rule": "spans", "heads": "2-27:*"}).hash
    s = ACTConfig.from_any({"rule": "spans", "heads": "2-27:*"})
    assert s.alpha == 0.01 and s.hash != ACTConfig.from_any({"rule": "spans", "alpha": 0.02, "heads": "2-27:*"}).hash
    assert a.with_(name="x").hash == a.hash  # labels never count


def test_per_head_scale_names_the_heads_and_is_canonical():
    c = ACTConfig.from_any({"rule": "first_token", "scale": {"2-3:*": 1.5, "5:3,0": 2}})
    assert c.heads == {2: "all", 3: "all", 5: [0, 3]}
    assert c.scale == {"2:all": 1.5, "3:all": 1.5, "5:0,3": 2.0}
    same = ACTConfig.from_any({"rule": "first_token", "scale": {"5:0": 2, "5:3": 2.0, "2:all": 1.5, "3:*": 1.5},
                               "heads": {2: "all", 3: "*", 5: [0, 3]}})
    assert same.hash == c.hash
    assert c.head_scales(5, [0, 3]) == [2.0, 2.0] and c.head_scales(2, [0, 8]) == [1.5, 1.5]
    for text in (c.to_json(), c.to_yaml()):
        assert ACTConfig.from_any(text) == c


def test_settings_of_one_are_identities():
    assert ACTConfig.from_any({**FIRST, "scale": 1}).identity_reason() == "scale is 1 (no change)"
    assert ACTConfig.from_any({"rule": "spans", "alpha": 1, "heads": "1:*"}).is_identity
    assert not ACTConfig.from_any({"rule": "first_token", "scale": {"1:0": 1, "1:1": 2}}).is_identity
    with pytest.raises(ACTConfigError, match="scale is 1"):
        engine_config_from_setting({**FIRST, "scale": 1.0}, Surface.CONTROL)


def test_rule_profiles_pass_the_engine_control_and_eval_paths():
    eng = engine_config_from_setting({"profiles": {"zt": FIRST, "a": {"heads": "1:0"}}, "default": "zt"},
                                     Surface.CONTROL)
    assert eng.profiles["zt"].rule == "first_token" and eng.profiles["a"].rule == "act"
    assert ACTEngineConfig.from_any(eng.to_dict()) == eng  # what runtime control sends to the workers
    ev = load_eval_config({"model": "smollm2-135m", "tasks": ["sst2"], "arms": {"baseline": None, "zt": FIRST}})
    assert ev.arms["zt"].rule == "first_token"
    # a spans arm parses as a rule profile: accepted on a span-marked task, refused on a task
    # whose documents mark no spans (the eval sends each document's spans with its requests)
    pasta = {"rule": "spans", "heads": "1:*"}
    ev = load_eval_config({"model": "smollm2-135m", "tasks": ["boolq_spans"],
                           "arms": {"baseline": None, "pasta": pasta}})
    assert ev.arms["pasta"].rule == "spans"
    with pytest.raises(ACTConfigError, match="arm 'pasta' uses the 'spans' rule.*task 'sst2'.*marks none"):
        load_eval_config({"model": "smollm2-135m", "tasks": ["sst2"], "arms": {"baseline": None, "pasta": pasta}})
    with pytest.raises(ACTConfigError, match="'beta' is a setting of rule 'act'"):
        load_eval_config({"model": "smollm2-135m", "tasks": ["sst2"],
                          "arms": {"baseline": None, "zt": {**FIRST, "beta": 0.2}}})
