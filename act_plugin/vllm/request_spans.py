"""A request's spans (the ``spans`` rule) in the vLLM engine: character ranges in, token ranges out.

A request running a ``spans`` profile marks spans of its prompt as character ranges,
``extra_args={"act": "emph", "act_spans": [[120, 180]]}`` offline and the same in ``vllm_xargs``
over HTTP, where vLLM 0.32's request schema takes only flat lists: ``"act_spans": [120, 180]``
(pairs in order, ``[s0, e0, s1, e1, ...]``). Three front-end steps, all in the process that
takes requests:

1. :func:`check_request_spans` (from the router's ``validate_params``, before the prompt is
   known): the spans are well formed (pairs of integer offsets, start < end, no overlap), the
   request's arm is a ``spans`` profile exactly when it gives spans, and it does not carry
   :data:`TOKEN_RANGES_KEY`, which only the front end writes.
2. :func:`attach_token_ranges` (after vLLM has tokenized the prompt, :func:`install_span_mapping`
   wraps ``InputProcessor.process_inputs``, where the prompt's text and token ids are both
   known): the spans are mapped to tokens with the tokenizer's character offsets
   (:func:`act_plugin.span_marks.spans_to_token_mask`; a token is emphasised when it overlaps a
   span) and written, as half-open token ranges, under :data:`TOKEN_RANGES_KEY` in the
   request's own copy of its ``extra_args``. A request with no prompt text (token ids only),
   spans past the text, or spans that cover no token is refused there.
3. The workers' routers read the token ranges (:func:`read_token_ranges`) into the request's arm.

Every refusal names ``act_spans`` and is an HTTP 400 for that request alone: a ``ValueError``
in step 1 (vLLM re-raises it as its ``VLLMValidationError``), a :class:`SpanRequestError` (both)
in step 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

from vllm.exceptions import VLLMValidationError

from act_plugin.config import ACTEngineConfig
from act_plugin.span_marks import SpanError, check_spans, spans_to_token_mask, token_ranges

__all__ = ["SPANS_KEY", "TOKEN_RANGES_KEY", "SpanRequestError", "attach_token_ranges", "check_request_spans",
           "default_needs_spans", "install_span_mapping", "read_request_spans", "read_token_ranges"]

SPANS_KEY: Final = "act_spans"
# Written by the front end only (a request giving it is refused): the spans as token ranges.
TOKEN_RANGES_KEY: Final = "_act_span_tokens"

class SpanRequestError(VLLMValidationError, ValueError):
    """Spans of a request that cannot be mapped to its tokens: vLLM's validation error (HTTP 400
    naming the parameter; a plain ValueError raised after validation would be an HTTP 500), and a
    ValueError for offline callers."""

    def __init__(self, message: str) -> None:
        super().__init__(message, parameter=SPANS_KEY)


_FORMS = (f"'{SPANS_KEY}' takes character ranges of the prompt: [[start, end], ...] (end exclusive), or flat "
          "[start, end, start, end, ...] (vllm_xargs over HTTP takes flat lists only)")


def read_request_spans(value: Any) -> list[list[int]]:
    """The request's ``act_spans`` as ``[start, end]`` pairs (nested or flat form); shape only."""
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            if len(value) % 2:
                raise ValueError(f"{_FORMS}; the flat list {list(value)} has an odd number of offsets")
            return [[value[i], value[i + 1]] for i in range(0, len(value), 2)]
        if all(isinstance(x, (list, tuple)) for x in value):
            return [list(x) for x in value]
    raise ValueError(f"{_FORMS}; got {value!r}")


def default_needs_spans(cfg: ACTEngineConfig | None) -> bool:
    """Whether a request that names no arm runs a ``spans`` profile (and so must give spans)."""
    return cfg is not None and cfg.default is not None and cfg.profiles[cfg.default].rule == "spans"


def check_request_spans(extra: Mapping[str, Any], cfg: ACTEngineConfig, profile: str | None) -> None:
    """Front-end check before the prompt is known (``profile``: the request's resolved arm)."""
    rule = cfg.profiles[profile].rule if profile is not None else None
    if SPANS_KEY in extra:
        if rule != "spans":
            runs = "no ACT profile" if profile is None else f"profile {profile!r} (rule '{rule}')"
            raise ValueError(f"'{SPANS_KEY}' marks the spans of a 'spans' profile, but this request runs {runs}; "
                             f"select a spans profile with 'act', or drop '{SPANS_KEY}'")
        try:
            check_spans(read_request_spans(extra[SPANS_KEY]), sys.maxsize)
        except SpanError as e:
            raise ValueError(f"'{SPANS_KEY}': {e}") from None
    elif rule == "spans":
        raise ValueError(f"ACT profile {profile!r} uses rule 'spans': the request must mark the spans of its prompt "
                         f"to emphasise with '{SPANS_KEY}' ({_FORMS})")


