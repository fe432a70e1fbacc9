"""FLASH_ATTN with ACT (CUDA). Its KV layout is unit-tested on CPU (tests/test_kv_layout.py).

Steps whose kernels read the row log-sum-exp take it from the native call itself: vLLM
0.32's ``FlashAttentionImpl.forward`` runs attention through the module-level kernel object
``_FA4_DENSE_ATTENTION_KERNEL`` (``flash_attn_varlen_func`` for FA 2/3/4; prefill and decode
alike), writing the output in place and discarding the return value. For such steps the impl
below has that one call also return ``softmax_lse`` (``return_softmax_lse=True``: ``[heads,
tokens]``, natural log, documented by vllm_flash_attn's interface), and the ACT layer hands
it transposed (``[tokens, heads]`` view) to ACT's prefill kernels and to ``first_token``
(prefill and decode rows), which then skip their own K-only LSE pass. Which steps those are
is the calibrator's call (:meth:`~act_plugin.vllm.layer_calibrator.LayerCalibrator.
wants_native_lse`: calibrated ACT prefill rows, or ``first_token`` rows, in this layer).
No attention is run twice; other steps call the native forward untouched. A decode step that
ACT's whole-layer kernel computes skips this forward altogether, and with it the LSE: that
path declines every step with ``first_token`` rows, and ACT decode rows read no LSE.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import vllm.v1.attention.backends.flash_attn as fa_module
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

from act_plugin.kernels.cache_layout import flash_attn_split
from act_plugin.vllm.backends import act_backend
from act_plugin.vllm.plan import PLAN_ATTR

KERNEL_ATTR = "_FA4_DENSE_ATTENTION_KERNEL"  # the attention call of vLLM 0.32's FlashAttentionImpl.forward


class _LSECapture:
    """Stands in for the native kernel object for one forward: the same call with the LSE
    returned as well, kept in ``lse``."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.lse: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.kernel(*args, **kwargs, return_softmax_lse=True)
        out, self.lse = result
        return out

    def __getattr__(self, name: str) -> Any:  # anything else the forward asks of the kernel object
        return getattr(self.kernel, name)


@contextmanager
def native_lse(module: Any = fa_module, attr: str = KERNEL_ATTR) -> Iterator[_LSECapture | None]:
    """Within the block, ``module.attr`` also returns the softmax LSE (kept on the yielded
    capture); None (and nothing replaced) where the module has no such kernel object."""
    kernel = getattr(module, attr, None)
    if kernel is None:
        yield None
        return
    capture = _LSECapture(kernel)
    setattr(module, attr, capture)
    try:
        yield capture
    finally:
        setattr(module, attr, kernel)


def wants_native_lse(impl: Any, metadata: Any, device: torch.device) -> bool:
    """A step whose kernels in this layer read the row LSE (ACT prefill rows, ``first_token``
    rows: the calibrator decides), on a path that runs one plain attention call (no DCP)."""
    plan = getattr(metadata, PLAN_ATTR, None)
    act = getattr(impl, "act", None)
    if plan is None or act is None or getattr(impl, "dcp_world_size", 1) > 1:
        return False
    return act.wants_native_lse(plan, device)


class FlashAttentionImplWithLSE(FlashAttentionImpl):
    """The native impl, handing ACT the row LSE of the steps that read it (``act_native_lse``)."""

    act_native_lse: Any = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        self.act_native_lse = None  # never one of an earlier step (e.g. a graph capture that did not consume it)
        if attn_metadata is None or not wants_native_lse(self, attn_metadata, query.device):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        with native_lse() as capture:
            result = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                     output_block_scale)
        lse = capture.lse if capture is not None else None
        # [H, T] natural log -> the [T, H] view the kernels take; anything else: the kernels compute their own
        expected = (self.num_heads, attn_metadata.num_actual_tokens)
        self.act_native_lse = lse.t() if lse is not None and tuple(lse.shape) == expected and lse.is_floating_point() \
            and lse.dtype == torch.float32 else None
        return result


# Whole-layer decode (LayerCalibrator.whole_layer): FlashAttentionImpl.forward only reads the
# cache (do_kv_cache_update writes it) and does nothing a skipped call would miss.
ACTFlashAttentionBackend = act_backend(FlashAttentionBackend, flash_attn_split, impl_base=FlashAttentionImplWithLSE,
                                       whole_decode=True)
