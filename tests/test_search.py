"""Head search on the transformers path: config errors, the combined-set step, the
first-order estimate (against finite differences on a tiny random model), exactness of the
batched layer-by-layer scores, and a tiny real search with interruption + resume."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from act_plugin import ACTConfig
from act_plugin.search.combine import combine_heads
from act_plugin.search.config import SearchConfigError, load_search_config
from act_plugin.search.scoring import CalibrationSet, score_logprobs

BASE = {"model": "smollm2-135m", "tasks": ["sst2"], "output": "x.yaml"}


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "change, match",
    [
        ({"bogus": 1}, r"unknown key 'bogus' \(allowed: name, model"),
        ({"fast": {"topk": 3}}, r"unknown key 'fast.topk' \(allowed: top_k"),
        ({"split": "test"}, r"split 'test': a head search may only use TRAINING data"),
        ({"split": "dev"}, r"TRAINING data"),
        ({"candidates": "2-x:*"}, r"candidates: .*cannot read"),
        ({"candidates": {"3-1": [0]}}, r"candidates: .*runs backwards"),
        ({"candidates": "5"}, r"candidates: .*LAYERS:HEADS"),
        ({"tasks": ["nope"]}, r"unknown task 'nope'"),
        ({"tasks": ["arc_easy_ll"]}, r"multi-token answers"),
        ({"beta": 2}, r"beta must be in \[0, 1\]"),
        ({"score": "f1"}, r"score: "),
        ({"output": "x.json"}, r"written as YAML"),
        ({"fast": {"check_layers": "all"}}, r"name the layers"),
    ],
)
def test_config_errors(change, match):
    with pytest.raises(SearchConfigError, match=match):
        load_search_config({**BASE, **change})


def test_config_candidates_checked_against_model():
    cfg = load_search_config({**BASE, "candidates": "2-3:0,8"})
    assert cfg.candidate_heads(30, 9) == [(2, 0), (2, 8), (3, 0), (3, 8)]
    with pytest.raises(SearchConfigError, match=r"names head\(s\) \[8\] of layer 2, but .* 4 query heads"):
        cfg.candidate_heads(30, 4)
    with pytest.raises(SearchConfigError, match=r"names layer 3, but"):
        cfg.candidate_heads(3, 9)
    assert len(load_search_config(BASE).candidate_heads(30, 9)) == 270
    with pytest.raises(SearchConfigError, match="check_layers"):
        load_search_config({**BASE, "fast": {"check_layers": "40"}}).check_layers(30)


def test_config_file_and_overrides(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("model: smollm2-135m\ntasks: [sst2, agnews]\nsplit: train\noutput: out/a.yaml\n")
    cfg = load_search_config(p, **{"fast.top_k": 3, "method": "exact"})
    assert cfg.fast.top_k == 3 and cfg.method == "exact" and cfg.split == "train"
    assert str(cfg.report_path) == "out/a.search.json" and str(cfg.heatmap_path) == "out/a.heatmap.png"
    p.write_text("model: smollm2-135m\ntasks: [sst2]\nsplit: validation\n")
    with pytest.raises(SearchConfigError, match=rf"{p}: .*TRAINING"):
        load_search_config(p)


def test_cli_reports_config_errors(tmp_path, capsys):
    from act_plugin.cli import main

    p = tmp_path / "s.yaml"
    p.write_text("model: smollm2-135m\ntasks: [sst2]\nsplit: test\n")
    assert main(["search", str(p)]) == 2
    assert "TRAINING data" in capsys.readouterr().err


# ----------------------------------------------------------------------------- combined set


def _run_combine(values: dict[frozenset, float], baseline: float, kept, singles=None, **kw):
    calls = []

    def evaluate(s):
        calls.append(s)
        return values[s]

    return combine_heads(kept, evaluate, baseline, singles=singles, **kw), calls


def test_combine_additive_keeps_all():
    heads = [(1, 0), (2, 1), (3, 2)]
    gain = {heads[0]: 0.1, heads[1]: 0.2, heads[2]: 0.05}
    values = {frozenset(s): 1.0 + sum(gain[h] for h in s)
              for r in range(4) for s in itertools.combinations(heads, r)}
    res, _ = _run_combine(values, 1.0, heads, singles={h: 1.0 + g for h, g in gain.items()})
    assert res.heads == sorted(heads) and res.complete and res.score == pytest.approx(1.35)


def test_combine_drops_interfering_head():
    a, b, c = (1, 0), (2, 0), (3, 0)
    values = {frozenset(): 0.0, frozenset([a]): 0.3, frozenset([b]): 0.2, frozenset([c]): 0.1,
              frozenset([a, b]): 0.5, frozenset([a, c]): 0.2, frozenset([b, c]): 0.1, frozenset([a, b, c]): 0.25}
    res, calls = _run_combine(values, 0.0, [a, b, c], singles={a: 0.3, b: 0.2, c: 0.1})
    assert res.heads == [a, b] and res.score == 0.5
    assert calls[0] == frozenset([a, b, c]) and calls[1] == frozenset([a, b])  # least useful alone tried first


def test_combine_falls_back_to_best_single():
    a, b = (1, 0), (2, 0)
    values = {frozenset([a, b]): -1.0}
    res, _ = _run_combine(values, 0.0, [a, b], singles={a: 0.3, b: 0.2})
    assert res.heads == [a] and res.score == 0.3


def test_combine_everything_below_baseline_returns_empty():
    heads = [(0, 0), (1, 1), (2, 2)]
    values = {frozenset(s): -0.1 * len(s) for r in range(1, 4) for s in itertools.combinations(heads, r)}
    # the singles are below the baseline too (as if scored on other data): nothing may be returned
    res, _ = _run_combine(values, 0.0, heads, singles={h: -0.1 for h in heads})
    assert res.heads == [] and res.score == 0.0
    assert "no evaluated head set beats the baseline" in res.note


def test_combine_pool_takes_best_kept_by_exact_gain():
    from act_plugin.search.combine import combine_pool

    kept = [(1, 0), (2, 3), (5, 1), (7, 2)]
    single = {(1, 0): 0.2, (2, 3): 0.5, (5, 1): 0.2, (7, 2): 0.9, (9, 9): 5.0}  # (9, 9) was not kept
    assert combine_pool(kept, single, 2) == [(2, 3), (7, 2)]
    assert combine_pool(kept, single, 3) == [(1, 0), (2, 3), (7, 2)]  # tie at 0.2: lower layer first
    assert combine_pool(kept, single, None) == sorted(kept)
    assert combine_pool(kept, single, 10) == sorted(kept)
    # the combined-set step itself starts from that pool and never evaluates a set with (1, 0)/(5, 1)
    seen = []
    res = combine_heads(kept, lambda s: seen.append(s) or sum(single[h] for h in s), 0.0,
                        singles={h: single[h] for h in kept}, max_heads=2)
    assert res.start == [(2, 3), (7, 2)] and seen[0] == frozenset(res.start)
    assert all(s <= {(2, 3), (7, 2)} for s in seen) and res.heads == [(2, 3), (7, 2)]
    with pytest.raises(ValueError, match="max_heads needs the single score"):
        combine_heads(kept, lambda s: 0.0, 0.0, singles={(2, 3): 0.5}, max_heads=2)


def test_combine_never_below_baseline_random():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 5)
        heads = [(i, rng.randint(0, 3)) for i in range(n)]
        base = rng.uniform(-1, 1)
        values = {frozenset(s): rng.uniform(-1.5, 1.5)
                  for r in range(1, n + 1) for s in itertools.combinations(heads, r)}
        singles = {h: values[frozenset([h])] for h in heads}
        kept = [h for h in heads if singles[h] > base]
        cap = rng.choice([None, 1, 3])
        res, calls = _run_combine(values, base, kept, singles=singles, max_evals=cap)
        assert res.score >= base
        chosen = frozenset(res.heads)
        assert res.score == (base if not chosen else values[chosen])
        if cap is not None:
            assert len(calls) <= cap
        if cap is None and len(kept) > 1 and res.heads and set(res.heads) <= set(kept) and len(res.heads) > 1:
            # greedy endpoint: no single removal from the returned set helps
            for h in res.heads:
                smaller = chosen - {h}
                if smaller in values:
                    assert values[smaller] <= res.score


# ----------------------------------------------------------------------------- tiny random model


def _tiny_model(seed=0, layers=3, heads=4, kv=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128,
                      attn_implementation="sdpa", tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # sharper attention than the default init: real sinks above tau
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def _tiny_calib(seed=0, n=10):
    rng = random.Random(seed)
    prompts, choices, gold, tasks = [], [], [], []
    for i in range(n):
        length = rng.randint(5, 24)
        prompts.append([rng.randrange(4, 96) for _ in range(length)])
        k = 2 if i % 2 else 3
        choices.append(tuple(rng.sample(range(4, 96), k)))
        gold.append(rng.randrange(k))
        tasks.append("a" if i % 2 else "b")
    return CalibrationSet(prompts, choices, gold, tasks)


@pytest.fixture(scope="module")
def tiny():
    from act_plugin.search.hf_backend import HFSearchBackend

    model = _tiny_model()
    calib = _tiny_calib()
    be = HFSearchBackend("unused", calib, beta=0.3, threshold=0.08, batch_tokens=64, threads=1, model=model)
    assert len(be.batches) > 2  # several right-padded batches
    return be


def test_first_order_estimate_matches_finite_difference(tiny):
    be = tiny
    heads = [(lyr, h) for lyr in range(be.num_layers) for h in range(be.num_heads)]
    grad, _ = be.gradients(heads)
    eps = 1e-2
    fd = np.zeros_like(grad)
    for head in heads:
        fd[head] = (be.gated_objective({head: eps}) - be.gated_objective({head: -eps})) / (2 * eps)
    assert np.abs(grad).max() > 1e-3, "no head moves the score: the check would be vacuous"
    np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=2e-4)


def test_gate_at_one_is_the_exact_calibration(tiny):
    """alpha = 1 on one head = that head calibrated (the exact path); alpha = 0 = baseline."""
    be = tiny
    base = score_logprobs(be.evaluate([]), be.calib).margin
    assert be.gated_objective({(0, 1): 0.0}) == pytest.approx(base, abs=1e-6)
    for head in [(0, 1), (1, 2), (2, 3)]:
        exact = score_logprobs(be.evaluate([head]), be.calib).margin
        assert be.gated_objective({head: 1.0}) == pytest.approx(exact, abs=1e-5)


def test_ranking_pass_forward_is_the_baseline(tiny):
    """The gated forward at alpha = 0 gives bitwise the no-grad baseline (the search reuses it)."""
    be = tiny
    _, lp_grad = be.gradients([(1, 0), (2, 1)])
    np.testing.assert_array_equal(lp_grad, be.evaluate([]))


def test_batched_exact_scores_match_hf_reference(tiny):
    """Right-padded batches + cached hidden states == one prompt at a time through hf.enable_act."""
    from act_plugin.hf import act_enabled

    be = tiny
    be.plan_cache([1, 2])
    be.evaluate([])
    heads = [(1, 0), (2, 3), (1, 2)]
    got = be.evaluate(heads)
    ref_model = _tiny_model()
    cfg = ACTConfig(beta=0.3, threshold=0.08, heads={1: [0, 2], 2: [3]})
    with torch.no_grad(), act_enabled(ref_model, cfg):
        for i, (p, ids) in enumerate(zip(be.calib.prompts, be.calib.choice_ids)):
            lp = torch.log_softmax(ref_model(torch.tensor([p])).logits[0, -1], -1)[list(ids)].numpy()
            np.testing.assert_allclose(got[i, : len(ids)], lp, atol=2e-5)
    assert not np.allclose(got, be.evaluate([]), equal_nan=True, atol=1e-6)  # calibration changed something


# ----------------------------------------------------------------------------- tiny real search


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="sdpa")


def _search_cfg(tmp, name, shared_data, **kw):
    return load_search_config({
        "name": name, "model": "smollm2-135m", "tasks": ["sst2", "agnews"], "samples_per_task": 8, "seed": 3,
        "data_dir": str(shared_data), "candidates": "5,20:0-2",
        "fast": {"top_k": 4, "verify": "hf", "check_layers": "20"}, "hf": {"threads": 1},
        "output": str(tmp / name / "searched.yaml"), "state_dir": str(tmp / name / "state"), **kw})


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_tiny_search_valid_config_and_resume(tmp_path, shared_data, smollm2_path, smollm2_hf):
    from transformers import AutoConfig

    from act_plugin.search.run import run_search

    full = run_search(_search_cfg(tmp_path, "full", shared_data), hf_model=smollm2_hf, progress=False, quiet=True)
    cfg = ACTConfig.from_file(full.output)
    heads = cfg.validate_for(AutoConfig.from_pretrained(smollm2_path))
    assert set((lyr, h) for lyr, hs in heads.items() for h in hs) <= {(lyr, h) for lyr in (5, 20) for h in range(3)}
    assert cfg.beta == 0.4 and cfg.name == "full" and "train splits" in cfg.source and "sst2,agnews" in cfg.source
    report = json.loads(full.report_path.read_text())
    assert full.heatmap_path.stat().st_size > 1000
    md = full.report_path.with_suffix(".md").read_text()
    assert "## Ranking check" in md and f"{report['baseline']['margin']:.4f}" in md
    assert all(f"L20H{h} |" in md for h in range(3))
    assert report["selected"]["scores"]["margin"] >= report["baseline"]["margin"]
    rows = {(r["layer"], r["head"]): r for r in report["candidates"]}
    assert len(rows) == 6 and all("estimate_delta_margin" in r for r in rows.values())
    assert all("exact" in rows[(20, h)] for h in range(3))  # the check layer is brute-forced
    assert sum("exact" in r for r in rows.values()) >= 4
    assert report["ranking_check"]["vs_exact_margin"]["n"] == 3
    assert report["timing"]["total_s"] > 0 and len(report["timing"]["loadavg_start"]) == 3

    # interrupted after two exact candidates, then resumed: the same result, nothing recomputed
    seen = []

    def stop_after_two(head, rec):
        seen.append(head)
        if len(seen) == 2:
            raise _Stop

    part_cfg = _search_cfg(tmp_path, "part", shared_data)
    with pytest.raises(_Stop):
        run_search(part_cfg, hf_model=smollm2_hf, progress=False, quiet=True, on_candidate=stop_after_two)
    resumed = run_search(part_cfg, hf_model=smollm2_hf, progress=False, quiet=True)
    r2 = json.loads(resumed.report_path.read_text())
    assert r2["timing"]["resumed_records"] >= 3  # ranking batches + baseline + 2 candidates
    assert resumed.config.heads == full.config.heads
    for key in ("baseline", "selected", "kept", "ranking_check"):
        assert r2[key] == report[key], key
    assert [r.get("exact", {}).get("margin") for r in r2["candidates"]] == \
        [r.get("exact", {}).get("margin") for r in report["candidates"]]
    assert [r["estimate_delta_margin"] for r in r2["candidates"]] == \
        [r["estimate_delta_margin"] for r in report["candidates"]]
    state = tmp_path / "part" / "state" / f"{r2['settings_hash']}.jsonl"
    lines = [json.loads(x) for x in state.read_text().splitlines()]
    sets = [tuple(map(tuple, x["heads"])) for x in lines if x["kind"] == "set"]
    assert len(sets) == len(set(sets)), "a finished score was recomputed after resuming"


def test_shipped_search_outputs_are_consistent(smollm2_path):
    """configs/smollm2_searched.yaml (what the demo and the README's eval use) is a valid head
    set for the model and is exactly the set its committed search report selected."""
    from pathlib import Path

    from transformers import AutoConfig

    root = Path(__file__).resolve().parents[1]
    cfg = ACTConfig.from_file(root / "configs" / "smollm2_searched.yaml")
    heads = cfg.validate_for(AutoConfig.from_pretrained(smollm2_path))
    report = json.loads((root / "docs" / "search" / "smollm2_search.json").read_text())
    assert {int(k): tuple(v) for k, v in report["selected"]["heads"].items()} == heads
    assert {k: tuple(v) for k, v in cfg.heads.items()} == heads
    assert report["config"]["split"] == "train" and cfg.beta == report["beta"]
    assert report["selected"]["scores"]["margin"] >= report["baseline"]["margin"]
    assert load_search_config(root / "configs" / "search_smollm2.yaml").output == "configs/smollm2_searched.yaml"
