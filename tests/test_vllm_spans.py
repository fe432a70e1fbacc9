"""The spans rule's request path without an engine: the front-end checks of ``act_spans``
(and of the private token-range key), the mapping of character spans to token ranges with the
embedded SmolLM2 tokenizer (against the HF path's mapping), both routers carrying each
request's ranges into its arm, and the serving layer's refusals."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality  # noqa: E402

from act_plugin.config import ACTEngineConfig  # noqa: E402
from act_plugin.span_marks import emphasis_from_spans, token_ranges  # noqa: E402
from act_plugin.vllm.frontend_state import frontend_state  # noqa: E402
from act_plugin.vllm.request_spans import (  # noqa: E402
    SPANS_KEY,
    TOKEN_RANGES_KEY,
    attach_token_ranges,
    read_request_spans,
)
from act_plugin.vllm.router import ACTRequestRouter, ACTRequestRouterV2, validate_request  # noqa: E402
from act_plugin.vllm.worker_state import worker_state  # noqa: E402

PROFILES = {
    "a": {"beta": 0.4, "heads": "2-27:0,4"},
    "emph": {"rule": "spans", "alpha": 0.01, "heads": "8-15:*"},
}
PROMPT = "Review: an utterly charming, funny film.\nSentiment:"


def _params(**extra):
    return vllm.SamplingParams(extra_args=extra)


@pytest.fixture
def front():
    saved = (frontend_state.engine_cfg, frontend_state.explicitly_off)
    frontend_state.set(ACTEngineConfig.from_any({"profiles": PROFILES, "default": "a"}))
    yield frontend_state
    frontend_state.set(*saved)


@pytest.fixture
def state():
    saved = (worker_state.engine_cfg, dict(worker_state.arms), dict(worker_state.retired))
    worker_state.engine_cfg = ACTEngineConfig.from_any({"profiles": PROFILES, "default": None})
    worker_state.version += 1
    yield worker_state
    worker_state.engine_cfg, arms, retired = saved
    worker_state.version += 1
    worker_state.arms.clear()
    worker_state.arms.update(arms)
    worker_state.retired.clear()
    worker_state.retired.update(retired)


# ----------------------------------------------------------------------------- front-end checks
def test_request_spans_forms():
    assert read_request_spans([[8, 30], [40, 45]]) == [[8, 30], [40, 45]]
    assert read_request_spans([8, 30, 40, 45]) == [[8, 30], [40, 45]]  # flat: vllm_xargs over HTTP
    for bad in ([8, 30, 40], [], "8:30", [[8, 30], 40], None, [True, False]):
        with pytest.raises(ValueError, match="'act_spans'"):
            read_request_spans(bad)


def test_valid_spans_requests_pass(front):
    validate_request(_params(act="emph", act_spans=[[8, 30]]))
    validate_request(_params(act="emph", act_spans=[8, 30, 41, 45]))
    validate_request(_params(act="a"))
    validate_request(_params())  # the default profile 'a' needs no spans


@pytest.mark.parametrize("extra, message", [
    ({"act": "a", "act_spans": [[8, 30]]}, "this request runs profile 'a' \\(rule 'act'\\)"),
    ({"act": "off", "act_spans": [[8, 30]]}, "this request runs no ACT profile"),
    ({"act_spans": [[8, 30]]}, "this request runs profile 'a'"),
    ({"act": "emph"}, "profile 'emph' uses rule 'spans': the request must mark .* 'act_spans'"),
    ({"act": "emph", "act_spans": [[30, 8]]}, "'act_spans': span \\[30, 8\\]: needs 0 <= start < end"),
    ({"act": "emph", "act_spans": [[0, 10], [5, 20]]}, "'act_spans': spans \\[0, 10\\] and \\[5, 20\\] overlap"),
    ({"act": "emph", "act_spans": [[0, 1.5]]}, "'act_spans': span \\[0, 1.5\\]: expected \\[start, end\\]"),
    ({"act": "emph", "act_spans": [[1, 2]], TOKEN_RANGES_KEY: [[0, 3]]}, "'_act_span_tokens' is written by"),
    ({TOKEN_RANGES_KEY: [[0, 3]]}, "a request cannot give it"),
])
def test_bad_spans_requests_are_refused(front, extra, message):
    with pytest.raises(ValueError, match=message):
        validate_request(_params(**extra))


def test_a_spans_default_profile_needs_spans(front):
    front.set(ACTEngineConfig.from_any({"profiles": PROFILES, "default": "emph"}))
    with pytest.raises(ValueError, match="profile 'emph' uses rule 'spans'"):
        validate_request(_params())
    validate_request(_params(act_spans=[[0, 4]]))
    validate_request(_params(act="off"))


def test_spans_on_an_engine_without_act_are_refused(front):
    front.set(None)
    with pytest.raises(ValueError, match="started without an ACT configuration; 'act_spans' is not accepted"):
        validate_request(_params(act_spans=[[0, 4]]))


# ----------------------------------------------------------------------------- spans -> tokens
@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def _request(tokenizer, text, spans, ids=None):
    ids = tokenizer(text)["input_ids"] if ids is None else ids
    return SimpleNamespace(prompt_token_ids=ids, sampling_params=_params(act="emph", act_spans=spans))


@pytest.mark.parametrize("spans", [[[8, 30]], [[0, 1], [41, 51]], [[50, 51]], [[0, len(PROMPT)]]])
def test_token_ranges_equal_the_hf_path_mapping(tokenizer, spans):
    """The engine's token ranges mark exactly the positions the HF path's set_emphasis mask does."""
    caller_extra = {"act": "emph", SPANS_KEY: spans}
    req = _request(tokenizer, PROMPT, spans)
    req.sampling_params.extra_args = caller_extra
    attach_token_ranges(req, {"type": "token", "prompt": PROMPT, "prompt_token_ids": req.prompt_token_ids},
                        tokenizer)
    hf = emphasis_from_spans(tokenizer, [PROMPT], [spans])[0]
    assert req.sampling_params.extra_args[TOKEN_RANGES_KEY] == token_ranges(hf.tolist())
    assert TOKEN_RANGES_KEY not in caller_extra  # a fresh dict: what the caller passed stays as given


def test_renderer_offsets_are_used_when_given(tokenizer):
    req = _request(tokenizer, "abc def", [[4, 7]], ids=[1, 2, 3])
    attach_token_ranges(req, {"prompt": "abc def", "prompt_token_offsets": [(0, 3), (3, 4), (4, 7)]}, tokenizer)
    assert req.sampling_params.extra_args[TOKEN_RANGES_KEY] == [[2, 3]]


@pytest.mark.parametrize("prompt, ids, message", [
    (PROMPT, None, "past the end of the prompt \\(51 characters\\)"),
    ({"type": "token", "prompt_token_ids": [1, 2, 3]}, [1, 2, 3], "has no prompt text \\(only token ids"),
    (PROMPT, [1, 2, 3], "the prompt's tokens are not its text tokenized"),
])
def test_unmappable_spans_are_refused(tokenizer, prompt, ids, message):
    from vllm.exceptions import VLLMValidationError

    req = _request(tokenizer, PROMPT, [[40, 60]], ids=ids)
    with pytest.raises(ValueError, match=f"'act_spans'.*{message}") as err:
        attach_token_ranges(req, prompt, tokenizer)
    # raised after vLLM's own validation: only its validation error becomes an HTTP 400 (not a 500)
    assert isinstance(err.value, VLLMValidationError) and err.value.parameter == "act_spans"


def test_spans_covering_no_token_are_refused(tokenizer):
    req = _request(tokenizer, "ab", [[0, 1]], ids=[5, 6])
    with pytest.raises(ValueError, match="'act_spans': span \\[0, 1\\] covers no token"):
        attach_token_ranges(req, {"prompt": "ab", "prompt_token_offsets": [(0, 0), (1, 2)]}, tokenizer)


# ----------------------------------------------------------------------------- routers
def _spans(ranges, act="emph"):
    return _params(act=act, act_spans=[[0, 1]], **{TOKEN_RANGES_KEY: ranges})


def test_v1_router_keeps_each_requests_ranges(state):
    router = ACTRequestRouter(None, torch.device("cpu"), False)
    router.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, _spans([[2, 5]]), [1] * 9, []), (1, _params(act="a"), [1], []),
        (2, _spans([[0, 1], [7, 9]]), [1] * 9, [])]))
    assert {i: (a.profile, a.token_ranges) for i, a in state.arms.items()} == {
        0: ("emph", ((2, 5),)), 1: ("a", ()), 2: ("emph", ((0, 1), (7, 9)))}
    router.update_state(BatchUpdate(batch_size=3, removed=[], added=[], moved=[(0, 2, MoveDirectionality.SWAP)]))
    assert state.arms[0].token_ranges == ((0, 1), (7, 9)) and state.arms[2].token_ranges == ((2, 5),)


def test_v2_router_keeps_each_requests_ranges(state):
    req_states = SimpleNamespace(prompt_len=SimpleNamespace(np=np.full(8, 9)),
                                 prefill_len=SimpleNamespace(np=np.full(8, 9)))
    router = ACTRequestRouterV2(None, req_states)
    router.add_request(5, _spans([[3, 4]]))
    router.add_request(2, _spans([[0, 9]]))
    assert state.arms[5].token_ranges == ((3, 4),) and state.arms[2].token_ranges == ((0, 9),)
    router.add_request(5, _params(act="a"))  # a recycled slot takes its new occupant's arm
    assert state.arms[5].token_ranges == () and state.arms[5].profile == "a"


def test_a_spans_arm_without_ranges_runs_uncalibrated(state, caplog):
    router = ACTRequestRouterV2(None, SimpleNamespace())
    router.add_request(1, _params(act="emph"))  # never reaches a worker through the front end
    assert 1 not in state.arms
    assert "arrived without token ranges" in caplog.text


def test_beam_search_with_spans_is_refused():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from act_plugin.vllm import _install_beam_search_guard

    _install_beam_search_guard()
    req = CompletionRequest(model="m", prompt="hi", use_beam_search=True, n=2,
                            vllm_xargs={SPANS_KEY: [0, 2]})
    with pytest.raises(ValueError, match="'act_spans' in vllm_xargs is not supported with use_beam_search"):
        req.to_beam_search_params(4, {})