def refuse_private_keys(extra: Mapping[str, Any]) -> None:
    if TOKEN_RANGES_KEY in extra:
        raise ValueError(f"'{TOKEN_RANGES_KEY}' is written by act-plugin's front end from '{SPANS_KEY}'; a request "
                         f"cannot give it (mark spans with '{SPANS_KEY}')")


def _prompt_text(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping):
        text = prompt.get("prompt")
        return text if isinstance(text, str) and text else None
    return None


def prompt_offsets(tokenizer: Any, text: str, ids: Sequence[int], given: Any = None) -> Sequence[Sequence[int]]:
    """Each prompt token's character range in ``text``: the renderer's own offsets when it made
    them, else ``text`` tokenized again (with and without special tokens), which must give the
    request's token ids exactly."""
    if given is not None and len(given) == len(ids):
        return given
    if tokenizer is None:
        raise SpanRequestError(f"'{SPANS_KEY}' needs the engine's tokenizer to map character spans to tokens "
                               "(the engine was started without one)")
    for special in (True, False):
        try:
            enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError) as e:
            raise SpanRequestError(f"'{SPANS_KEY}': the tokenizer gives no character offsets ({e}); mapping spans "
                                   "to tokens needs a fast tokenizer") from None
        if list(enc["input_ids"]) == list(ids):
            return enc["offset_mapping"]
    raise SpanRequestError(f"'{SPANS_KEY}': the prompt's tokens are not its text tokenized (truncated, or tokens "
                           "added around it), so its character spans cannot be mapped to tokens; give the prompt as "
                           "plain text")


def attach_token_ranges(request: Any, prompt: Any, tokenizer: Any) -> None:
    """Map the request's spans to token ranges and write them into its own ``extra_args``
    (``request``: vLLM's ``EngineCoreRequest``; ``prompt``: what ``process_inputs`` was given)."""
    params = request.sampling_params
    extra = dict(params.extra_args or {})
    text = _prompt_text(prompt)
    ids = request.prompt_token_ids
    if text is None or ids is None:
        raise SpanRequestError(f"'{SPANS_KEY}' are character ranges of the prompt's text, and this request has no "
                               "prompt text (only token ids or embeddings); give the prompt as text")
    offsets = prompt_offsets(tokenizer, text, ids, prompt.get("prompt_token_offsets")
                             if isinstance(prompt, Mapping) else None)
    try:
        mask = spans_to_token_mask(offsets, read_request_spans(extra[SPANS_KEY]), len(text))
    except ValueError as e:  # SpanError, or a form the arrival check let through
        raise SpanRequestError(str(e) if str(e).startswith(f"'{SPANS_KEY}'") else f"'{SPANS_KEY}': {e}") from None
    extra[TOKEN_RANGES_KEY] = token_ranges(mask)
    params.extra_args = extra  # the request's own copy: the caller's params stay as given


def read_token_ranges(params: Any) -> tuple[tuple[int, int], ...]:
    """Worker side: the token ranges the front end attached (empty: none)."""
    extra = getattr(params, "extra_args", None) or {}
    return tuple((int(a), int(b)) for a, b in extra.get(TOKEN_RANGES_KEY) or ())


def install_span_mapping() -> None:
    """Wrap vLLM's ``InputProcessor.process_inputs`` so that requests with ``act_spans`` get
    their token ranges (idempotent). Must run before the engine builds its input processor
    (the config hook does), which binds the method for its async variant."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "_act_wrapped", False):
        return

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        params = getattr(request, "sampling_params", None)
        if params is not None and SPANS_KEY in (params.extra_args or {}):
            prompt = kwargs["prompt"] if "prompt" in kwargs else (args[1] if len(args) > 1 else None)
            attach_token_ranges(request, prompt, self.tokenizer)
        return request

    process_inputs._act_wrapped = True  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs  # type: ignore[method-assign]
