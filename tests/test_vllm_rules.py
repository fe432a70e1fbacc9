"""Calibration rules in the vLLM engine plugin, on the real SmolLM2-135M-Instruct, on CPU.

One engine for the module with an ``act`` profile, two ``first_token`` profiles and a ``spans``
profile (default off). ``first_token`` and ``spans`` against the HF reference path (which runs
the rule's dense formula, tests/test_hf_rules.py) within the ACT parity tolerance of
tests/test_vllm_engine.py, with identical greedy tokens; batches mixing act, first_token, spans
and off rows equal each row run on its own; bad spans are refused for their request alone;
runtime control takes rule profiles.
"""

from __future__ import annotations

import pytest
import torch

from act_plugin import ACTConfig
from act_plugin.vllm.env import apply_cpu_defaults, cpu_engine_kwargs

pytestmark = [pytest.mark.engine, pytest.mark.slow]

vllm = pytest.importorskip("vllm")

PROFILES = {
    "a": {"beta": 0.4, "threshold": 0.1, "heads": "2-27:0,4"},
    "zt": {"rule": "first_token", "scale": 1.5, "heads": "2-27:*"},
    # per layer/head gammas, some below 1, over both KV heads of the GQA groups (9 heads, 3 KV heads)
    "zt_heads": {"rule": "first_token", "scale": {"2-14:*": 1.8, "15-27:0,4,8": 0.4}},
    "emph": {"rule": "spans", "alpha": 0.01, "heads": "8-15:*"},
}
# character spans of each prompt of _prompts() for the spans profile
SPANS = [[[4, 11]], [[8, 30]], [[0, 17], [58, 67]], [[100, 400], [900, 950]]]
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


