"""The vLLM engine plugin on the real SmolLM2-135M-Instruct model, on CPU.

One engine for the whole module (profiles ``a`` and ``b``, default off), reconfigured at
runtime where a test needs it; vanilla references come from subprocesses that start their
own engine (with the plugin disabled, and with the plugin loaded but ACT unconfigured).

Tolerances (float32 weights, float32 KV cache): vLLM's CPU kernels and transformers sum in
different orders, so next-token log-probabilities agree to ~1e-4 between them without ACT;
with ACT we allow 2e-3 (a sink decision sits on a threshold, and errors compound over 30
layers) and require identical greedy tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from act_plugin import ACTConfig, ACTConfigError
from act_plugin.vllm.env import apply_cpu_defaults, cpu_engine_kwargs

pytestmark = [pytest.mark.engine, pytest.mark.slow]

vllm = pytest.importorskip("vllm")

HEADS_A = "2-27:0,4"  # 2 of 9 heads in layers 2..27: the paper's density (~1 in 5)
HEADS_B = {str(layer): [(layer * 5 + 1) % 9, (layer * 7 + 3) % 9] for layer in range(3, 30, 2)}
PROFILES = {
    "a": {"beta": 0.4, "threshold": 0.1, "heads": HEADS_A},
    "b": {"beta": 0.2, "threshold": 0.05, "heads": HEADS_B},
}
GREEDY_STEPS = 32
TOP_K = 20  # first-step log-probabilities compared (vLLM's default max_logprobs)
LOGPROB_TOL = 2e-3
FIRST_STEP: dict = {}  # the worker's profiling snapshot of the engine's first request


def _prompts(shared_data) -> list[str]:
    wiki = (shared_data / "wikitext-2" / "valid.txt").read_text().split("\n")
    long_text = " ".join(line.strip() for line in wiki[:60] if line.strip())[:2400]
    return [
        "The capital of France is",
        "Review: an utterly charming, funny film.\nSentiment:",
        "Q: What is 2 + 2?\nA: 4.\nQ: What is the colour of the sky?\nA: Blue.\nQ: Name a fruit.\nA:",
        long_text,
    ]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    global FIRST_STEP
    apply_cpu_defaults()
    llm = vllm.LLM(
        model=smollm2_path,
        seed=0,
        **cpu_engine_kwargs(max_model_len=1024),
        additional_config={"act": {"profiles": PROFILES, "default": None}},
    )
    # What the engine's very first step computed (see test_the_engines_first_step_...).
    llm.collective_rpc("act_profiling", args=(True,))
    try:
        _run(llm, [list(range(100, 140))], "a", max_tokens=1)
    finally:
        FIRST_STEP = llm.collective_rpc("act_profiling", args=(False,))[0]
    yield llm
    del llm


@pytest.fixture(scope="module")
def token_prompts(engine, shared_data):
    tok = engine.get_tokenizer()
    return [tok(p)["input_ids"] for p in _prompts(shared_data)]


def _run(llm, token_prompts, arm, max_tokens=GREEDY_STEPS, logprobs=20, with_off_rows=False):
    """Greedy tokens and first-step top log-probabilities of each prompt under ``arm``;
    ``with_off_rows``: each prompt also sent with ACT off in the same call, so every step mixes
    ACT and ACT-off rows (the native kernel and the separate calibration pass)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {} if arm is None else {"act": arm}
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs, extra_args=extra)
    prompts = [TokensPrompt(prompt_token_ids=t) for t in token_prompts]
    if with_off_rows:
        off = SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args={"act": "off"})
        outs = llm.generate(prompts + prompts, [sp] * len(prompts) + [off] * len(prompts),
                            use_tqdm=False)[: len(prompts)]
    else:
        outs = llm.generate(prompts, sp, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        first = {tid: lp.logprob for tid, lp in c.logprobs[0].items()}
        result.append({"tokens": list(c.token_ids), "first_logprobs": first})
    return result


def _engine_logprobs_of(llm, token_prompts, arm, token_ids, with_off_rows=False):
    """The engine's first-step log-probability of each of ``token_ids[i]`` (one list per
    prompt) after prompt ``i``, whether or not it is in the engine's own top-k
    (``with_off_rows``: as in :func:`_run`)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {} if arm is None else {"act": arm}
    params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(ids), extra_args=extra)
              for ids in token_ids]
    prompts = [TokensPrompt(prompt_token_ids=t) for t in token_prompts]
    if with_off_rows:
        off = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"act": "off"})
        params, prompts = params + [off] * len(prompts), prompts + prompts
    outs = llm.generate(prompts, params, use_tqdm=False)[: len(token_prompts)]
    return [{tid: lp.logprob for tid, lp in o.outputs[0].logprobs[0].items()} for o in outs]


def _assert_same(got, ref, tol=1e-4):
    """Same greedy tokens; first-step log-probabilities within ``tol`` for every token of the
    reference's top-k. A reference token missing from ``got``'s top-k fails, unless it sits at
    the top-k boundary (within ``tol`` of ``got``'s last kept log-probability, where equal
    values may swap ranks). Calibrated runs are not bitwise reproducible run to run on CPU
    (float32 GEMMs may pick alignment-dependent kernels), so repeated calibrated runs are
    compared to 1e-4, not bitwise."""
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g["tokens"] == r["tokens"], f"prompt {i}: greedy tokens differ"
        kept = g["first_logprobs"]
        for tid, lp in r["first_logprobs"].items():
            if tid in kept:
                assert abs(kept[tid] - lp) < tol, f"prompt {i}, token {tid}: {kept[tid]} vs {lp}"
            else:
                assert lp < min(kept.values()) + tol, (
                    f"prompt {i}: token {tid} (log-prob {lp}) of the reference's top-k is missing from the "
                    f"run's top-k (lowest kept {min(kept.values())})"
                )


# ----------------------------------------------------------------------------- HF parity
@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def _hf_reference(model, ids, cfg, steps=GREEDY_STEPS):
    from act_plugin.hf import act_enabled

    with torch.no_grad(), act_enabled(model, cfg):
        x = torch.tensor([ids])
        first = torch.log_softmax(model(x).logits[0, -1].float(), -1)
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, do_sample=False)
    return first, gen[0, len(ids) :].tolist()


def _assert_parity(engine_top, engine_of_ref_top, ref_first, ref_top, label):
    """Both directions: each token of the engine's top-k against the reference's value, and
    each token of the reference's top-k against the engine's value (fetched for exactly those
    tokens, so a token the engine ranks elsewhere, or lacks, cannot be skipped)."""
    diffs = {tid: abs(lp - ref_first[tid].item()) for tid, lp in engine_top.items()}
    for tid in ref_top:
        assert tid in engine_of_ref_top, f"{label}: no engine log-prob for the reference's top-k token {tid}"
        diffs[tid] = max(diffs.get(tid, 0.0), abs(engine_of_ref_top[tid] - ref_first[tid].item()))
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < LOGPROB_TOL, f"{label}: max |dlogprob| {diffs[worst]} (token {worst})"


# "whole": every row of every step runs the arm, so calibrated layers are computed whole by
# ACT's kernels; "separate_pass": ACT-off rows share every step, so the native kernel runs and
# the separate calibration pass overwrites the calibrated heads.
@pytest.mark.parametrize("profile,path", [("a", "whole"), ("b", "whole"), ("a", "separate_pass")])
def test_parity_with_hf_reference(engine, token_prompts, hf_model, profile, path):
    mixed = path == "separate_pass"
    engine.collective_rpc("act_profiling", args=(True,))
    try:
        got = _run(engine, token_prompts, profile, with_off_rows=mixed)
    finally:
        snap = engine.collective_rpc("act_profiling", args=(False,))[0]
    ran = {"whole": "prefill_whole_layer", "separate_pass": "prefill"}[path]
    assert snap.get(ran, {}).get("calls", 0) >= 13, snap  # the path under test computed the prefill
    if path == "whole":  # no separate pass; with off rows the scheduler may still cut an ACT-only step
        assert "prefill" not in snap, snap
    cfg = ACTConfig.from_any(PROFILES[profile])
    refs = [_hf_reference(hf_model, ids, cfg) for ids in token_prompts]
    ref_tops = [ref_first.topk(TOP_K).indices.tolist() for ref_first, _ in refs]
    engine_of_ref_tops = _engine_logprobs_of(engine, token_prompts, profile, ref_tops, with_off_rows=mixed)
    for ids, out, (ref_first, ref_tokens), ref_top, fetched in zip(token_prompts, got, refs, ref_tops,
                                                                    engine_of_ref_tops):
        label = f"profile {profile} ({path}), prompt of {len(ids)} tokens"
        _assert_parity(out["first_logprobs"], fetched, ref_first, ref_top, label)
        assert out["tokens"] == ref_tokens, f"{label}: greedy tokens differ from the HF reference"


def test_steps_of_act_rows_only_compute_calibrated_layers_whole(engine, token_prompts):
    """The parity above runs through the whole-layer kernels: in steps whose rows all run an
    ACT arm, calibrated layers skip the native kernel for prefill steps and decode steps alike,
    and no separate calibration pass runs."""
    engine.collective_rpc("act_profiling", args=(True,))
    try:
        _run(engine, token_prompts, "a", max_tokens=4)
    finally:
        snap = engine.collective_rpc("act_profiling", args=(False,))[0]
    assert snap.get("prefill_whole_layer", {}).get("calls", 0) >= 26, snap  # layers 2-27, at least one step
    assert snap.get("decode_whole_layer", {}).get("calls", 0) >= 26, snap
    assert "prefill" not in snap and "decode" not in snap, snap  # no separate pass ran a kernel


def test_the_engines_first_step_is_computed_like_every_later_one(engine):
    """The engine's first step (CPU_ATTN's cache-layout check runs in it) takes the whole-layer
    path like any later ACT-only step: were it to run the native kernel and the separate pass,
    a request's result would depend on whether it came first (a resumed eval's first piece
    would differ in the last bits from the uninterrupted run's)."""
    assert FIRST_STEP.get("prefill_whole_layer", {}).get("calls", 0) == 26, FIRST_STEP  # layers 2-27
    assert "prefill" not in FIRST_STEP, FIRST_STEP  # no separate pass
    # the native kernel ran in one layer ACT calibrates: 29, which only profile 'b' calibrates
    assert FIRST_STEP.get("prefill_native_layer", {}).get("calls", 0) == 1, FIRST_STEP


