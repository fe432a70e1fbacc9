"""The lm-eval model ``act-vllm``: arms, next-token scoring (one real vLLM engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from act_plugin.config import ACTConfigError

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PROFILES = {"act": {"beta": 0.4, "heads": "2-27:0,4"}, "identity": {"beta": 1.0, "heads": "2-27:0,4"}}


@pytest.fixture(scope="module")
def lm(smollm2_path):
    from act_plugin.eval.model import ActVLLM

    model = ActVLLM(pretrained=smollm2_path, dtype="float32", max_model_len=1024, seed=0,
                    act={"profiles": PROFILES, "default": None}, act_profile="off")
    yield model
    core = getattr(model.model.llm_engine, "engine_core", None)
    if core is not None:
        core.shutdown()


@pytest.fixture(scope="module")
def samples(lm, shared_data):
    from act_plugin.tasks import load_samples

    return (load_samples("sst2", "test", shared_data, limit=3, seed=0, tokenizer=lm.tokenizer)
            + load_samples("arc_easy", "test", shared_data, limit=2, seed=0, tokenizer=lm.tokenizer))


def test_registered_with_lm_eval(lm):
    from lm_eval.api.registry import get_model

    from act_plugin.eval.model import ActVLLM
    from act_plugin.vllm.compat import vllm_version

    assert get_model("act-vllm") is ActVLLM and type(lm) is ActVLLM
    assert vllm_version().startswith("0.")


def test_arm_switch(lm):
    from vllm import SamplingParams

    assert lm.arm == "off" and lm.profiles == ["act", "identity"]
    assert lm._with_arm(SamplingParams(max_tokens=1)).extra_args == {"act": "off"}
    with lm.using_arm("act"):
        assert lm._with_arm(SamplingParams(max_tokens=1, extra_args={"x": 1})).extra_args == {"x": 1, "act": "act"}
    assert lm.arm == "off"
    lm.set_arm(None)
    assert lm._with_arm(SamplingParams(max_tokens=1)).extra_args is None
    with pytest.raises(ACTConfigError, match=r"unknown ACT profile 'nope'.*\['act', 'identity'\]"):
        lm.set_arm("nope")
    lm.set_arm("baseline")
    assert lm.arm == "off"
    assert lm.get_model_info()["act_arm"] == "off"


def test_next_token_scoring_matches_direct_computations(lm, samples, smollm2_path):
    """One prefill of the prompt alone == lm-eval's prompt_logprobs over prompt + answer
    (same engine, no ACT) == a plain transformers forward pass."""
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams, TokensPrompt

    lm.set_arm("off")
    pairs, ctxs = [], []
    for s in samples:
        ctx = lm.tok_encode(s.prompt)
        ctxs.append(ctx)
        pairs += [(ctx, t) for t in s.choice_token_ids]
    ours = lm.next_token_logprobs(pairs, disable_tqdm=True)

    outs = lm.model.generate([TokensPrompt(prompt_token_ids=c + [t]) for c, t in pairs],
                             SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, detokenize=False,
                                            extra_args={"act": "off"}), use_tqdm=False)
    direct = [o.prompt_logprobs[-1][t].logprob for o, (_, t) in zip(outs, pairs)]

    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    ref = []
    with torch.no_grad():
        for ctx in ctxs:
            logp = torch.log_softmax(hf(torch.tensor([ctx])).logits[0, -1].float(), -1)
            ref.append(logp)
    i = 0
    for s, ctx, logp in zip(samples, ctxs, ref):
        greedy = int(logp.argmax())
        for t in s.choice_token_ids:
            lp, is_greedy = ours[i]
            assert lp == pytest.approx(direct[i], abs=1e-4)
            assert lp == pytest.approx(float(logp[t]), abs=2e-3)
            assert is_greedy == (t == greedy)
            i += 1


def test_loglikelihood_mixes_next_token_and_full_text(lm, samples):
    ctx = samples[0].prompt
    reqs = [SimpleNamespace(args=(ctx, " negative")), SimpleNamespace(args=(ctx, " positive")),
            SimpleNamespace(args=(ctx, " a rather mixed and complicated feeling"))]
    lm.set_arm("off")
    fast = lm.loglikelihood(reqs, disable_tqdm=True)
    lm.next_token = False
    try:
        full = lm.loglikelihood(reqs, disable_tqdm=True)
    finally:
        lm.next_token = True
    for (a, ga), (b, gb) in zip(fast, full):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert fast[2][0] < fast[0][0]  # the multi-token answer went down lm-eval's usual path


def test_identity_profile_equals_off(lm, samples):
    pairs = [(lm.tok_encode(s.prompt), t) for s in samples for t in s.choice_token_ids]
    with lm.using_arm("off"):
        off = lm.next_token_logprobs(pairs, disable_tqdm=True)
    with lm.using_arm("identity"):
        same = lm.next_token_logprobs(pairs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(off, same):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
