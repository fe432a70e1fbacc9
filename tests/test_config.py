"""ACTConfig / ACTEngineConfig: parsing, round trips, hashing, and every rejection path."""

from __future__ import annotations

import json

import pytest

from act_plugin import ACTConfig, ACTConfigError, ACTEngineConfig

SMOL = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "_name_or_path": "smollm2"}


def test_defaults_follow_the_paper():
    c = ACTConfig()
    assert (c.beta, c.threshold, c.heads) == (0.4, 0.1, {})
    assert c.is_identity


@pytest.mark.parametrize(
    "heads, expected",
    [
        ({"2": [0, 3]}, {2: [0, 3]}),
        ({2: "0,3"}, {2: [0, 3]}),
        ({"2-4": [1]}, {2: [1], 3: [1], 4: [1]}),
        ({"5": "all"}, {5: "all"}),
        ({"5": "*", "6": ["1-2", 7]}, {5: "all", 6: [1, 2, 7]}),
        ("2-3:*", {2: "all", 3: "all"}),
        ("2-3:0,4;7:1-2", {2: [0, 4], 3: [0, 4], 7: [1, 2]}),
        ({"3": []}, {}),
    ],
)
def test_head_specs(heads, expected):
    assert ACTConfig.from_any({"heads": heads}).heads == expected


def test_round_trip_yaml_json_and_hash(tmp_path):
    c = ACTConfig.from_any({"beta": 0.3, "threshold": 0.05, "heads": "2-4:0,4;9:all", "name": "x", "source": "me"})
    for suffix in (".yaml", ".json"):
        p = c.save(tmp_path / f"c{suffix}")
        back = ACTConfig.from_file(p)
        assert back == c and back.hash == c.hash
    assert ACTConfig.from_any(c.to_json()) == c
    # the hash ignores labels but not the maths
    assert c.with_(name="other").hash == c.hash
    assert c.with_(beta=0.31).hash != c.hash
    assert ACTConfig.from_any({"heads": {"3": [1, 0]}}).hash == ACTConfig.from_any({"heads": {3: [0, 1]}}).hash


def test_file_with_act_wrapper(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("act:\n  beta: 0.5\n  heads: {3: [1]}\n")
    assert ACTConfig.from_file(p).beta == 0.5


def test_validate_for_resolves_all():
    c = ACTConfig.from_any({"heads": {"3": "all", "4": [8]}})
    assert c.validate_for(SMOL) == {3: tuple(range(9)), 4: (8,)}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"beta": 2.0}, r"beta must be in \[0, 1\]"),
        ({"beta": -0.1}, r"beta must be in \[0, 1\]"),
        ({"beta": "high"}, "beta must be a number"),
        ({"threshold": 0.0}, r"threshold must be in \(0, 1\)"),
        ({"threshold": 1.0}, r"threshold must be in \(0, 1\)"),
        ({"betta": 0.3}, "unknown key 'betta'"),
        ({"heads": {"x": [1]}}, "cannot read 'x'"),
        ({"heads": {"3": [-1]}}, "negative index -1"),
        ({"heads": {"5-2": [1]}}, "runs backwards"),
        ({"heads": {"all": [1]}}, "layer keys must be explicit"),
        ({"heads": "2-4"}, "needs the form 'LAYERS:HEADS'"),
        ({"heads": [1, 2]}, "expected a mapping"),
        ({"heads": {"3": [True]}}, "is not an index"),
    ],
)
def test_rejections(data, message):
    with pytest.raises(ACTConfigError, match=message):
        ACTConfig.from_any(data)


@pytest.mark.parametrize(
    "heads, message",
    [
        ({"30": [0]}, r"names layer 30, but smollm2 has 30 layers \(0..29\) with 9 query heads each \(0..8\), 3 KV heads"),
        ({"3": [2, 9, 11]}, r"names head\(s\) \[9, 11\] of layer 3, but smollm2 has 30 layers"),
    ],
)
def test_validate_for_rejects_what_the_model_lacks(heads, message):
    with pytest.raises(ACTConfigError, match=message):
        ACTConfig.from_any({"heads": heads, "name": "n"}).validate_for(SMOL)


def test_validate_for_accepts_hf_config_objects():
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, hidden_size=256)
    with pytest.raises(ACTConfigError, match="4 layers"):
        ACTConfig.from_any({"heads": {"4": [0]}}).validate_for(cfg)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ACTConfigError, match="not found"):
        ACTConfig.from_file(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("beta: [1, 2\n")
    with pytest.raises(ACTConfigError, match="not valid YAML"):
        ACTConfig.from_file(p)


# ----------------------------------------------------------------------------- engine level
def test_engine_config_forms():
    single = ACTEngineConfig.from_any({"heads": {"3": [1]}})
    assert single.default == "default" and list(single.profiles) == ["default"]
    multi = ACTEngineConfig.from_any({"profiles": {"a": {"heads": {"3": [1]}}, "b": {}}, "default": None})
    assert multi.default is None and set(multi.profiles) == {"a", "b"}
    assert ACTEngineConfig.from_any(json.dumps(multi.to_dict())) == multi


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), ("off", None), (False, None), ("baseline", None), ("a", "a"), ("default", None), (True, None)],
)
def test_request_values(value, expected):
    cfg = ACTEngineConfig.from_any({"profiles": {"a": {}}, "default": None})
    assert cfg.resolve_request(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [("zzz", "unknown ACT profile 'zzz'"), (3, "must be a profile name"), ({"beta": 1}, "must be a profile name")],
)
def test_bad_request_values(value, message):
    cfg = ACTEngineConfig.from_any({"profiles": {"a": {}}, "default": "a"})
    with pytest.raises(ACTConfigError, match=message):
        cfg.resolve_request(value)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"profiles": {"a": {}}, "default": "b"}, "default profile 'b' is not among"),
        ({"profiles": {"a": {"beta": 3}}}, r"profile 'a': .*beta must be in"),
        ({"profiles": {}, "extra": 1}, r"unknown key\(s\) \['extra'\]"),
        ({"profiles": [1]}, "'profiles' must map"),
    ],
)
def test_engine_config_rejections(data, message):
    with pytest.raises(ACTConfigError, match=message):
        ACTEngineConfig.from_any(data)


def test_engine_config_validate_names_profile():
    cfg = ACTEngineConfig.from_any({"profiles": {"mine": {"heads": {"40": [0]}}}})
    with pytest.raises(ACTConfigError, match="profile 'mine': .*layer 40"):
        cfg.validate_for(SMOL)


def test_import_does_not_pull_vllm():
    import subprocess
    import sys

    code = "import sys, act_plugin, act_plugin.core, act_plugin.config; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
