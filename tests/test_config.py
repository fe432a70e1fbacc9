"""ACTConfig / ACTEngineConfig: parsing, round trips, hashing, and every rejection path."""

from __future__ import annotations

import json
from pathlib import Path

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
        ({"3": [1023]}, {3: [1023]}),
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


# Issue 11 finding 6: specs that parse to "no heads" for a layer used to pass silently.
@pytest.mark.parametrize(
    "heads, layer",
    [("2-28:", "2-28"), ("2-3:0;7: ", "7"), ({5: []}, "5"), ({"4-6": ""}, "4-6"), ({"9": " , "}, "9")],
)
def test_a_layer_with_no_heads_is_an_error_naming_the_layer(heads, layer):
    with pytest.raises(ACTConfigError, match=f"heads of layer '{layer}' is empty"):
        ACTConfig.from_any({"heads": heads})


HUGE = ["0-1000000000:*", "2:0-1000000000", {"1000000000000": [0]}, {"3": [10**12]}, "1024:0"]


def test_huge_indices_are_refused_before_expansion():
    import subprocess
    import sys

    # In a child limited to 1 GiB of address space: expanding a billion-element range would
    # die with MemoryError there instead of exhausting the machine.
    code = (
        "import json, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from act_plugin.config import ACTConfig, ACTConfigError\n"
        "for heads in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        ACTConfig.from_any({'heads': heads})\n"
        "    except ACTConfigError as e:\n"
        "        print(e)\n"
        "    else:\n"
        "        print('accepted', heads)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, json.dumps(HUGE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) == len(HUGE)
    assert all("out of range (indices are 0..1023" in line for line in lines), lines


@pytest.mark.parametrize("text", ["x" * 5000, "y" * 5000 + ".yaml", "a/" * 3000 + "c.json", "nul\0.yaml"])
def test_a_long_or_odd_string_is_a_config_error_not_an_os_error(text):
    for load in (ACTConfig.from_any, ACTEngineConfig.from_any):
        with pytest.raises(ACTConfigError) as info:
            load(text)
        assert len(str(info.value)) < 600  # the message does not echo kilobytes of input


def test_save_is_atomic(tmp_path, monkeypatch):
    import os

    target = tmp_path / "c.yaml"
    old = ACTConfig.from_any({"heads": "2-27:0,4"})
    old.save(target)
    new = ACTConfig.from_any({"heads": {"3": [1]}})
    written = []
    real_replace = os.replace

    def crash(src, dst):  # the process dies between writing the temp file and the rename
        written.append(Path(src).read_text())
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save(target)
    monkeypatch.setattr(os, "replace", real_replace)
    assert written == [new.to_yaml()]  # the new content went to a temporary file...
    assert ACTConfig.from_file(target) == old  # ...and the target still holds the old config, whole
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]  # no temp file left behind


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
    # the implicit profile has a name requests can select (not the keyword "default")
    assert single.default == "act" and list(single.profiles) == ["act"]
    assert single.resolve_request("act") == single.resolve_request("default") == "act"
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


# Issue 11 finding 2: a profile named like a request keyword could never be selected.
@pytest.mark.parametrize("name", ["on", "off", "none", "baseline", "default", "true", "false", "ON", "Default", "None"])
def test_profile_names_that_are_request_keywords_are_refused(name):
    with pytest.raises(ACTConfigError, match=f"profile name '{name}' is reserved"):
        ACTEngineConfig.from_any({"profiles": {name: {"heads": "2-27:*"}}, "default": None})
    with pytest.raises(ValueError, match="is reserved"):  # the constructor checks too
        ACTEngineConfig(profiles={name: ACTConfig.from_any({"heads": "2-27:*"})})


@pytest.mark.parametrize(
    "name, message", [(" on", "surrounding spaces"), ("a ", "surrounding spaces"), ("", "non-empty")]
)
def test_profile_names_requests_cannot_select_are_refused(name, message):
    with pytest.raises(ACTConfigError, match=message):
        ACTEngineConfig.from_any({"profiles": {name: {}}})


def test_yaml_boolean_profile_key_is_refused():
    # YAML 1.1 reads the key `on:` as True
    with pytest.raises(ACTConfigError, match="YAML reads on/off/yes/no/true/false as booleans"):
        ACTEngineConfig.from_any("profiles:\n  on: {heads: '2:0'}\n")


def test_engine_config_validate_names_profile():
    cfg = ACTEngineConfig.from_any({"profiles": {"mine": {"heads": {"40": [0]}}}})
    with pytest.raises(ACTConfigError, match="profile 'mine': .*layer 40"):
        cfg.validate_for(SMOL)


def test_import_does_not_pull_vllm():
    import subprocess
    import sys

    code = "import sys, act_plugin, act_plugin.core, act_plugin.config; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hash_values_are_pinned():
    """Shipped results name their calibration by this hash: the value itself must not move."""
    assert ACTConfig.from_any({"beta": 0.4, "threshold": 0.1, "heads": "2-27:0,4;30:all"}).hash == "9da068f2417ca65a"
    assert ACTConfig.from_any({}).hash == "6fc3fb51135937bd"


def test_package_keeps_its_import_paths():
    """act_plugin.config is a package split by job; every name other modules import stays here."""
    import act_plugin.config as config
    from act_plugin.config import act_config, files, heads, profiles, shape, vocabulary

    assert config.ACTConfig is act_config.ACTConfig and config.ACTEngineConfig is profiles.ACTEngineConfig
    assert config.parse_index_spec is heads.parse_index_spec and config.ModelShape is shape.ModelShape
    assert config.read_config_mapping is files.read_config_mapping
    assert config.RESERVED_PROFILE_NAMES is vocabulary.RESERVED_PROFILE_NAMES
    for name in config.__all__:
        assert hasattr(config, name), name
