"""Config files: one loader (act_plugin.config.load_config_file) behind ACT, engine, eval and
search configs -- same unwrapping, same messages naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from act_plugin.config import ACTConfig, ACTConfigError, ACTEngineConfig, load_config_file, read_config_mapping


def test_act_and_engine_files_share_the_act_wrapper(tmp_path: Path):
    f = tmp_path / "a.yaml"
    f.write_text("act:\n  beta: 0.4\n  heads: {3: [1, 2]}\n")
    single = ACTConfig.from_file(f)
    engine = ACTEngineConfig.from_any(str(f))
    assert single.heads == {3: [1, 2]} and engine.profiles["act"] == single and engine.default == "act"
    g = tmp_path / "b.json"
    g.write_text('{"act": {"profiles": {"p": {"beta": 0.5, "heads": "1:0"}}, "default": null}}')
    assert ACTEngineConfig.from_any(g).profiles["p"].beta == 0.5


@pytest.mark.parametrize("kind", ["ACT", "engine"])
def test_file_errors_name_the_file(tmp_path: Path, kind):
    load = ACTConfig.from_file if kind == "ACT" else ACTEngineConfig.from_any
    with pytest.raises(ACTConfigError, match=r"ACT config file not found: .*nope\.yaml"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: 0.4\nheads: {1: [0]}\nbogus: 1\n")
    with pytest.raises(ACTConfigError, match=r"bad\.yaml: .*bogus"):
        load(bad)


def test_one_loader_for_every_config_kind(tmp_path: Path):
    from act_plugin.search.config import SearchConfigError

    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(SearchConfigError, match=r"broken\.yaml: not valid YAML/JSON"):
        read_config_mapping(broken, "search config", SearchConfigError)
    with pytest.raises(ACTConfigError, match=r"eval config file not found: .*missing\.yaml"):
        read_config_mapping(tmp_path / "missing.yaml", "eval config")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    assert load_config_file(listed, "x") == ([1, 2], listed)
    with pytest.raises(ACTConfigError, match=r"list\.yaml: the eval config must be a mapping, got list"):
        read_config_mapping(listed, "eval config")