def test_parity_check_fails_on_a_shifted_token():
    """The parity check itself: a reference top-k token the engine puts elsewhere fails it,
    even when every token of the engine's own top-k matches."""
    ref_first = torch.log_softmax(torch.tensor([3.0, 2.0, 1.0, 0.0]), -1)
    engine_top = {0: ref_first[0].item(), 1: ref_first[1].item()}
    ref_top = [0, 1, 2]
    _assert_parity(engine_top, {t: ref_first[t].item() for t in ref_top}, ref_first, ref_top, "same")
    shifted = {0: ref_first[0].item(), 1: ref_first[1].item(), 2: ref_first[2].item() - 0.5}
    with pytest.raises(AssertionError, match="token 2"):
        _assert_parity(engine_top, shifted, ref_first, ref_top, "shifted")
    with pytest.raises(AssertionError, match="no engine log-prob"):
        _assert_parity(engine_top, {0: ref_first[0].item()}, ref_first, ref_top, "missing")


def test_run_comparison_fails_on_a_missing_token():
    """``_assert_same``: a token of the reference's top-k missing from the run's fails, unless
    it sits at the top-k boundary."""
    ref = [{"tokens": [5], "first_logprobs": {5: -0.1, 6: -2.0, 7: -3.0}}]
    _assert_same([{"tokens": [5], "first_logprobs": {5: -0.1, 6: -2.0, 7: -3.0}}], ref)
    _assert_same([{"tokens": [5], "first_logprobs": {5: -0.1, 6: -2.0, 8: -3.0}}], ref)  # 7 and 8 tie
    with pytest.raises(AssertionError, match="token 6"):
        _assert_same([{"tokens": [5], "first_logprobs": {5: -0.1, 8: -1.5, 7: -3.0}}], ref)


