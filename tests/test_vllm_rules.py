"""Calibration rules in the vLLM engine plugin, on the real SmolLM2-135M-Instruct, on CPU.

One engine for the module with an ``act`` profile and two ``first_token`` profiles (default
off). ``first_token`` against the HF reference path (which runs the rule's dense formula,
tests/test_hf_rules.py) within the ACT parity tolerance of tests/test_vllm_engine.py, with
identical greedy tokens; a batch mixing act, first_token and off rows equals each run on its
own; ``spans`` (not served by the engine yet) is refused at start and by runtime control.
"""

from __future__ import annotations

import pytest
import torch

from act_plugin import ACTConfig, ACTConfigError
from act_plugin.vllm.env import apply_cpu_defaults, cpu_engine_kwargs

pytestmark = [pytest.mark.engine, pytest.mark.slow]

vllm = pytest.importorskip("vllm")

PROFILES = {
    "a": {"beta": 0.4, "threshold": 0.1, "heads": "2-27:0,4"},
    "zt": {"rule": "first_token", "scale": 1.5, "heads": "2-27:*"},
    # per layer/head gammas, some below 1, over both KV heads of the GQA groups (9 heads, 3 KV heads)
    "zt_heads": {"rule": "first_token", "scale": {"2-14:*": 1.8, "15-27:0,4,8": 0.4}},
}
STEPS = 8
TOP_K = 20
LOGPROB_TOL = 2e-3


def _prompts(shared_data) -> list[str]:
    wiki = (shared_data / "wikitext-2" / "valid.txt").read_text().split("\n")
    long_text = " ".join(line.strip() for line in wiki[:60] if line.strip())[:2000]
    return [
        "The capital of France is",
        "Review: an utterly charming, funny film.\nSentiment:",
        "Q: What is 2 + 2?\nA: 4.\nQ: What is the colour of the sky?\nA: Blue.\nQ: Name a fruit.\nA:",
        long_text,
    ]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    apply_cpu_defaults()
    llm = vllm.LLM(model=smollm2_path, seed=0, **cpu_engine_kwargs(max_model_len=1024),
                   additional_config={"act": {"profiles": PROFILES, "default": None}})
    yield llm
    del llm


@pytest.fixture(scope="module")
def token_prompts(engine, shared_data):
    tok = engine.get_tokenizer()
    return [tok(p)["input_ids"] for p in _prompts(shared_data)]


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="sdpa").eval()


def _generate(llm, token_prompts, arms, max_tokens=STEPS, logprobs=None, logprob_token_ids=None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = []
    for i, arm in enumerate(arms):
        kw = {"logprob_token_ids": list(logprob_token_ids[i])} if logprob_token_ids else {"logprobs": logprobs}
        extra = {} if arm is None else {"act": arm}
        params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra, **kw))
    outs = llm.generate([TokensPrompt(prompt_token_ids=t) for t in token_prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def _hf_reference(model, ids, cfg):
    from act_plugin.hf import act_enabled

    with torch.no_grad(), act_enabled(model, cfg):
        x = torch.tensor([ids])
        first = torch.log_softmax(model(x).logits[0, -1].float(), -1)
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=STEPS, do_sample=False)
    return first, gen[0, len(ids):].tolist()


@pytest.mark.parametrize("profile", ["zt", "zt_heads"])
def test_first_token_parity_with_hf_reference(engine, token_prompts, hf_model, profile):
    """Both directions of the top-k (as tests/test_vllm_engine.py's ACT parity), and the same
    greedy tokens for STEPS decode steps."""
    n = len(token_prompts)
    got = _generate(engine, token_prompts, [profile] * n, logprobs=TOP_K)
    off = _generate(engine, token_prompts, ["off"] * n, max_tokens=1, logprobs=TOP_K)
    refs = [_hf_reference(hf_model, ids, ACTConfig.from_any(PROFILES[profile])) for ids in token_prompts]
    ref_tops = [first.topk(TOP_K).indices.tolist() for first, _ in refs]
    fetched = _generate(engine, token_prompts, [profile] * n, max_tokens=1, logprob_token_ids=ref_tops)
    moved = 0.0
    for i, (out, (ref_first, ref_tokens), top, f, o) in enumerate(zip(got, refs, ref_tops, fetched, off)):
        engine_top = {t: lp.logprob for t, lp in out.logprobs[0].items()}
        engine_of_ref = {t: lp.logprob for t, lp in f.logprobs[0].items()}
        diffs = {t: abs(lp - ref_first[t].item()) for t, lp in engine_top.items()}
        for t in top:
            assert t in engine_of_ref, f"prompt {i}: no engine log-prob for the reference's top-k token {t}"
            diffs[t] = max(diffs.get(t, 0.0), abs(engine_of_ref[t] - ref_first[t].item()))
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] < LOGPROB_TOL, f"{profile}, prompt {i}: max |dlogprob| {diffs[worst]} (token {worst})"
        assert list(out.token_ids) == ref_tokens, f"{profile}, prompt {i}: greedy tokens differ from the HF path"
        base = {t: lp.logprob for t, lp in o.logprobs[0].items()}
        moved = max(moved, max(abs(lp - base[t]) for t, lp in engine_top.items() if t in base))
    assert moved > 1e-2, f"profile {profile} did not change the log-probabilities: the rule is not running"


def test_mixed_rules_in_one_batch_equal_each_alone(engine, token_prompts):
    """act, first_token (two profiles) and off rows in one generate call: each row equals its
    arm run on its own (prefill and decode steps with mixed groups)."""
    arms = ["zt", "a", "off", "zt_heads"]
    batched = _generate(engine, token_prompts, arms, logprobs=5)
    for i, (ids, arm, b) in enumerate(zip(token_prompts, arms, batched)):
        [alone] = _generate(engine, [ids], [arm], logprobs=5)
        assert list(b.token_ids) == list(alone.token_ids), f"row {i} ({arm}): tokens differ from the run alone"
        for t, lp in alone.logprobs[0].items():
            assert abs(b.logprobs[0][t].logprob - lp.logprob) < 1e-4, f"row {i} ({arm}), token {t}"


def test_runtime_control_takes_first_token_and_refuses_spans(engine, token_prompts):
    from act_plugin.vllm import control

    ref = _generate(engine, token_prompts[:2], ["zt"] * 2)
    spans = {"profiles": {**PROFILES, "emph": {"rule": "spans", "alpha": 0.01, "heads": "8-15:*"}}, "default": None}
    with pytest.raises(Exception, match="profile 'emph' uses rule 'spans'.*HF path only"):
        control.set_act_config(engine, spans)
    assert set(control.get_act_config(engine).profiles) == set(PROFILES)  # nothing changed
    try:
        control.set_act_config(engine, {"profiles": {"z2": PROFILES["zt"]}, "default": "z2"})
        again = _generate(engine, token_prompts[:2], [None] * 2)  # the new default: first_token
        assert [list(o.token_ids) for o in again] == [list(o.token_ids) for o in ref]
    finally:
        control.set_act_config(engine, {"profiles": PROFILES, "default": None})


def test_spans_profile_is_refused_at_engine_start(smollm2_path):
    apply_cpu_defaults()
    with pytest.raises((ACTConfigError, Exception), match="rule 'spans'.*HF path only"):
        vllm.LLM(model=smollm2_path, **cpu_engine_kwargs(max_model_len=512),
                 additional_config={"act": {"rule": "spans", "heads": "2-5:*"}})
