"""configs/paper: the published head sets, converted reproducibly from paper_head_sets.json."""

from __future__ import annotations

import json

import pytest

from act_plugin.config import ACTConfig, ModelShape
from act_plugin.eval.config import load_eval_config
from act_plugin.eval.paper import SOURCE, convert_paper_head_sets, default_json_path, render_paper_configs
from act_plugin.tasks import REPO_ROOT

PAPER = REPO_ROOT / "configs" / "paper"
SHAPES = {  # both published models: 32 layers x 32 query heads
    "meta-llama/Llama-2-7b-chat-hf": ModelShape(num_layers=32, num_heads=32, num_kv_heads=32),
    "mistralai/Mistral-7B-Instruct-v0.2": ModelShape(num_layers=32, num_heads=32, num_kv_heads=8),
}


@pytest.fixture(scope="module")
def json_path():
    p = default_json_path()
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return p


def test_shipped_files_equal_the_conversion(json_path):
    expected = render_paper_configs(json_path)
    shipped = {p.name: p.read_text() for p in PAPER.glob("*.yaml")}
    assert shipped == expected, "regenerate with: python -m act_plugin.eval.paper"


def test_act_configs_round_trip_the_json(json_path):
    data = json.loads(json_path.read_text())
    converted = convert_paper_head_sets(json_path)
    assert set(converted) == {k for k in data if not k.startswith("_")}
    for key, cfg in converted.items():
        model, family = key.split("/")
        loaded = ACTConfig.from_file(PAPER / f"act_{model}_{family}.yaml")
        assert loaded == cfg
        assert loaded.name == key and loaded.source == SOURCE and loaded.model == data[key]["model"]
        assert (loaded.beta, loaded.threshold) == (data[key]["beta"], data[key]["threshold"])
        assert {str(k): v for k, v in loaded.heads.items()} == {k: sorted(v) for k, v in data[key]["heads"].items()}
        loaded.validate_for(SHAPES[loaded.model])
    # the _about note: 184 heads in layers 2..30 for Llama-2-7B-chat classification
    cls = converted["llama-2-7b-chat/classification"]
    assert cls.num_heads_selected(32) == 184 and min(cls.heads) == 2 and max(cls.heads) == 30


def test_eval_configs_load():
    evals = sorted(PAPER.glob("eval_*.yaml"))
    assert len(evals) == 4
    for p in evals:
        cfg = load_eval_config(p)
        assert cfg.model in SHAPES and "baseline" in cfg.arms
        for name, act in cfg.calibrated_arms.items():
            assert act.model == cfg.model and act.source == SOURCE
