"""Per-request ACT arm, carried by vLLM's own per-request plumbing, for both model runners.

vLLM's custom logits processors get the two hooks per-request ACT needs: ``validate_params``
runs in the front end on every request (a ``ValueError`` there becomes an HTTP 400 for that
request alone), and the worker is told when a request enters the batch and into which slot.
The routers record each admitted request's arm in :attr:`WorkerState.arms`, keyed by slot;
they never touch logits.

* V1 model runner (CPU today; CUDA with ``VLLM_USE_V2_MODEL_RUNNER=0``):
  :class:`ACTRequestRouter`, a V1 ``LogitsProcessor``; the slot is the persistent-batch row,
  which is also the request's position in the step's batch. The runner updates its persistent
  batch, and so the router, on every pipeline stage: each stage knows each request's arm.
* Model Runner V2 (vLLM's default on CUDA): :class:`ACTRequestRouterV2`, a V2
  ``LogitsProcessor``; ``add_request(req_idx, params)`` keys the request's state slot, and the
  step's batch position -> slot mapping reaches the attention metadata builder as
  ``CommonAttentionMetadata.req_idx`` (see :mod:`act_plugin.vllm.plan`). It hears of requests
  on the last pipeline stage only, hence no pipeline parallelism under V2 (refused at start).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from act_plugin.config import ACTConfigError
from act_plugin.config.vocabulary import NO_REQUEST_VALUE, REQUEST_KEY
from act_plugin.vllm.frontend_state import frontend_state
from act_plugin.vllm.request_spans import (
    SPANS_KEY,
    check_request_spans,
    default_needs_spans,
    read_token_ranges,
    refuse_private_keys,
)
from act_plugin.vllm.worker_state import Arm, worker_state

logger = logging.getLogger("act_plugin")


def request_value(params: Any) -> Any:
    """A request's ``act`` value as given (:data:`NO_REQUEST_VALUE` when it has none)."""
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(REQUEST_KEY, NO_REQUEST_VALUE)


def validate_request(sampling_params: Any) -> None:
    """Front-end check of a request's ``act`` value (ValueError -> HTTP 400 for that request),
    read by the vocabulary (:mod:`act_plugin.config.vocabulary`, surface ``REQUEST``), and of
    its ``act_spans`` (:mod:`act_plugin.vllm.request_spans`; mapped to tokens later, once the
    prompt is tokenized)."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    refuse_private_keys(extra)
    value = extra.get(REQUEST_KEY, NO_REQUEST_VALUE)
    cfg = frontend_state.engine_cfg
    unset = isinstance(value, str) and value == NO_REQUEST_VALUE
    if unset and SPANS_KEY not in extra and not default_needs_spans(cfg):
        return
    if cfg is None:
        why = "ACT is explicitly off on this engine" if frontend_state.explicitly_off else (
            "this engine was started without an ACT configuration")
        given = f"'{SPANS_KEY}'" if unset else f"the request value act={value!r}"
        raise ValueError(f"{why}; {given} is not accepted")
    try:
        profile = cfg.resolve_request(value)
    except ACTConfigError as e:
        raise ValueError(str(e)) from None
    check_request_spans(extra, cfg, profile)


def request_arm(params: Any) -> Arm | None:
    """The arm of a request being admitted to this worker; a ``spans`` arm carries the token
    ranges the front end attached."""
    arm = worker_state.resolve_arm(request_value(params))
    if arm is None or arm.rule != "spans":
        return arm
    ranges = read_token_ranges(params)
    if not ranges:
        # The front end refuses a spans request without spans, so this is a profile switch
        # racing the admission (or a request built around the front end): nothing to emphasise.
        logger.warning("act-plugin: request of 'spans' profile %r arrived without token ranges; running it "
                       "uncalibrated", arm.profile)
        return None
    return arm.with_token_ranges(ranges)


class ACTRequestRouter(V1LogitsProcessor):
    """V1 model runner adapter: slots are persistent-batch rows."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_request(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        # A new persistent batch starts empty; the newest router is the live one.
        worker_state.arms = {}
        worker_state.readmitted = {}
        worker_state.runner = "v1"
        self.arms = worker_state.arms
        self.readmitted = worker_state.readmitted

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        arms, readmitted = self.arms, self.readmitted
        # vLLM's documented order: removed, added, moved.
        for index in batch_update.removed:
            arms.pop(index, None)
            readmitted.pop(index, None)
        for index, params, prompt_tok_ids, output_tok_ids in batch_update.added:
            arm = request_arm(params)
            readmitted.pop(index, None)
            if arm is None:
                arms.pop(index, None)
                continue
            arms[index] = arm
            if output_tok_ids:
                # Back after a preemption, or only after sitting out a step: the step plan
                # tells them apart (WorkerState.judge_readmitted).
                readmitted[index] = len(prompt_tok_ids or ())
        for a, b, direction in batch_update.moved:
            _move(arms, a, b, direction)
            _move(readmitted, a, b, direction)


def _move(by_slot: dict, a: int, b: int, direction: Any) -> None:
    """Apply one persistent-batch move (SWAP or UNIDIRECTIONAL a -> b) to a slot-keyed dict."""
    a_val, b_val = by_slot.pop(a, None), by_slot.pop(b, None)
    if a_val is not None:
        by_slot[b] = a_val
    if b_val is not None and direction.name == "SWAP":
        by_slot[a] = b_val


class ACTRequestRouterV2(V2LogitsProcessor):
    """Model Runner V2 adapter: slots are request-state indices (``req_idx``)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_request(sampling_params)

    def __init__(self, vllm_config, req_states) -> None:
        worker_state.arms = {}
        worker_state.runner = "v2"
        self.arms = worker_state.arms
        self.req_states = req_states

    def add_request(self, req_idx: int, sampling_params) -> bool:
        arm = request_arm(sampling_params)
        worker_state.note_admitted(arm, resumed=self._resumed(req_idx))
        # Slots are recycled: overwrite whatever the previous occupant left.
        if arm is None:
            self.arms.pop(req_idx, None)
        else:
            self.arms[req_idx] = arm
        return False  # never modifies logits

    def _resumed(self, req_idx: int) -> bool:
        # prefill_len = prompt + output already generated when a preempted request returns.
        try:
            return int(self.req_states.prefill_len.np[req_idx]) > int(self.req_states.prompt_len.np[req_idx])
        except (AttributeError, IndexError, TypeError):
            return False

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        return logits


V1_ROUTER_FQCN = f"{__name__}:ACTRequestRouter"
V2_ROUTER_FQCN = f"{__name__}:ACTRequestRouterV2"