def _generate(llm, token_prompts, arms, max_tokens=STEPS, logprobs=None, logprob_token_ids=None, spans=None):
    """Greedy outputs; ``token_prompts`` are token id lists, or texts (needed with ``spans``:
    one list of character spans, or None, per prompt)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = []
    for i, arm in enumerate(arms):
        kw = {"logprob_token_ids": list(logprob_token_ids[i])} if logprob_token_ids else {"logprobs": logprobs}
        extra = {} if arm is None else {"act": arm}
        if spans is not None and spans[i] is not None:
            extra["act_spans"] = spans[i]
        params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra, **kw))
    prompts = [t if isinstance(t, str) else TokensPrompt(prompt_token_ids=t) for t in token_prompts]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def _hf_reference(model, ids, cfg, emphasis=None):
    from act_plugin.hf import act_enabled

    with torch.no_grad(), act_enabled(model, cfg) as handle:
        if emphasis is not None:
            handle.set_emphasis(emphasis)
        x = torch.tensor([ids])
        first = torch.log_softmax(model(x).logits[0, -1].float(), -1)
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=STEPS, do_sample=False)
    return first, gen[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def texts(shared_data):
    return _prompts(shared_data)


def _check_parity(engine, prompts, refs, profile, spans=None):
    """Both directions of the top-k (as tests/test_vllm_engine.py's ACT parity) against the HF
    references ``refs`` (first-token log-probs, greedy tokens), and the same greedy tokens for
    STEPS decode steps; the rule must move the log-probabilities."""
    n = len(prompts)
    got = _generate(engine, prompts, [profile] * n, logprobs=TOP_K, spans=spans)
    off = _generate(engine, prompts, ["off"] * n, max_tokens=1, logprobs=TOP_K)
    ref_tops = [first.topk(TOP_K).indices.tolist() for first, _ in refs]
    fetched = _generate(engine, prompts, [profile] * n, max_tokens=1, logprob_token_ids=ref_tops, spans=spans)
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


@pytest.mark.parametrize("profile", ["zt", "zt_heads"])
def test_first_token_parity_with_hf_reference(engine, token_prompts, hf_model, profile):
    refs = [_hf_reference(hf_model, ids, ACTConfig.from_any(PROFILES[profile])) for ids in token_prompts]
    _check_parity(engine, token_prompts, refs, profile)


def test_spans_parity_with_hf_reference(engine, texts, token_prompts, hf_model):
    """Text prompts with character spans: the engine maps them to tokens in its front end; the
    HF path gets the same emphasis from span_marks.emphasis_from_spans."""
    from act_plugin.span_marks import emphasis_from_spans

    tok = engine.get_tokenizer()
    cfg = ACTConfig.from_any(PROFILES["emph"])
    refs = [_hf_reference(hf_model, ids, cfg, emphasis_from_spans(tok, [text], [spans]))
            for ids, text, spans in zip(token_prompts, texts, SPANS)]
    _check_parity(engine, texts, refs, "emph", spans=SPANS)
    # the engine tokenized the texts as the HF path did
    outs = engine.generate(texts, vllm.SamplingParams(max_tokens=1), use_tqdm=False)
    assert [list(o.prompt_token_ids) for o in outs] == token_prompts


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


def test_mixed_batch_with_spans_rows_equals_each_alone(engine, texts):
    """spans (two requests of the profile with different spans on the same prompt, so one group
    with per-request ranges), act, first_token and off rows in one generate call: each row
    equals its arm run on its own."""
    prompts = [texts[0], texts[1], texts[2], texts[3], texts[1]]
    arms = ["emph", "a", "off", "zt", "emph"]
    spans = [SPANS[0], None, None, None, [[30, 50]]]
    batched = _generate(engine, prompts, arms, logprobs=5, spans=spans)
    for i, (prompt, arm, row_spans, b) in enumerate(zip(prompts, arms, spans, batched)):
        [alone] = _generate(engine, [prompt], [arm], logprobs=5, spans=[row_spans])
        assert list(b.token_ids) == list(alone.token_ids), f"row {i} ({arm}): tokens differ from the run alone"
        for t, lp in alone.logprobs[0].items():
            assert abs(b.logprobs[0][t].logprob - lp.logprob) < 1e-4, f"row {i} ({arm}), token {t}"
    [other] = _generate(engine, [texts[1]], ["emph"], logprobs=5, spans=[SPANS[1]])
    lps = lambda out: {t: round(lp.logprob, 4) for t, lp in out.logprobs[0].items()}  # noqa: E731
    assert lps(other) != lps(batched[4])  # same prompt and profile, other spans: another result


# What a refused request raises offline: the checks made when a request arrives run as vLLM's
# validate_params, whose ValueError vLLM re-raises as VLLMValidationError (HTTP 400); the span
# mapping after tokenization raises ValueError (HTTP 400 as well).
REFUSED = (ValueError, pytest.importorskip("vllm.exceptions").VLLMValidationError)


@pytest.mark.parametrize("prompt_kind, extra, message", [
    ("text", {"act": "emph", "act_spans": [[0, 10_000]]}, "'act_spans': span \\[0, 10000\\]: past the end"),
    ("text", {"act": "emph", "act_spans": [[0, 10], [5, 12]]}, "'act_spans': spans .* overlap"),
    ("ids", {"act": "emph", "act_spans": [[0, 10]]}, "'act_spans' are character ranges .* no prompt text"),
    ("text", {"act": "emph"}, "uses rule 'spans': the request must mark .*'act_spans'"),
    ("text", {"act": "a", "act_spans": [[0, 10]]}, "runs profile 'a' \\(rule 'act'\\)"),
    ("text", {"act": "emph", "act_spans": [[0, 10]], "_act_span_tokens": [[0, 3]]}, "a request cannot give it"),
])
def test_bad_spans_are_refused_and_the_engine_keeps_serving(engine, texts, token_prompts, prompt_kind, extra,
                                                            message):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = texts[1] if prompt_kind == "text" else TokensPrompt(prompt_token_ids=token_prompts[1])
    with pytest.raises(REFUSED, match=message):
        engine.generate([prompt], SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)
    [ok] = _generate(engine, [texts[0]], ["emph"], spans=[SPANS[0]], max_tokens=2)
    assert len(ok.token_ids) == 2


def test_runtime_control_takes_rule_profiles(engine, texts, token_prompts):
    from act_plugin.vllm import control

    ref = _generate(engine, token_prompts[:2], ["zt"] * 2)
    ref_spans = _generate(engine, texts[:2], ["emph"] * 2, spans=SPANS[:2])
    try:
        control.set_act_config(engine, {"profiles": {"z2": PROFILES["zt"], "e2": PROFILES["emph"]}, "default": "z2"})
        assert set(control.get_act_config(engine).profiles) == {"z2", "e2"}
        again = _generate(engine, token_prompts[:2], [None] * 2)  # the new default: first_token
        assert [list(o.token_ids) for o in again] == [list(o.token_ids) for o in ref]
        spans_again = _generate(engine, texts[:2], ["e2"] * 2, spans=SPANS[:2])  # a spans profile added at runtime
        assert [list(o.token_ids) for o in spans_again] == [list(o.token_ids) for o in ref_spans]
        with pytest.raises(REFUSED, match="unknown ACT profile 'emph'"):
            _generate(engine, texts[:1], ["emph"], spans=SPANS[:1])
    finally:
        control.set_act_config(engine, {"profiles": PROFILES, "default": None})
