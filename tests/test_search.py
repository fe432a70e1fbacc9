"""Head search on the transformers path: config errors, the combined-set step, the
first-order estimate (against finite differences on a tiny random model), exactness of the
batched layer-by-layer scores, and a tiny real search with interruption + resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from act_plugin import ACTConfig
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


def test_outputs_go_to_the_run_folder_unless_updating_the_shipped_files(tmp_path, capsys):
    from pathlib import Path

    from act_plugin.cli import main

    root = Path(__file__).resolve().parents[1]
    cfg = load_search_config(root / "configs" / "search_smollm2.yaml")
    run = cfg.destinations()
    assert run.report.parent == Path("runs") / cfg.config_name and run.profiles.name == "smollm2_searched_profiles.yaml"
    assert all(p.parent == run.report.parent for p in (run.output, run.profiles, run.heatmap))
    shipped = cfg.destinations(update_shipped=True)
    assert shipped.profiles == Path("configs/smollm2_searched_profiles.yaml")
    assert shipped.report == Path("docs/search/smollm2_search.json") and shipped.summary.suffix == ".md"
    assert load_search_config(BASE, run_dir=str(tmp_path)).destinations().output == tmp_path / "x.yaml"
    with pytest.raises(SearchConfigError, match="distinct file names"):
        load_search_config({**BASE, "report": "a/x.yaml"}).destinations()
    assert main(["search", str(root / "configs" / "search_smollm2.yaml"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "(run folder)" in out and "configs/smollm2_searched_profiles.yaml" not in out
    assert main(["search", str(root / "configs" / "search_smollm2.yaml"), "--check", "--update-shipped"]) == 0
    assert "configs/smollm2_searched_profiles.yaml" in capsys.readouterr().out


def test_cli_reports_config_errors(tmp_path, capsys):
    from act_plugin.cli import main

    p = tmp_path / "s.yaml"
    p.write_text("model: smollm2-135m\ntasks: [sst2]\nsplit: test\n")
    assert main(["search", str(p)]) == 2
    assert "TRAINING data" in capsys.readouterr().err


# ----------------------------------------------------------------------------- validation rule


def _correct(n, right):
    a = np.zeros(n, dtype=bool)
    a[list(right)] = True
    return a


def test_mcnemar_and_mde_match_references():
    from scipy.stats import binomtest

    from act_plugin.search.select import mcnemar_p, min_detectable_effect

    for better, worse in [(0, 0), (3, 0), (7, 47), (14, 36), (10, 10), (1, 9)]:
        ref = binomtest(min(better, worse), better + worse, 0.5).pvalue if better + worse else 1.0
        assert mcnemar_p(better, worse) == pytest.approx(ref, rel=1e-9)
    # ~2,000 prompts for a 2-point change at 10% discordance (alpha 0.05, power 0.8)
    assert min_detectable_effect(1962, 0.1) == pytest.approx(0.0204, abs=3e-4)
    assert min_detectable_effect(100, 0.1) > min_detectable_effect(400, 0.1) > 0
    # the search states the exact test's power, as the eval does: 40 validation prompts at 10%
    # flips resolve nothing (4 discordant pairs expected; 6 are needed for p < 0.05)
    assert min_detectable_effect(40, 0.1) is None


def test_search_and_eval_share_one_statistics_home():
    import act_plugin.eval.stats as eval_stats
    import act_plugin.stats as shared
    from act_plugin.search import select

    assert select.mcnemar_p is shared.mcnemar_p and select.min_detectable_effect is shared.minimum_detectable_effect
    assert eval_stats.minimum_detectable_effect is shared.minimum_detectable_effect
    effect = select.judge([(1, 0)], {"a": _correct(300, range(150))}, {"a": _correct(300, range(160))}).effects["a"]
    assert effect.to_dict()["mde_at_planning_discordance"] == shared.minimum_detectable_effect(300, 0.1)


def test_selection_refuses_set_that_helps_the_mean_but_harms_one_task():
    """Stub scorer: head (1, 0) lifts two tasks by 20 points each but turns 12 of 60 'a'
    prompts wrong and none right (McNemar p < 0.001): the mean gain is large and positive,
    yet the set is refused; head (2, 0) helps a little everywhere and is accepted."""
    from act_plugin.search.select import judge, select_forward

    n = 60
    base = {"a": _correct(n, range(40)), "b": _correct(n, range(20)), "c": _correct(n, range(20))}

    def evaluate(heads):
        out = {t: v.copy() for t, v in base.items()}
        if (1, 0) in heads:
            out["a"][28:40] = False
            out["b"][20:32] = True
            out["c"][20:32] = True
        if (2, 0) in heads:
            out["a"][40:42] = True
            out["b"][32:34] = True
            out["c"][32:34] = True
        return out

    bad = judge([(1, 0)], base, evaluate([(1, 0)]))
    assert bad.mean_gain > 0.05 and bad.harmed == ["a"] and not bad.accepted
    assert bad.effects["a"].p < 0.001 and "significantly harms a" in bad.reason
    sel = select_forward([(1, 0), (2, 0)], evaluate, base)
    assert sel.heads == [(2, 0)] and sel.decision.accepted
    assert [s["accepted"] for s in sel.steps] == [False, True]
    # a set whose mean gain is not positive is refused even if no task is harmed
    assert not judge([(3, 0)], base, base).accepted
    # nothing acceptable: the empty set, and the note says so
    none = select_forward([(1, 0)], evaluate, base)
    assert none.heads == [] and "nothing is calibrated" in none.note


def test_selection_steps_need_a_gain_over_the_current_set():
    from act_plugin.search.select import select_forward

    base = {"a": _correct(100, range(50))}
    gains = {(1, 0): range(50, 55), (2, 0): range(55, 57)}

    def evaluate(heads):
        out = base["a"].copy()
        for h in heads:
            out[list(gains.get(h, []))] = True
        if (3, 0) in heads:  # cancels the others
            out[50:57] = False
        return {"a": out}

    sel = select_forward([(1, 0), (3, 0), (2, 0)], evaluate, base)
    assert sel.heads == [(1, 0), (2, 0)] and sel.evaluations == 3
    capped = select_forward([(1, 0), (3, 0), (2, 0)], evaluate, base, max_evals=2)
    assert capped.heads == [(1, 0)] and not capped.complete


def test_significant_gain_rule_refuses_gains_validation_cannot_resolve():
    """gain: significant -- a set whose gain no task shows at p < alpha is refused, one with a
    significant gain on some task is accepted; the default rule accepts both."""
    from act_plugin.search.select import judge, select_forward

    base = {"a": _correct(300, range(150)), "b": _correct(300, range(150))}

    def evaluate(heads):
        out = {t: v.copy() for t, v in base.items()}
        if (1, 0) in heads:  # +1.0 point on a: 3 / 0 flips, p = 0.25
            out["a"][150:153] = True
        if (2, 0) in heads:  # +6.7 points on b: 20 / 0 flips, p < 1e-5
            out["b"][150:170] = True
        return out

    small = judge([(1, 0)], base, evaluate([(1, 0)]), require_significant_gain=True)
    assert small.mean_gain > 0 and not small.harmed and small.improved == [] and not small.accepted
    assert "no task improves significantly" in small.reason and small.to_dict()["gain_rule"] == "significant"
    assert judge([(1, 0)], base, evaluate([(1, 0)])).accepted  # the default rule: positive mean gain suffices
    big = judge([(2, 0)], base, evaluate([(2, 0)]), require_significant_gain=True)
    assert big.accepted and big.improved == ["b"] and "significantly improves b" in big.reason
    sel = select_forward([(1, 0), (2, 0)], evaluate, base, require_significant_gain=True)
    assert sel.heads == [(2, 0)] and [s["accepted"] for s in sel.steps] == [False, True]
    assert select_forward([(1, 0)], evaluate, base, require_significant_gain=True).heads == []


def test_objectives():
    from act_plugin.search.scoring import objective_gain

    base = np.array([0.5, -0.5, 3.0, -2.0])
    new = np.array([0.7, 0.2, 5.0, -2.0])
    tasks = ["x", "x", "y", "y"]
    g, per = objective_gain("margin", new, base, tasks)
    assert per == pytest.approx({"x": 0.45, "y": 1.0}) and g == pytest.approx(0.725)
    g, per = objective_gain("clipped_margin", new, base, tasks, clip=1.0)
    assert per == pytest.approx({"x": (0.2 + 0.7) / 2, "y": 0.0})  # 3 -> 5 is beyond the clip: worth nothing
    g, per = objective_gain("accuracy", new, base, tasks)
    assert per == pytest.approx({"x": 0.5, "y": 0.0})
    g, _ = objective_gain("worst_task", new, base, tasks)
    assert g == pytest.approx(0.45)
    with pytest.raises(ValueError, match="unknown objective"):
        objective_gain("f1", new, base, tasks)


# ----------------------------------------------------------------------------- split


def test_split_is_deterministic_and_the_search_part_ignores_the_validation_budget(shared_data, smollm2_path):
    from transformers import AutoTokenizer

    from act_plugin.search.split import build_search_data

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tasks = ["sst2", "agnews", "cb"]  # official train/test files, a carve-out of one file, a small train split
    a = build_search_data(tasks, 20, 30, seed=5, tokenizer=tok, data_dir=shared_data)
    b = build_search_data(tasks, 20, 30, seed=5, tokenizer=tok, data_dir=shared_data)
    c = build_search_data(tasks, 20, 30, seed=6, tokenizer=tok, data_dir=shared_data)
    assert a.record() == b.record() and a.search == b.search and a.validation == b.validation
    assert a.record() != c.record()
    # the search part does not depend on the validation budget (raising it keeps the ranking)
    d = build_search_data(tasks, 20, 5, seed=5, tokenizer=tok, data_dir=shared_data)
    assert d.search == a.search
    assert all(set(d.record()["tasks"][t]["validation"]["rows"]) <= set(rec_v) for t, rec_v in
               ((t, a.record()["tasks"][t]["validation"]["rows"]) for t in tasks))
    assert len(a.search) == 60 and sum(len(x) for x in a.validation.values()) == 90


def _evaluated_keys(shared_data):
    """(task, row, key) of every document of every project task's evaluated split (the split
    `act-plugin eval` scores), read independently of the search's index."""
    from act_plugin.search.overlap import document_text, text_key
    from act_plugin.tasks import TASKS, load_docs

    out, files = [], set()
    for name, spec in TASKS.items():
        f = spec.files.get("test") or spec.files["all"]
        if f not in files:
            files.add(f)
            out += [(name, d["row"], text_key(document_text(spec, d))) for d in load_docs(name, "test", shared_data)]
    return out