def test_calibration_changes_outputs(engine, token_prompts):
    off = _run(engine, token_prompts, "off", max_tokens=1)
    on = _run(engine, token_prompts, "a", max_tokens=1)
    moved = max(
        abs(lp - o["first_logprobs"].get(t, lp)) for o, c in zip(off, on) for t, lp in c["first_logprobs"].items()
    )
    assert moved > 1e-3, "profile 'a' did not change any log-probability: calibration is not running"


# ----------------------------------------------------------------------------- vanilla equality
_VANILLA = textwrap.dedent(
    """
    import json, sys
    from act_plugin.vllm.env import apply_cpu_defaults, cpu_engine_kwargs
    if __name__ == "__main__":
        apply_cpu_defaults()
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        args = json.load(open(sys.argv[1]))
        llm = LLM(model=args["model"], seed=0, **cpu_engine_kwargs(max_model_len=1024))
        sp = SamplingParams(max_tokens=args["steps"], temperature=0.0, logprobs=20)
        outs = llm.generate([TokensPrompt(prompt_token_ids=t) for t in args["prompts"]], sp, use_tqdm=False)
        res = [{"tokens": list(o.outputs[0].token_ids),
                "first_logprobs": {str(k): v.logprob for k, v in o.outputs[0].logprobs[0].items()}} for o in outs]
        json.dump(res, open(sys.argv[2], "w"))
    """
)


