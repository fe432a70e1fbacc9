"""ACT in vLLM on a CUDA GPU: both model runners, every wrapped backend, bf16 parity with the
transformers reference, mixed arms in one batch, and the start-up refusal of a backend the
plugin does not wrap. Each case starts its engine in a subprocess (a fresh CUDA context and
a clean backend cache per runner/backend).

Tolerances (bf16 weights and KV cache): vLLM's kernels and transformers' SDPA differ by a
few bf16 ulps per layer without ACT; we require the first-token log-probabilities of the
calibrated arm within 0.15 of the bf16 HF reference and the same top-1 token, and the
calibrated arm must move some log-probability by more than 0.01 (calibration is running).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PROFILES = {"a": {"beta": 0.4, "heads": "2-27:0,4"}, "b": {"beta": 0.2, "threshold": 0.05, "heads": "3-29:1"}}
PROMPTS = [
    "The capital of France is",
    "Review: an utterly charming, funny film.\nSentiment:",
    "Q: What is 2 + 2?\nA: 4.\nQ: What is the colour of the sky?\nA: Blue.\nQ: Name a fruit.\nA:",
]
BF16_LOGPROB_TOL = 0.15

_ENGINE = textwrap.dedent(
    """
    import json, sys
    if __name__ == "__main__":
        args = json.load(open(sys.argv[1]))
        from vllm import LLM, SamplingParams
        from act_plugin.vllm import control
        kw = dict(model=args["model"], dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3, seed=0,
                  additional_config={"act": {"profiles": args["profiles"], "default": None}})
        if args.get("backend"):
            kw["attention_config"] = {"backend": args["backend"]}
        llm = LLM(**kw)
        tok = llm.get_tokenizer()
        ids = [tok(p)["input_ids"] for p in args["prompts"]]
        from vllm.inputs import TokensPrompt
        res = {"status": control.get_act_status(llm)}
        for arm in ("a", "b", "off"):
            sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20, extra_args={"act": arm})
            outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], sp, use_tqdm=False)
            res[arm] = [{str(k): v.logprob for k, v in o.outputs[0].logprobs[0].items()} for o in outs]
        arms = ["a", "off", "b"]
        sps = [SamplingParams(max_tokens=8, temperature=0.0, extra_args={"act": a}) for a in arms]
        mixed = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], sps, use_tqdm=False)
        res["mixed"] = [list(o.outputs[0].token_ids) for o in mixed]
        alone = []
        for i, a in zip(ids, arms):
            sp = SamplingParams(max_tokens=8, temperature=0.0, extra_args={"act": a})
            alone.append(list(llm.generate([TokensPrompt(prompt_token_ids=i)], sp, use_tqdm=False)[0].outputs[0].token_ids))
        res["alone"] = alone
        json.dump(res, open(sys.argv[2], "w"))
    """
)


def _engine_run(tmp_path, model, runner: str, backend: str | None):
    script = tmp_path / "engine.py"
    script.write_text(_ENGINE)
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"model": model, "profiles": PROFILES, "prompts": PROMPTS, "backend": backend}))
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "ACT_CONFIG"}
    env["VLLM_USE_V2_MODEL_RUNNER"] = "1" if runner == "v2" else "0"
    proc = subprocess.run([sys.executable, str(script), str(args), str(out)], env=env, capture_output=True, text=True,
                          timeout=1200)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture(scope="module")
def hf_reference(smollm2_path):
    """bf16 first-token log-probabilities of the HF reference path for each profile."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from act_plugin.config import ACTConfig
    from act_plugin.hf import act_enabled

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    ref = {}
    for arm, prof in PROFILES.items():
        rows = []
        with torch.no_grad(), act_enabled(model, ACTConfig.from_any(prof)):
            for p in PROMPTS:
                x = torch.tensor([tok(p)["input_ids"]], device="cuda")
                rows.append(torch.log_softmax(model(x).logits[0, -1].float(), -1).cpu())
        ref[arm] = rows
    return ref


@pytest.mark.parametrize("runner", ["v2", "v1"])
@pytest.mark.parametrize("backend", ["FLASH_ATTN", "TRITON_ATTN", "FLASHINFER"])
def test_runner_and_backend(smollm2_path, hf_reference, tmp_path, runner, backend):
    proc, res = _engine_run(tmp_path, smollm2_path, runner, backend)
    if res is None and backend == "FLASHINFER" and "flashinfer" in (proc.stderr or "").lower() and "No module" in proc.stderr:
        pytest.skip("flashinfer is not installed on this machine")
    assert proc.returncode == 0, proc.stderr[-4000:]
    status = res["status"]
    assert status["runner"] == runner
    assert {row["backend"] for row in status["layers"]} == {backend}
    assert all(row["calibrator"] for row in status["layers"])
    for arm in ("a", "b"):
        moved = 0.0
        for i, got in enumerate(res[arm]):
            ref = hf_reference[arm][i]
            diffs = [abs(lp - ref[int(t)].item()) for t, lp in got.items()]
            assert max(diffs) < BF16_LOGPROB_TOL, f"{runner}/{backend} arm {arm} prompt {i}: {max(diffs)}"
            top = max(got, key=got.get)
            assert int(top) == int(ref.argmax()), f"{runner}/{backend} arm {arm} prompt {i}: top-1 differs"
            off = res["off"][i]
            moved = max(moved, max(abs(lp - off[t]) for t, lp in got.items() if t in off))
        assert moved > 0.01, f"{runner}/{backend}: arm {arm} changed nothing"
    assert res["mixed"] == res["alone"], "mixed arms in one batch differ from the same arms alone"


def test_unwrapped_backend_is_refused_at_start(smollm2_path, tmp_path):
    proc, res = _engine_run(tmp_path, smollm2_path, "v2", "FLEX_ATTENTION")
    assert proc.returncode != 0 and res is None
    assert "act-plugin does not wrap" in proc.stdout + proc.stderr
    assert "--attention-backend" in proc.stdout + proc.stderr