def test_text_key_finds_the_sst_sentences_inside_rotten_tomatoes_snippets(shared_data):
    """SST-2's dev sentences are Rotten Tomatoes snippets of MR's rt-polarity.all (or
    sentences inside one), tokenised differently ("it 's" / "it's", -lrb- / "("); the key
    must see through that, and must not match unrelated texts by chance."""
    from act_plugin.search.overlap import EvaluatedTexts, document_text, text_key
    from act_plugin.tasks import get_task, load_docs

    assert text_key("it 's a -lrb- charming -rrb- journey .") == text_key("It's a (charming) journey.")
    assert text_key("Café") == text_key("cafe")
    rt = EvaluatedTexts()
    mr = get_task("mr")
    rt.add("mr", ((d["row"], document_text(mr, d)) for d in load_docs("mr", "all", shared_data)), "all")
    dev = load_docs("sst2", "test", shared_data)
    found = [rt.matches(document_text(get_task("sst2"), d)) for d in dev]
    hows = {m[0].how for m in found if m}
    assert sum(bool(m) for m in found) >= 850 and len(dev) == 872  # 731 equal, the rest inside a snippet
    assert hows == {"same text", "inside evaluated text"}
    assert not rt.matches("bad") and not rt.matches("the film")  # short texts match only exactly