def _vanilla_run(tmp_path, smollm2_path, token_prompts, plugins_env):
    script = tmp_path / "vanilla.py"
    script.write_text(_VANILLA)
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"model": smollm2_path, "steps": GREEDY_STEPS, "prompts": token_prompts}))
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k not in ("ACT_CONFIG", "VLLM_PLUGINS")}
    env.update(plugins_env)
    proc = subprocess.run([sys.executable, str(script), str(args), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [
        {"tokens": r["tokens"], "first_logprobs": {int(k): v for k, v in r["first_logprobs"].items()}}
        for r in json.loads(out.read_text())
    ]


def test_plugin_installed_but_act_off_is_bitwise_vanilla(engine, token_prompts, smollm2_path, tmp_path_factory):
    # Reference: vLLM with no general plugins at all.
    vanilla = _vanilla_run(tmp_path_factory.mktemp("noplugin"), smollm2_path, token_prompts, {"VLLM_PLUGINS": ""})
    # Plugin loaded, no ACT configuration: must be exactly vanilla.
    inert = _vanilla_run(tmp_path_factory.mktemp("inert"), smollm2_path, token_prompts, {})
    assert inert == vanilla
    # And on the ACT engine, a request that turns ACT off is exactly vanilla too.
    assert _run(engine, token_prompts, "off") == vanilla


# ----------------------------------------------------------------------------- batching
def test_batch_invariance(engine, token_prompts):
    target = token_prompts[2]
    alone = _run(engine, [target], "a")[0]
    others = [token_prompts[3], token_prompts[0], token_prompts[1]]
    batched = _run(engine, [others[0], target, others[1], others[2]], "a")[1]
    _assert_same([batched], [alone])


def test_mixed_arms_in_one_batch(engine, token_prompts):
    """Per-request arms in one batch equal the same arms run on their own."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    arms = ["a", "off", "b", "a"]
    sps = [SamplingParams(max_tokens=8, temperature=0.0, extra_args={"act": a}) for a in arms]
    outs = engine.generate([TokensPrompt(prompt_token_ids=t) for t in token_prompts], sps, use_tqdm=False)
    for ids, arm, o in zip(token_prompts, arms, outs):
        assert list(o.outputs[0].token_ids) == _run(engine, [ids], arm, max_tokens=8)[0]["tokens"]


# ----------------------------------------------------------------------------- runtime control
def test_runtime_reconfiguration_matches_startup_config(engine, token_prompts):
    from act_plugin.vllm import control

    before = control.get_act_config(engine)
    assert set(before.profiles) == {"a", "b"} and before.default is None
    ref_b = _run(engine, token_prompts, "b", max_tokens=8)
    try:
        new = control.set_act_config(engine, {"profiles": {"x": PROFILES["b"]}, "default": "x"})
        assert control.get_act_config(engine) == new
        # No per-request value: the new default applies, equal to 'b' at startup.
        _assert_same(_run(engine, token_prompts, None, max_tokens=8), ref_b)
        # Unknown profile names are now rejected per request.
        from vllm.exceptions import VLLMValidationError

        with pytest.raises((ValueError, VLLMValidationError), match="unknown ACT profile 'a'"):
            _run(engine, token_prompts[:1], "a", max_tokens=1)
    finally:
        control.set_act_config(engine, {"profiles": PROFILES, "default": None})
    _assert_same(_run(engine, token_prompts, "b", max_tokens=8), ref_b)


def test_runtime_reconfiguration_rejects_bad_config(engine):
    from act_plugin.vllm import control

    with pytest.raises(ACTConfigError, match="layer 30"):
        control.set_act_config(engine, {"heads": {"30": [0]}})
    assert set(control.get_act_config(engine).profiles) == {"a", "b"}


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "value, message",
    [("nope", "unknown ACT profile 'nope'"), (3, "must be a profile name"), ({"beta": 1}, "must be a profile name")],
)
def test_bad_request_value_is_rejected_alone(engine, token_prompts, value, message):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises((ValueError, VLLMValidationError), match=message):
        _run(engine, token_prompts[:1], value, max_tokens=1)
    # The engine is still serving.
    assert len(_run(engine, token_prompts[:1], "a", max_tokens=2)[0]["tokens"]) == 2


@pytest.mark.parametrize(
    "act, message",
    [
        ({"heads": {"30": [0]}}, r"names layer 30, but .* has 30 layers \(0..29\) with 9 query heads"),
        ({"heads": {"3": [9]}}, r"names head\(s\) \[9\] of layer 3, but .* 9 query heads each \(0..8\)"),
        ({"beta": 2.0, "heads": {"3": [1]}}, r"beta must be in \[0, 1\]"),
        ({"profiles": {"p": {"heads": {"1": [0]}}}, "default": "q"}, "default profile 'q' is not among"),
        ({"bogus": 1}, "unknown key 'bogus'"),
    ],
)
def test_bad_engine_config_fails_fast_with_clear_message(smollm2_path, act, message):
    apply_cpu_defaults()
    with pytest.raises(Exception, match=message):
        vllm.LLM(model=smollm2_path, **cpu_engine_kwargs(max_model_len=512), additional_config={"act": act})


def test_fp8_kv_cache_is_refused_at_engine_start(smollm2_path):
    apply_cpu_defaults()
    with pytest.raises(Exception, match=r"ACT does not support kv_cache_dtype='fp8'"):
        vllm.LLM(
            model=smollm2_path, kv_cache_dtype="fp8", **cpu_engine_kwargs(max_model_len=512),
            additional_config={"act": {"heads": {"3": [1]}}},
        )


def test_bad_whole_prefill_setting_refuses_the_engine(monkeypatch):
    from types import SimpleNamespace

    from act_plugin.vllm.config_hook import ACTEngineError, _check_supported

    cfg = SimpleNamespace(
        model_config=SimpleNamespace(use_mla=False), cache_config=SimpleNamespace(cache_dtype="auto"),
        speculative_config=None, parallel_config=SimpleNamespace(pipeline_parallel_size=1),
        use_v2_model_runner=False,
    )
    for ok in ("0", "1", ""):
        monkeypatch.setenv("ACT_WHOLE_PREFILL", ok)
        _check_supported(cfg)
    monkeypatch.setenv("ACT_WHOLE_PREFILL", "true")
    with pytest.raises(ACTEngineError, match=r"ACT_WHOLE_PREFILL='true': expected '1' .* or '0'"):
        _check_supported(cfg)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_mla": True}, "does not support MLA"),
        ({"cache_dtype": "fp8_e4m3"}, "kv_cache_dtype='fp8_e4m3'"),
        ({"speculative_config": object()}, "speculative decoding"),
        ({"pipeline_parallel_size": 2, "use_v2_model_runner": True}, "pipeline parallelism.*V1 model runner"),
    ],
)
def test_unsupported_engine_settings_are_named(change, message):
    from types import SimpleNamespace

    from act_plugin.vllm.config_hook import ACTEngineError, _check_supported

    cfg = SimpleNamespace(
        model_config=SimpleNamespace(use_mla=change.get("use_mla", False)),
        cache_config=SimpleNamespace(cache_dtype=change.get("cache_dtype", "auto")),
        speculative_config=change.get("speculative_config"),
        parallel_config=SimpleNamespace(pipeline_parallel_size=change.get("pipeline_parallel_size", 1)),
        use_v2_model_runner=change.get("use_v2_model_runner", False),
    )
    with pytest.raises(ACTEngineError, match=message):
        _check_supported(cfg)


def test_engine_is_set_up_for_per_call_statistics(engine):
    cfg = engine.llm_engine.vllm_config
    assert cfg.cache_config.enable_prefix_caching is False
    assert cfg.scheduler_config.enable_chunked_prefill is False
    assert cfg.scheduler_config.max_num_batched_tokens >= cfg.model_config.max_model_len


def test_same_prompt_same_answer_every_time(engine, token_prompts):
    """No cache state can change a calibrated answer (prefix caching is off under ACT)."""
    first = _run(engine, token_prompts[1:3], "a", max_tokens=8)
    for _ in range(3):
        _assert_same(_run(engine, token_prompts[1:3], "a", max_tokens=8), first)


def test_act_status_lists_exactly_the_configured_layers_and_heads(engine):
    """get_act_status reads back from the workers what they run, per configured layer."""
    from act_plugin.vllm import control

    status = control.get_act_status(engine)
    assert status["config"]["profiles"].keys() == PROFILES.keys() and status["config"]["default"] is None
    assert status["runner"] == "v1"  # vLLM's V1 runner on CPU (Model Runner V2 needs Triton)
    expected_layers = sorted(set(range(2, 28)) | {int(k) for k in HEADS_B})
    assert [row["layer"] for row in status["layers"]] == expected_layers
    for row in status["layers"]:
        assert row["calibrator"] and row["backend"] == "CPU_ATTN" and row["attn_type"] == "decoder"
        assert not row["unsupported"]
        want = {}
        if 2 <= row["layer"] <= 27:
            want["a"] = [0, 4]
        if str(row["layer"]) in HEADS_B:
            want["b"] = sorted(set(HEADS_B[str(row["layer"])]))
        assert row["local_heads"] == want, row
    assert status["preemptions"] == 0 and status["unroutable"] == 0


# ----------------------------------------------------------------------------- one act vocabulary
def test_request_keywords_and_runtime_off_read_one_vocabulary(engine, token_prompts):
    """Every off word runs uncalibrated and every default word the default profile, on the real
    engine; runtime control reads an off word as "no profile" (every request uncalibrated)."""
    from vllm.exceptions import VLLMValidationError

    from act_plugin.vllm import control

    off = _run(engine, token_prompts, "off", max_tokens=4)
    try:
        control.set_act_config(engine, {"profiles": PROFILES, "default": "a"})  # a default that calibrates
        default = _run(engine, token_prompts, None, max_tokens=4)
        moved = max(abs(lp - o["first_logprobs"].get(t, lp))
                    for o, d in zip(off, default) for t, lp in d["first_logprobs"].items())
        assert moved > 1e-3, "the default profile must differ from off for this test to tell them apart"
        for word in ("baseline", "FALSE", " None ", 0, False):
            _assert_same(_run(engine, token_prompts, word, max_tokens=4), off)
        for word in ("on", "TRUE", " Default ", 1, True):
            _assert_same(_run(engine, token_prompts, word, max_tokens=4), default)
        got = control.set_act_config(engine, "off")
        assert got.profiles == {} and got.default is None and control.get_act_config(engine) == got
        _assert_same(_run(engine, token_prompts, None, max_tokens=4), off)
        with pytest.raises((ValueError, VLLMValidationError), match="unknown ACT profile 'a'"):
            _run(engine, token_prompts[:1], "a", max_tokens=1)
        with pytest.raises(ACTConfigError, match="calibrates nothing"):
            control.set_act_config(engine, {"beta": 1.0, "heads": HEADS_A})
    finally:
        control.set_act_config(engine, {"profiles": PROFILES, "default": None})
