"""Search over rules (``rules: [act, first_token]``): the config keys, first_token on the
search's transformers path (exact scores against the reference HF path, the first-order
estimate against finite differences), selection over first_token candidates, the choice
between the rules, and a whole search on a small random model with real tokenizer and data
(it proposes, validates and writes a loadable engine config; ACT's results are those of the
default search)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from act_plugin import ACTConfig
from act_plugin.search.config import SearchConfigError, load_search_config
from act_plugin.search.select import Decision, Selection, TaskEffect, select_forward

BASE = {"model": "smollm2-135m", "tasks": ["sst2"], "output": "x.yaml"}
RULES = {"rules": ["act", "first_token"], "fast": {"verify": "hf"}}
# the keys a search config recorded in its report before rules existed (a default search still does)
PRE_RULES_KEYS = {"name", "model", "engine", "data_dir", "tasks", "split", "samples_per_task", "validation_per_task",
                  "seed", "beta", "threshold", "candidates", "score", "clip", "alpha", "gain", "validate_singles",
                  "per_task", "profiles_output", "method", "fast", "hf", "combine", "combine_max_heads",
                  "combine_max_evals", "output", "report", "heatmap", "run_dir", "state_dir"}


# ----------------------------------------------------------------------------- config


def test_default_rules_record_the_config_as_before():
    cfg = load_search_config(BASE)
    assert cfg.rules == ["act"]
    assert set(cfg.to_dict()) == PRE_RULES_KEYS | {"data_parallel"}  # data_parallel: recorded, not hashed
    both = load_search_config({**BASE, **RULES, "first_token": {"gammas": [2.0]}})
    assert both.to_dict()["rules"] == ["act", "first_token"] and both.to_dict()["first_token"]["gammas"] == [2.0]


@pytest.mark.parametrize("change, match", [
    ({**RULES, "first_token": {"gama": [2]}}, r"unknown key 'first_token.gama' \(allowed: gammas"),
    ({**RULES, "first_token": {"gammas": [1.0, 2.0]}}, r"first_token.gammas: .*1 changes nothing"),
    ({**RULES, "first_token": {"gammas": [0, 2]}}, r"first_token.gammas: 0 is not a finite number > 0"),
    ({**RULES, "first_token": {"gammas": []}}, r"first_token.gammas must be a non-empty list"),
    ({**RULES, "first_token": {"layers": "x"}}, r"first_token.layers"),
    ({"rules": ["act", "spans"]}, r"rules: 'spans' cannot be searched"),
    ({"rules": ["first_token"], "fast": {"verify": "hf"}}, r"rules must include 'act'"),
    ({"rules": ["act", "zero"]}, r"rules: unknown rule 'zero'"),
    ({"first_token": {"gammas": [2]}}, r"first_token: a grid is given but 'rules' does not name first_token"),
    ({"rules": ["act", "first_token"]}, r"needs method 'fast' with fast.verify 'hf'"),
    ({**RULES, "validation_per_task": 0}, r"validation_per_task must be > 0"),
])
def test_rule_config_errors_name_the_key(change, match):
    with pytest.raises(SearchConfigError, match=match):
        load_search_config({**BASE, **change})


def test_first_token_rule_is_scored_by_data_parallel_replicas_too():
    """A search over rules accepts data_parallel (the replicas score first_token sets too)."""
    assert load_search_config({**BASE, **RULES, "data_parallel": 2}).data_parallel == 2


# ----------------------------------------------------------------------------- HF path


def _tiny_model(seed: int = 0):
    from test_search_families import _model

    return _model("llama", seed)


@pytest.fixture(scope="module")
def tiny():
    from test_search_families import _backend, _calib

    model = _tiny_model()
    ref = copy.deepcopy(model)  # before the backend switches the model to the search's attention
    return _backend(model, _calib(n=12)), ref


def test_first_token_exact_scores_match_the_reference_path(tiny):
    """Batched, restarted from a cached layer input, ACT and first_token heads in one forward:
    equal to one prompt at a time through act_plugin.hf with the same profile."""
    from test_search_families import _reference

    from act_plugin.hf import act_enabled

    be, ref = tiny
    scales = {(1, 0): 2.0, (1, 3): 0.5, (2, 1): 1.5}
    be.plan_cache([1, 2])
    got = be.evaluate([], first_token=scales)
    prof = ACTConfig(rule="first_token", scale={"1:0": 2.0, "1:3": 0.5, "2:1": 1.5})
    want = np.full_like(got, np.nan)
    with torch.no_grad(), act_enabled(ref, prof):
        for i, (p, ids) in enumerate(zip(be.calib.prompts, be.calib.choice_ids)):
            want[i, : len(ids)] = torch.log_softmax(ref(torch.tensor([p])).logits[0, -1], -1)[list(ids)].numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    base = _reference(ref, be.calib)
    assert np.nanmax(np.abs(got - base)) > 1e-3, "first_token changed nothing: the check would be vacuous"
    # ACT heads and first_token heads in the same forward differ from either alone
    mixed = be.evaluate([(2, 3)], first_token=scales)
    assert np.nanmax(np.abs(mixed - got)) > 1e-4 and np.nanmax(np.abs(mixed - be.evaluate([(2, 3)]))) > 1e-4


def test_first_token_estimate_matches_finite_difference(tiny):
    from act_plugin.search.hf_first_token import FirstTokenGroup, first_token_gradients
    from act_plugin.search.scoring import margins_torch

    be, _ = tiny
    gammas = [0.5, 2.0]
    heads = [(0, 1), (1, 2), (2, 0)]
    est = first_token_gradients(be, heads, gammas)

    def objective(layer: int, head: int, gamma: float, alpha: float) -> float:
        group = FirstTokenGroup(torch.tensor([head]), torch.tensor([gamma]), torch.tensor([alpha]))
        total = 0.0
        with torch.no_grad():
            for b in be.batches:
                lp, _ = be._run(b, 0, mode=be._mode("gate", b, first_token={layer: [group]}))
                total += float((margins_torch(lp.double(), b.gold, b.valid) * b.weights).sum())
        return total

    eps = 1e-2
    fd = {(a, h, g): (objective(a, h, g, eps) - objective(a, h, g, -eps)) / (2 * eps) for a, h in heads for g in gammas}
    assert max(abs(v) for v in fd.values()) > 1e-3, "no candidate moves the score: the check would be vacuous"
    for k, v in fd.items():
        assert est[k] == pytest.approx(v, rel=2e-2, abs=2e-4), k


# ----------------------------------------------------------------------------- selection and choice


def test_selection_over_first_token_units_skips_a_second_gamma_for_a_head():
    from act_plugin.search.first_token import _disjoint, unit_scales

    u1, u2, u3 = ((1, 0, 2.0),), ((1, 0, 0.5),), ((2, 1, 1.5),)
    base = {"t": np.array([True] * 10 + [False] * 10)}
    seen = []

    def evaluate(units):
        seen.append(unit_scales(units))
        right = 12 + 2 * len(units)  # every unit turns prompts right: only the overlap stops u2
        return {"t": np.arange(20) < right}

    sel = select_forward([u1, u2, u3], evaluate, base, compatible=_disjoint)
    assert sel.heads == [u1, u3]
    assert [s.get("evaluated", True) for s in sel.steps] == [True, False, True]
    assert {(1, 0): 2.0, (2, 1): 1.5} in seen and all(len(s) <= 2 for s in seen)


def _selection(gain: float | None) -> Selection:
    if gain is None:
        return Selection([], None)
    n = 100
    eff = TaskEffect("t", n, 0.5, 0.5 + gain, int(gain * n), 0, 0.01, False, True)
    return Selection([(1, 2)], Decision(((1, 2),), {"t": eff}, 0.05))


@pytest.mark.parametrize("act, ft, chosen", [
    (0.05, 0.08, "first_token"), (0.08, 0.05, "act"), (0.05, 0.05, "act"), (None, 0.03, "first_token"),
    (0.03, None, "act"), (None, None, "none"),
])
def test_choice_between_the_rules(act, ft, chosen):
    from act_plugin.search.rules_compare import _choose

    assert _choose(_selection(act), _selection(ft)) == chosen


# ----------------------------------------------------------------------------- a whole search


@pytest.fixture(scope="module")
def random_smollm2(tmp_path_factory, smollm2_path):
    """A small random Llama model with SmolLM2's tokenizer, saved as a model folder."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("random-smollm2")
    tok = tf.AutoTokenizer.from_pretrained(smollm2_path)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    from test_search_families import _sharpen

    _sharpen(model, 4.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _rules_cfg(tmp, name, model, shared_data, **kw):
    return load_search_config({
        "name": name, "model": model, "tasks": ["sst2", "agnews"], "samples_per_task": 16,
        "validation_per_task": 24, "seed": 1, "data_dir": str(shared_data), "candidates": "1,2:*",
        "fast": {"top_k": 3, "verify": "hf"}, "hf": {"threads": 1}, "per_task": True, "validate_singles": False,
        "output": str(tmp / name / "searched.yaml"), "run_dir": str(tmp / name / "run"),
        "state_dir": str(tmp / name / "state"), **kw})


_ACT_KEYS = ("baseline", "selected", "kept", "validation", "candidates", "split", "ranking_vs_verified")


def test_search_over_rules_runs_end_to_end_on_a_random_model(tmp_path, shared_data, random_smollm2):
    """The whole flow: ranking, exact scores, validated selection, comparison, files. (A random
    model's answers hardly move, so whether a set is accepted is not asserted here; the written
    first_token profiles are checked in test_written_profiles_follow_the_choice.)"""
    from act_plugin.config import ACTEngineConfig
    from act_plugin.search.run import run_search

    grid = {"gammas": [0.25, 4.0], "top_k": 4, "uniform": True, "combine_max": 4}
    res = run_search(_rules_cfg(tmp_path, "rules", random_smollm2, shared_data, rules=["act", "first_token"],
                                first_token=grid), progress=False, quiet=True)
    report = json.loads(res.report_path.read_text())
    rules = report["rules"]
    ft = rules["first_token"]
    assert ft["ranked"] == 2 * 4 * 2  # (layer, head, gamma) over 2 layers x 4 heads x 2 gammas
    assert [r["why"] for r in ft["exact"]] == ["top_k"] * 4 + ["uniform"] * 2
    assert all("estimate" in r for r in ft["exact"][:4]) and ft["exact"][4]["candidate"].startswith("8 heads")
    comp = rules["comparison"]
    assert set(comp["per_task"]) == {"sst2", "agnews"}
    for task, row in comp["per_task"].items():
        a, f = row["act"], row["first_token"]
        want = ("first_token" if f is not None and (a is None or f["gain"] > a["gain"])
                else "act" if a is not None else "none")
        assert row["chosen"] == want, task
        assert set(row["none"]["accuracy"]) == {task}
        if a is not None and f is not None and row["both"]["evaluated"]:
            assert "beats_chosen" in row["both"]
        # every accepted first_token step passed the paired rule
        for step in ft["per_task"][task]["steps"]:
            if step["accepted"]:
                assert not step["harmed"] and step["mean_gain"] > 0
    eng = ACTEngineConfig.from_any(res.profiles_path)
    chosen = {t: r["chosen"] for t, r in comp["per_task"].items()}
    assert set(eng.profiles) == {t for t, c in chosen.items() if c != "none"}
    for task, prof in eng.profiles.items():
        assert prof.rule == chosen[task], task
        if prof.rule == "first_token":
            assert prof.scale == comp["per_task"][task]["first_token"]["scale"]
            assert "first_token (its set beat ACT's on validation; report section 'rules'): " in \
                res.profiles_path.read_text()
    md = res.report_path.with_suffix(".md").read_text()
    assert "## Rules per task" in md

    # the ACT half of the search is exactly the default search's
    plain = run_search(_rules_cfg(tmp_path, "plain", random_smollm2, shared_data), progress=False, quiet=True)
    pr = json.loads(plain.report_path.read_text())
    assert "rules" not in pr and "rules" not in pr["config"]
    for key in _ACT_KEYS:
        assert pr[key] == report[key], key


def test_written_profiles_follow_the_choice(tmp_path):
    """Per task the engine config gets the chosen rule's set: a first_token profile (gamma per
    head, loadable, valid for the model) where first_token was chosen, ACT's set where ACT was,
    nothing where neither; the header names both groups."""
    import datetime as dt
    from types import SimpleNamespace

    from act_plugin.config import ACTEngineConfig, ModelShape
    from act_plugin.search.config import OutputPaths
    from act_plugin.search.first_token import FirstTokenSearch
    from act_plugin.search.outputs import _write_profiles
    from act_plugin.search.run import _chosen_configs

    cfg = load_search_config({**BASE, **RULES, "tasks": ["sst2", "agnews", "trec"], "per_task": True})
    prep = SimpleNamespace(cfg=cfg, started=dt.datetime(2026, 12, 3, tzinfo=dt.UTC),
                           shape=ModelShape(num_layers=30, num_heads=9, num_kv_heads=3, name="smollm2-135m"))
    uniform = tuple((layer, h, 2.0) for layer in (2, 3) for h in range(9))
    ft = FirstTokenSearch([], {}, 0.0, [], {}, {}, {}, {}, [],
                          per_task={"sst2": Selection([((5, 1, 0.5),), ((7, 2, 1.5),)], None),
                                    "agnews": Selection([uniform], None), "trec": Selection([], None)})
    act = {"agnews": ACTConfig(heads={1: [0]}, name="agnews"), "trec": ACTConfig(heads={19: [3]}, name="trec")}
    comparison = {"shared": {"chosen": "none"},
                  "per_task": {"sst2": {"chosen": "first_token"}, "agnews": {"chosen": "first_token"},
                               "trec": {"chosen": "act"}}}
    shared, profiles = _chosen_configs(prep, ft, comparison, None, act)
    assert shared is None
    report = {"validation": {"tasks_without_profile": ["sst2"]},
              "rules": {"comparison": {**comparison, "tasks_without_profile": []}}}
    paths = OutputPaths(tmp_path / "a.yaml", tmp_path / "p.yaml", tmp_path / "r.json", tmp_path / "h.png")
    _write_profiles(prep, paths, report, profiles)
    text = paths.profiles.read_text()
    assert "No profile" not in text and "first_token (its set beat ACT's on validation; report section " \
        "'rules'): sst2, agnews" in text
    eng = ACTEngineConfig.from_any(paths.profiles)
    assert {t: p.rule for t, p in eng.profiles.items()} == {"sst2": "first_token", "agnews": "first_token",
                                                            "trec": "act"}
    assert eng.profiles["sst2"].scale == {"5:1": 0.5, "7:2": 1.5}
    assert eng.profiles["agnews"].scale == {"2:all": 2.0, "3:all": 2.0}
    assert eng.profiles["trec"].heads == {19: [3]}
    for prof in eng.profiles.values():
        prof.validate_for(prep.shape)


@pytest.mark.parametrize("name", ["search_rules_tiny.yaml", "search_rules_smollm2.yaml"])
def test_shipped_rules_configs_load(name):
    from pathlib import Path

    cfg = load_search_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert cfg.rules == ["act", "first_token"] and cfg.per_task and cfg.fast.verify == "hf"
    assert cfg.first_token.gammas == [0.5, 0.75, 1.5, 2.0]


def test_store_keeps_first_token_sets_apart_and_reads_them_back(tmp_path):
    from act_plugin.search.store import SearchStore

    st = SearchStore(tmp_path, "k", {"x": 1})
    st.add_set("hf", "search", [(1, 2)], [0.5], 1.0, 1.0)
    st.add_set("hf", "search", [(1, 2)], [0.7], 1.0, 1.0, first_token={(3, 4): 2.0})
    st.add_set("hf", "search", [], [0.9], 1.0, 1.0, first_token={(3, 4): 0.5})
    st.add_ft_grad(0, {"grad": [[3, 4, 2.0, 0.1]]})
    again = SearchStore(tmp_path, "k", {"x": 1})
    assert again.get_set("hf", "search", [(1, 2)])["margins"] == [0.5]
    assert again.get_set("hf", "search", [(1, 2)], {(3, 4): 2.0})["margins"] == [0.7]
    assert again.get_set("hf", "search", [], {(3, 4): 0.5})["margins"] == [0.9]
    assert again.get_set("hf", "search", [], {(3, 4): 2.0}) is None
    assert again.ft_grads[0]["grad"] == [[3, 4, 2.0, 0.1]] and again.resumed == 4
    plain = [json.loads(x) for x in (tmp_path / "k.jsonl").read_text().splitlines()][1]
    assert "first_token" not in plain  # an ACT record is written exactly as before


def test_both_check_runs_the_two_sets_in_one_forward_unless_they_share_a_head():
    from types import SimpleNamespace

    from act_plugin.search.rules_compare import _row

    base = np.array([1.0] * 50 + [-1.0] * 50)  # validation margins: half right
    calls = []

    def validation_correct(heads, phase, tasks, first_token):
        calls.append((list(heads), dict(first_token), tasks))
        return {"t": np.arange(100) < 70}  # together: 20 more right, none wrong

    ev = SimpleNamespace(validation_correct=validation_correct)
    ver = SimpleNamespace(validation_baseline={"t": base})
    act = _selection(0.05)
    ft = Selection([((3, 4, 2.0),)], _selection(0.08).decision)
    row = _row(ev, ver, act, ft, ["t"], 0.05, False)
    assert calls == [([(1, 2)], {(3, 4): 2.0}, ["t"])]
    assert row["chosen"] == "first_token" and row["none"]["accuracy"] == {"t": 0.5}
    both = row["both"]
    assert both["evaluated"] and both["accepted"] and both["gain"] == pytest.approx(0.2)
    assert both["beats_chosen"] and both["per_task_p"]["t"] < 0.001
    assert row["first_token"]["scale"] == {"3:4": 2.0} and row["act"]["heads"] == {"1": [2]}
    clash = _row(ev, ver, act, Selection([((1, 2, 0.5),)], _selection(0.08).decision), ["t"], 0.05, False)
    assert not clash["both"]["evaluated"] and "L1H2" in clash["both"]["why"] and len(calls) == 1
    alone = _row(ev, ver, act, _selection(None), ["t"], 0.05, False)
    assert alone["chosen"] == "act" and not alone["both"]["evaluated"] and alone["first_token"] is None
