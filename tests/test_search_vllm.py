"""Head search with exact scores in ONE running vLLM engine (method ``exact`` and
``fast`` with ``verify: vllm``): candidates switched with ``control.set_act_config``, no
restart; the scores agree with the transformers path; the per-task profiles a search writes
load in the engine and each request gets its own profile. One engine for the whole module."""

from __future__ import annotations

import json

import numpy as np
import pytest

from act_plugin import ACTConfig
from act_plugin.search.config import load_search_config

pytestmark = [pytest.mark.engine, pytest.mark.slow]

vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def engine(smollm2_path):
    from act_plugin.vllm.env import apply_cpu_defaults, cpu_engine_kwargs

    apply_cpu_defaults()
    llm = vllm.LLM(model=smollm2_path, seed=0, **cpu_engine_kwargs(max_model_len=1024),
                   additional_config={"act": {"profiles": {}, "default": None}})
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm


def _cfg(tmp_path, shared_data, name, **kw):
    return load_search_config({
        "name": name, "model": "smollm2-135m", "tasks": ["sst2", "trec"], "samples_per_task": 6,
        "validation_per_task": 6, "score": "margin", "seed": 1,
        "data_dir": str(shared_data), "candidates": "12:0-2", "hf": {"threads": 1},
        "output": str(tmp_path / name / "found.yaml"), "run_dir": str(tmp_path / name / "run"),
        "state_dir": str(tmp_path / name / "state"), **kw})


def test_exact_method_in_one_engine(engine, tmp_path, shared_data, smollm2_path):
    from transformers import AutoConfig

    from act_plugin.search.run import run_search
    from act_plugin.vllm import control

    calls = []
    orig = control.set_act_config

    def spy(llm, cfg):
        assert llm is engine
        calls.append(cfg)
        return orig(llm, cfg)

    control.set_act_config = spy
    try:
        res = run_search(_cfg(tmp_path, shared_data, "exact", method="exact"), llm=engine, progress=False, quiet=True)
    finally:
        control.set_act_config = orig
    report = json.loads(res.report_path.read_text())
    assert report["method"] == "exact" and report["exact_backend"] == "vllm"
    rows = report["candidates"]
    assert [(r["layer"], r["head"]) for r in rows] == [(12, 0), (12, 1), (12, 2)]
    assert all("exact" in r and "estimate" not in r for r in rows)
    base = report["baseline"]["margin"]
    kept = {(r["layer"], r["head"]) for r in rows if r["exact"]["margin"] > base}
    assert {tuple(h) for h in report["kept"]} == kept
    # one reconfiguration per candidate (plus combined sets), never a restart
    assert len(calls) >= 3 and all(set(c["profiles"]) == {"search"} for c in calls)
    if res.config is not None:
        ACTConfig.from_file(res.output).validate_for(AutoConfig.from_pretrained(smollm2_path))
    assert report["validation"]["baseline_accuracy"].keys() == {"sst2", "trec"}
    assert "search" in control.get_act_config(engine).profiles


def test_fast_method_verified_in_vllm_agrees_with_hf(engine, tmp_path, shared_data):
    from act_plugin.search.run import run_search

    res_v = run_search(_cfg(tmp_path, shared_data, "fv", fast={"top_k": 2, "verify": "vllm"}, combine=False),
                       llm=engine, progress=False, quiet=True)
    res_h = run_search(_cfg(tmp_path, shared_data, "fh", fast={"top_k": 2, "verify": "hf"}, combine=False),
                       progress=False, quiet=True)
    rv, rh = res_v.report, res_h.report
    assert rv["exact_backend"] == "vllm" and rh["exact_backend"] == "hf"
    # same ranking (it is always the HF first-order pass), same verified heads
    est = [r["estimate"] for r in rv["candidates"]]
    assert est == [r["estimate"] for r in rh["candidates"]]
    ver_v = {(r["layer"], r["head"]) for r in rv["candidates"] if "exact" in r}
    ver_h = {(r["layer"], r["head"]) for r in rh["candidates"] if "exact" in r}
    assert ver_v == ver_h and len(ver_v) == 2
    # vLLM's CPU kernels and transformers agree to ~1e-4 per log-prob, more loosely with ACT
    assert rv["baseline"]["margin"] == pytest.approx(rh["baseline"]["margin"], abs=2e-3)
    for a, b in zip(rv["candidates"], rh["candidates"]):
        if "exact" in a:
            assert a["exact"]["margin"] == pytest.approx(b["exact"]["margin"], abs=3e-3)
            assert np.sign(a["exact"]["delta_margin"]) == np.sign(b["exact"]["delta_margin"]) or \
                abs(a["exact"]["delta_margin"]) < 2e-3


def test_searched_per_task_profiles_route_per_request(engine, smollm2_path):
    """The per-task engine config written by the search (configs/smollm2_searched_profiles.yaml)
    loads in a running engine; one batch mixing requests for different profiles and "off"
    gives each request exactly its own profile's calibration (checked against transformers)."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from act_plugin.config import ACTEngineConfig
    from act_plugin.hf import act_enabled
    from act_plugin.vllm import control

    path = Path(__file__).resolve().parents[1] / "configs" / "smollm2_searched_profiles.yaml"
    shipped = ACTEngineConfig.from_any(path)
    assert shipped.default is None and shipped.profiles, "the search wrote no per-task profile"
    arms = sorted(shipped.profiles)[:2] + ["off"]
    control.set_act_config(engine, path)
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    prompts = ["Review: a gorgeous, witty film.\nSentiment:", "Question: Who wrote Hamlet?\nType:"]
    reqs = [(p, a) for p in prompts for a in arms]
    outs = engine.generate([{"prompt_token_ids": tok(p)["input_ids"]} for p, _ in reqs],
                           [vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=5, extra_args={"act": a})
                            for _, a in reqs], use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="sdpa")
    for (p, arm), out in zip(reqs, outs):
        got = {int(t): float(v.logprob) for t, v in out.outputs[0].logprobs[0].items()}
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            if arm == "off":
                ref = torch.log_softmax(model(ids).logits[0, -1], -1)
            else:
                with act_enabled(model, shipped.profiles[arm]):
                    ref = torch.log_softmax(model(ids).logits[0, -1], -1)
        for t, v in got.items():
            assert v == pytest.approx(float(ref[t]), abs=2e-3), (arm, p)
    # each profile changes the answer distribution (else the check above could not tell arms apart)
    def first_lp(arm):
        return [sorted((int(t), round(float(v.logprob), 4)) for t, v in o.outputs[0].logprobs[0].items())
                for (_, a), o in zip(reqs, outs) if a == arm]

    for arm in arms[:-1]:
        assert first_lp(arm) != first_lp("off"), arm
