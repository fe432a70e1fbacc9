"""Per-request ACT arm, carried by vLLM's own per-request plumbing.

vLLM gives custom logits processors two hooks that are exactly what per-request ACT
needs: ``validate_params`` runs in the front end on every request (a ``ValueError`` there
becomes an HTTP 400 for that request alone), and ``update_state`` is told, before every
forward pass, which persistent-batch row holds which request. The router records each
row's ``extra_args["act"]`` for the attention backends; it never touches logits.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from act_plugin.config import ACTConfigError
from act_plugin.vllm.runtime import NO_REQUEST_VALUE, frontend_state, worker_state

REQUEST_KEY = "act"


def request_value(params: Any) -> Any:
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(REQUEST_KEY, NO_REQUEST_VALUE)


class ACTRequestRouter(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        value = request_value(sampling_params)
        if value == NO_REQUEST_VALUE:
            return
        cfg = frontend_state.engine_cfg
        if cfg is None:
            raise ValueError("this engine was started without an ACT configuration; 'act' is not accepted")
        try:
            cfg.resolve_request(value)
        except ACTConfigError as e:
            raise ValueError(str(e)) from None

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        # A new persistent batch starts empty; the newest router is the live one.
        worker_state.rows = {}
        self.rows = worker_state.rows

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, lambda params, _prompt, _out: request_value(params))