def test_shipped_search_parts_share_no_text_with_any_evaluated_split(shared_data, smollm2_path):
    """The parts the shipped search config draws (the same functions the search runs), for
    every one of its tasks, against the evaluated split of EVERY project task: no document's
    normalised text equals, contains or lies inside an evaluated document's. Rows of a task
    carved out of one file never meet its evaluated rows; the parts keep their sizes (the
    dropped documents were replaced), and every drop is recorded with what it matched."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from act_plugin.search.overlap import MIN_CONTAINED, document_text, text_key
    from act_plugin.search.split import build_search_data
    from act_plugin.tasks import TASKS, get_task, load_docs

    cfg = load_search_config(Path(__file__).resolve().parents[1] / "configs" / "search_smollm2.yaml")
    assert len(cfg.tasks) == 8
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    data = build_search_data(cfg.tasks, cfg.samples_per_task, cfg.validation_per_task, cfg.seed, tok,
                             data_dir=shared_data)
    rec = data.record()
    evaluated = _evaluated_keys(shared_data)
    exact = {k: (t, r) for t, r, k in evaluated}
    long_eval = "\n".join(k for _, _, k in evaluated if len(k) >= MIN_CONTAINED)
    # every evaluated file is checked once, under the first task reading it (arc_easy_ll and
    # boolq_spans read arc_easy's and boolq's files)
    first_reader: dict[str, str] = {}
    for n, spec_n in TASKS.items():
        first_reader.setdefault(spec_n.files.get("test") or spec_n.files["all"], n)
    assert {"arc_easy_ll", "boolq_spans"}.isdisjoint(first_reader.values())
    assert set(rec["deduplication"]["evaluated_splits"]) | set(rec["deduplication"]["not_checked"]) >= \
        set(first_reader.values())
    part_keys = {}
    for task in cfg.tasks:
        spec = get_task(task)
        train = {d["row"]: d for d in load_docs(task, "train", shared_data)}
        parts = rec["tasks"][task]
        s, v = parts["search"]["rows"], parts["validation"]["rows"]
        assert not set(s) & set(v)
        assert (len(s), len(v)) == ((64, 300) if task != "cb" else (44, 206)), task  # cb: 250 training documents
        test_file = spec.files.get("test") or spec.files["all"]
        if parts["search"]["file"] == test_file:  # carved out of one file: rows must not meet
            assert not set(s + v) & {d["row"] for d in load_docs(task, "test", shared_data)}
        for row in s + v:
            key = text_key(document_text(spec, train[row]))
            assert key not in exact, (task, row, exact.get(key))
            assert len(key) < MIN_CONTAINED or key not in long_eval, (task, row, "inside an evaluated document")
            part_keys[(task, row)] = key
    joined_parts = "\n".join(part_keys.values())
    inside = [(t, r) for t, r, k in evaluated if len(k) >= MIN_CONTAINED and k in joined_parts]
    assert not inside, f"evaluated documents inside a search/validation document: {inside[:5]}"
    dedup = rec["deduplication"]["tasks"]
    assert sum(x["dropped"] for x in dedup.values()) > 0 and dedup["mr"]["by_evaluated_task"].get("sst2")
    assert all(x["dropped"] == len(x["documents"]) for x in dedup.values())


def test_split_counts_of_a_small_task():
    from act_plugin.search.split import split_counts

    assert split_counts(1000, 64, 300) == (64, 300)
    assert split_counts(250, 100, 400) == (50, 200)
    assert split_counts(10, 5, 0) == (5, 0)


# ----------------------------------------------------------------------------- store


def test_store_key_and_damaged_lines(tmp_path):
    from act_plugin.search.store import SearchStore, SearchStoreError, maths_version, settings_hash

    assert len(maths_version()) == 16
    k1 = settings_hash({"candidates": [[1, 0]], "maths": maths_version()})
    assert k1 != settings_hash({"candidates": [[1, 0], [2, 0]], "maths": maths_version()})
    st = SearchStore(tmp_path, k1, {})
    st.add_set("hf", "search", [(1, 0)], [0.5, -0.25], 1.0, 1.0)
    st.add_set("hf", "val:a", [(1, 0)], [0.1], 1.0, 1.0)
    # a line cut short by an interruption (the last one) is dropped, and later appends stay readable
    with st.path.open("a") as fh:
        fh.write('{"kind": "set", "backend": "hf", "pa')
    st2 = SearchStore(tmp_path, k1, {})
    assert st2.resumed == 2 and st2.get_set("hf", "search", [(1, 0)])["margins"] == [0.5, -0.25]
    assert st2.get_set("hf", "search", [(2, 0)]) is None and st2.get_set("hf", "val:b", [(1, 0)]) is None
    st2.add_set("hf", "search", [], [0.0, 0.0], 1.0, 1.0)
    assert SearchStore(tmp_path, k1, {}).resumed == 3
    # a damaged line inside the file: a message naming the file, the line and --fresh
    lines = st.path.read_text().splitlines()
    lines[1] = '{"kind": "set", "backend": "hf", "heads": []}'
    st.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SearchStoreError, match=rf"{st.path}, line 2: .*missing field 'margins'.*--fresh"):
        SearchStore(tmp_path, k1, {})
    lines[1] = "garbage"
    st.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SearchStoreError, match=r"line 2: not JSON.*--fresh"):
        SearchStore(tmp_path, k1, {})
    assert SearchStore(tmp_path, k1, {}, resume=False).resumed == 0  # --fresh


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
        "name": name, "model": "smollm2-135m", "tasks": ["sst2", "agnews"], "samples_per_task": 8,
        "validation_per_task": 12, "seed": 3, "data_dir": str(shared_data), "candidates": "5,20:0-2",
        "fast": {"top_k": 4, "verify": "hf", "check_layers": "20"}, "hf": {"threads": 1}, "per_task": True,
        "output": str(tmp / name / "shipped" / "searched.yaml"), "run_dir": str(tmp / name / "run"),
        "state_dir": str(tmp / name / "state"), **kw})


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_tiny_search_valid_outputs_and_resume(tmp_path, shared_data, smollm2_path, smollm2_hf):
    from act_plugin.config import ACTEngineConfig
    from act_plugin.search.run import run_search

    full = run_search(_search_cfg(tmp_path, "full", shared_data), hf_model=smollm2_hf, progress=False, quiet=True)
    report = json.loads(full.report_path.read_text())
    # a plain run writes into its run folder only, never to the configured (shipped) paths
    assert full.report_path.parent == tmp_path / "full" / "run" and full.profiles_path.parent == full.report_path.parent
    assert not (tmp_path / "full" / "shipped").exists()
    assert set(report["split"]["deduplication"]["tasks"]) == {"sst2", "agnews"}
    v = report["validation"]
    # the split is recorded, the parts are disjoint and of the asked sizes
    for task in ("sst2", "agnews"):
        parts = report["split"]["tasks"][task]
        assert len(parts["search"]["rows"]) == 8 and len(parts["validation"]["rows"]) == 12
        assert not set(parts["search"]["rows"]) & set(parts["validation"]["rows"])
    assert v["alpha"] == 0.05 and set(v["mde"]) == {"sst2", "agnews"} and v["mde"]["sst2"]["n"] == 12
    # every accepted step passed the rule; the shared set is what the steps accepted
    shared = v["shared"]
    accepted = [s for s in shared["steps"] if s["accepted"]]
    assert all(not s["harmed"] and s["mean_gain"] > 0 for s in accepted)
    assert sorted(map(tuple, shared["heads"])) == (sorted(map(tuple, accepted[-1]["heads"])) if accepted else [])
    if full.config is not None:
        assert full.output.exists() and "validation" in full.output.read_text()
        assert {(int(k), h) for k, hs in full.config.heads.items() for h in hs} == set(map(tuple, shared["heads"]))
    else:
        assert not full.output.exists()
    # per-task profiles: one engine config; tasks without a set named in the report and the file
    eng = ACTEngineConfig.from_any(full.profiles_path)
    assert eng.default is None and set(eng.profiles) == set(full.profiles)
    assert set(eng.profiles) | set(v["tasks_without_profile"]) == {"sst2", "agnews"}
    for t in v["tasks_without_profile"]:
        assert t in full.profiles_path.read_text().split("No profile", 1)[1].splitlines()[0]
    md = full.report_path.with_suffix(".md").read_text()
    assert "## Validation" in md and "## Ranking check" in md and "## Which search-part objective" in md
    assert set(report["objective_comparison"]["objectives"]) == {"margin", "clipped_margin", "accuracy", "worst_task"}
    # per (head, task): with validate_singles every verified head has a score on each task's validation part
    op = report["objective_comparison_per_task"]
    assert set(op["objectives"]) == {"margin", "clipped_margin", "accuracy"}
    assert op["pairs"] == 2 * report["objective_comparison"]["heads"] and "per task" in md
    for key, change in op["validation_accuracy_change"].items():
        task = key.split("/")[1]
        assert -1.0 <= change <= 1.0 and task in ("sst2", "agnews")
    assert report["ranking_check"]["vs_exact_margin"]["n"] == 3
    assert full.heatmap_path.stat().st_size > 1000

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
    assert r2["timing"]["resumed_records"] >= 3
    for key in ("baseline", "selected", "kept", "ranking_check", "validation", "split", "objective_comparison"):
        assert r2[key] == report[key], key
    assert [r.get("estimate") for r in r2["candidates"]] == [r.get("estimate") for r in report["candidates"]]
    state = tmp_path / "part" / "state" / f"{r2['settings_hash']}.jsonl"
    lines = [json.loads(x) for x in state.read_text().splitlines()]
    sets = [(x["part"], tuple(map(tuple, x["heads"]))) for x in lines if x["kind"] == "set"]
    assert len(sets) == len(set(sets)), "a finished score was recomputed after resuming"


def test_shipped_search_outputs_are_consistent(smollm2_path):
    """The shipped search outputs are exactly what the search report decided: a shared set
    (configs/smollm2_searched.yaml) exists only if one passed validation, and then it is the
    report's selected set; the per-task engine config holds exactly the report's accepted
    per-task sets, each valid for the model. A stale set the search did not accept can never
    stay shipped."""
    import re
    from pathlib import Path

    from transformers import AutoConfig

    from act_plugin.config import ACTEngineConfig

    root = Path(__file__).resolve().parents[1]
    search = load_search_config(root / "configs" / "search_smollm2.yaml")
    assert search.output == "configs/smollm2_searched.yaml"
    report = json.loads((root / search.report).read_text())
    assert report["config"]["split"] == "train" and report["validation"], "shipped sets come from a validated search"
    model_cfg = AutoConfig.from_pretrained(smollm2_path)
    shared = root / search.output
    if report["validation"]["shared"]["decision"] is None or not report["validation"]["shared"]["decision"]["accepted"]:
        assert not shared.exists(), f"{shared.name} is shipped, but the search report accepted no shared set"
    else:
        cfg = ACTConfig.from_file(shared)
        heads = cfg.validate_for(model_cfg)
        named = re.search(r"^# Full report: (\S+)$", shared.read_text(), re.M)
        assert named and (root / named.group(1)).resolve() == (root / search.report).resolve()
        assert {int(k): tuple(v) for k, v in report["selected"]["heads"].items()} == heads
        assert cfg.beta == report["beta"]
    profiles = ACTEngineConfig.from_any(root / search.profiles_output)
    accepted = {t: r for t, r in report["validation"]["per_task"].items() if (r.get("decision") or {}).get("accepted")}
    assert sorted(profiles.profiles) == sorted(accepted)
    assert profiles.default is None
    for task, prof in profiles.profiles.items():
        heads = prof.validate_for(model_cfg)
        got = sorted((layer, h) for layer, hs in heads.items() for h in hs)
        assert got == sorted(tuple(x) for x in accepted[task]["heads"]), task
