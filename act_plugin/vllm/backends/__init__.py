"""Wrapped vLLM attention backends, one file per native backend.

Each wrapper is a subclass of the native ``Backend`` made by :func:`act_backend`. While the
engine being built has no ACT configuration it hands out the native ``Impl`` and metadata
builder, so such an engine runs vanilla vLLM. With ACT on it hands out:

* a metadata builder subclass (:func:`act_builder`) whose ``build`` adds the step's
  :class:`~act_plugin.vllm.plan.StepPlan` to the native metadata: per-step work where vLLM
  does per-step work, before the forward pass and outside any CUDA graph;
* an ``Impl`` subclass with :class:`ACTImplMixin`: the native kernel computes every head, then
  a :class:`~act_plugin.vllm.layer_calibrator.LayerCalibrator` overwrites the configured heads
  (or, for steps whose rows all run ACT arms, ACT's fused kernel computes the layer in place
  of the native one where the backend allows it: ``whole_decode``; decode steps on every such
  backend, steps with prefill rows where the fused kernel has a whole-layer prefill: CPU_ATTN).

CUDA graphs: the builder declares to vLLM full-graph support for single-token decode batches
(``AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE``, or the native builder's own if lower)
where ACT can calibrate inside a graph (CUDA, the Triton kernels, one 16/32-bit dtype, no
non-``act`` rule configured), and ``NEVER`` elsewhere, so that vLLM keeps FULL graphs for
decode steps only and lowers the rest itself. Inside a FULL graph a layer runs the native
kernel and then the per-row decode kernel on the tables of :mod:`act_plugin.vllm.graph_plan`,
which the builder rewrites before every step.

The first ACT builder a worker constructs (after the model is loaded) runs the start-up
check (:mod:`act_plugin.vllm.startup_check`).
"""

from __future__ import annotations

import logging
import time
from functools import cache
from typing import TYPE_CHECKING, Any

import torch

from act_plugin.kernels import kernel_name
from act_plugin.kernels.cache_layout import KVSplit
from act_plugin.vllm.config_source import act_configured
from act_plugin.vllm.graph_plan import GRAPH_ATTR, ensure_graph_tables, graph_tables
from act_plugin.vllm.layer_calibrator import LayerCalibrator
from act_plugin.vllm.layer_support import impl_features
from act_plugin.vllm.plan import PLAN_ATTR, build_step_plan, max_transient_bytes
from act_plugin.vllm.profiling import timer
from act_plugin.vllm.startup_check import run_startup_check
from act_plugin.vllm.worker_state import init_worker_state

if TYPE_CHECKING:
    from vllm.v1.attention.backend import AttentionBackend

logger = logging.getLogger("act_plugin")


def act_enabled_for_current_engine() -> bool:
    from vllm.config import get_current_vllm_config_or_none  # vLLM itself: called while it builds a model

    return act_configured(get_current_vllm_config_or_none())


def _window(impl: Any) -> int | None:
    window = getattr(impl, "sliding_window", None)
    if isinstance(window, tuple):  # flash-attn style (left, right)
        return window[0] + 1 if window[0] >= 0 else None
    return window if window and window > 0 else None


def reserve_transient_memory(device) -> None:
    """Make vLLM's memory profiling see the calibration's per-step transient memory.

    vLLM sizes the KV cache from the peak memory of a profiling forward pass, which runs
    without attention metadata (so without calibration). Allocating the plan's transient
    budget (``ACT_MAX_TRANSIENT_MB``, see :mod:`act_plugin.vllm.plan`) inside that pass puts
    it into the peak, so the KV cache leaves room for it.
    """
    torch.empty(max_transient_bytes(), dtype=torch.uint8, device=device)


class ACTImplMixin:
    """Mixed in before a native ``Impl``: native forward, then ACT on the configured heads."""

    act_kv_split: KVSplit  # set by act_impl()
    # Set by act_impl(): the backend lets ACT compute whole decode steps of calibrated layers
    # in place of the native kernel (LayerCalibrator.whole_layer).
    act_whole_decode_backend: bool = False
    # Set in __init__: the native base's act_layout_ready, or None where it has none.
    _act_layout_ready: Any = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config  # vLLM itself (this module is imported without it)

        impl: Any = self
        # Unsupported features are judged at start by the start-up check, which knows the
        # layer; the calibrator keeps what it needs to compute.
        self.act_features = impl_features(impl)
        self.act = LayerCalibrator(
            heads=init_worker_state(get_current_vllm_config()),
            num_heads=impl.num_heads,
            num_kv_heads=impl.num_kv_heads,
            scale=float(impl.scale),
            sliding_window=_window(impl),
            kv_split=type(self).act_kv_split,
        )
        # A native Impl base that must check at run time that ACT reads its cache layout
        # (CPU_ATTN) has ``act_layout_ready(layer, kv_cache)``: run before a step first decides
        # to compute a layer whole; found once here, not per call.
        self._act_layout_ready = getattr(super(), "act_layout_ready", None)
        f = self.act_features
        # Only where the fused kernel computes exactly what the native one does: plain causal
        # decoder self-attention (windows allowed) over an unquantised cache.
        self.act_whole_decode = type(self).act_whole_decode_backend and (
            f.attn_type == "decoder" and not f.alibi and not f.logit_softcap and not f.learned_sinks
            and f.kv_cache_dtype == "auto"
        )

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if (
            self.act_whole_decode and attn_metadata is not None and output_scale is None
            and (self._act_layout_ready is None or self._act_layout_ready(layer, kv_cache))
            and plain_causal_metadata(self, attn_metadata)
            and not (query.is_cuda and torch.cuda.is_current_stream_capturing())
            and self.act.whole_layer(query, kv_cache, attn_metadata, output)
        ):
            return output
        timed = timer.enabled and attn_metadata is not None and self.act.calibrates_layer()
        start = time.perf_counter() if timed else 0.0
        result = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output,
            output_scale=output_scale, output_block_scale=output_block_scale,
        )
        if timed:  # benchmarks: the native kernel's time in the layers ACT may compute whole
            decode = getattr(attn_metadata, "max_query_len", 1) == 1
            timer.add("decode_native_layer" if decode else "prefill_native_layer", time.perf_counter() - start)
        if attn_metadata is None and query.is_cuda:
            reserve_transient_memory(query.device)
        if query.is_cuda and torch.cuda.is_current_stream_capturing():
            # A FULL graph (attention is outside piecewise graphs): no host plan may be baked in.
            self.act.decode_in_graph(query, kv_cache, attn_metadata, output, graph_tables())
            return result
        if query.is_cuda:
            tables = graph_tables()
            if tables is not None:  # full decode graphs: their kernel compiled before vLLM captures one
                self.act.warm_graph_kernel(query, kv_cache, attn_metadata, output, tables)
        lse = getattr(self, "act_native_lse", None)  # the row LSE the native call returned (FLASH_ATTN)
        if lse is not None:
            self.act_native_lse = None
        self.act.apply(query, kv_cache, attn_metadata, output, lse=lse)
        return result


def plain_causal_metadata(impl: Any, metadata: Any) -> bool:
    """Whether this step's metadata asks the native kernel for nothing but causal attention
    over the paged cache (what ACT's whole-layer kernels compute): no per-sequence or
    non-causal mask (CPU_ATTN's ``dynamic_causal``), no multimodal bidirectional prefix, no
    R-SWA prefix, no cascade, no chunked local attention. Features of the layer itself
    (softcap, ALiBi, learned sinks, quantised cache) are judged once at construction; DCP is
    refused at start."""
    causal = getattr(metadata, "causal", True)
    return (
        causal is True
        and getattr(metadata, "dynamic_causal", None) is None
        and getattr(metadata, "mm_prefix_query_range_tensor", None) is None
        and getattr(metadata, "mm_prefix_range_tensor", None) is None
        and getattr(metadata, "rswa_prefix_lens", None) is None
        and not getattr(metadata, "use_cascade", False)
        and not getattr(impl, "chunk_lookback", None)
    )


def graph_support(native_support: Any, vllm_config: Any, kv_cache_spec: Any) -> Any:
    """The CUDA-graph support an ACT builder declares: single-token decode batches (or the
    native builder's own support if lower) where ACT can calibrate inside a FULL graph, else
    NEVER (vLLM then keeps attention out of graphs: PIECEWISE). A FULL graph of mixed or
    prefill batches would replay a stale host plan, so no ACT builder declares more."""
    from vllm.v1.attention.backend import AttentionCGSupport  # vLLM itself: asked by its model runner

    reason = graph_refusal(vllm_config, kv_cache_spec)
    if reason is not None:
        if wants_full_decode_graphs(vllm_config):  # said only where full graphs were asked for (not on CPU)
            _note_graph_refusal(reason)
        return AttentionCGSupport.NEVER
    ours = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    return native_support if native_support.value < ours.value else ours


def graph_refusal(vllm_config: Any, kv_cache_spec: Any) -> str | None:
    """Why ACT cannot calibrate inside a FULL CUDA graph of this engine (None: it can)."""
    from vllm.platforms import current_platform  # vLLM itself

    if not current_platform.is_cuda():
        return "the per-row decode kernel runs on CUDA devices only"
    device = torch.device("cuda")
    if kernel_name(device) != "triton":
        return f"the CUDA kernel in use is '{kernel_name(device)}', not the Triton kernels (ACT_KERNEL)"
    dtype = getattr(kv_cache_spec, "dtype", None)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32) or dtype != vllm_config.model_config.dtype:
        return f"the KV cache dtype {dtype} is not the model's 16/32-bit dtype"
    state = init_worker_state(vllm_config)
    if state.other_rules_in_force():
        return "a profile uses a rule other than 'act', which runs after attention on the host plan only"
    return None


_graph_notes: set = set()


def _note_graph_refusal(reason: str) -> None:
    if reason not in _graph_notes:
        _graph_notes.add(reason)
        logger.warning("act-plugin: no FULL CUDA graphs around attention (PIECEWISE instead): %s", reason)


def act_builder(native_builder: type) -> type:
    """Subclass of a native metadata builder whose metadata carries the ACT step plan."""

    class ACTMetadataBuilder(native_builder):
        def __init__(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs) -> None:
            super().__init__(kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)
            self.act_state = init_worker_state(vllm_config)
            self.act_device = device
            self.act_head_size = int(kv_cache_spec.head_size)
            self.act_max_heads = int(vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config))
            run_startup_check(vllm_config)
            self.act_graph = None
            if wants_full_decode_graphs(vllm_config) and graph_refusal(vllm_config, kv_cache_spec) is None:
                self.act_graph = make_graph_tables(self.act_state, vllm_config, device, self.act_max_heads)

        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
            return graph_support(super().get_cudagraph_support(vllm_config, kv_cache_spec), vllm_config,
                                 kv_cache_spec)

        def build(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
            metadata = super().build(common_prefix_len, common_attn_metadata, *args, **kwargs)
            start = time.perf_counter() if timer.enabled else 0.0
            plan = build_step_plan(
                self.act_state, common_attn_metadata, self.act_device,
                head_size=self.act_head_size, max_heads=self.act_max_heads,
            )
            setattr(metadata, PLAN_ATTR, plan)
            if self.act_graph is not None and common_attn_metadata.max_query_len == 1:
                # a decode step may replay a FULL graph: its rows' arms go to the device tables
                self.act_graph.write_step(common_attn_metadata)
                setattr(metadata, GRAPH_ATTR, common_attn_metadata)
            if timer.enabled and plan.groups:
                timer.add("plan_decode" if plan.is_decode_only else "plan_prefill", time.perf_counter() - start)
            return metadata

    ACTMetadataBuilder.__name__ = ACTMetadataBuilder.__qualname__ = "ACT" + native_builder.__name__
    return ACTMetadataBuilder


def wants_full_decode_graphs(vllm_config: Any) -> bool:
    """Whether this engine may capture FULL graphs of decode steps (before vLLM resolves
    the mode against the builders' support; tables made for nothing cost a few KiB)."""
    from vllm.config import CUDAGraphMode  # vLLM itself

    mode = vllm_config.compilation_config.cudagraph_mode
    return mode is not None and mode.decode_mode() == CUDAGraphMode.FULL


def make_graph_tables(state: Any, vllm_config: Any, device: Any, num_heads: int) -> Any:
    """The worker's graph tables, sized by vLLM's bounds on a decode batch."""
    comp = vllm_config.compilation_config
    max_rows = max(int(vllm_config.scheduler_config.max_num_seqs), int(comp.max_cudagraph_capture_size or 0))
    return ensure_graph_tables(
        state, max_rows=max_rows, num_layers=int(vllm_config.model_config.hf_text_config.num_hidden_layers),
        num_heads=num_heads, max_seq_len=int(vllm_config.model_config.max_model_len), device=device,
    )


@cache
def act_impl(native_impl: type, kv_split: KVSplit, whole_decode: bool = False) -> type:
    cls = type("ACT" + native_impl.__name__, (ACTImplMixin, native_impl),
               {"act_kv_split": staticmethod(kv_split), "act_whole_decode_backend": whole_decode})
    return cls


def act_backend(native_backend: type[AttentionBackend], kv_split: KVSplit, impl_base: type | None = None,
                whole_decode: bool = False) -> type:
    """The wrapper of ``native_backend``: native parts without ACT, ACT parts with it.

    ``impl_base`` replaces the native ``Impl`` as the base of the ACT impl (for backends that
    need a per-backend hook before the calibration, e.g. CPU_ATTN's layout check).
    ``whole_decode``: the backend's decode steps may be computed by ACT's fused kernel in
    place of the native one where every row is calibrated (the native kernel writes the KV
    cache in a separate ``do_kv_cache_update``, so skipping its ``forward`` skips nothing else).
    """
    native_impl = native_backend.get_impl_cls()
    native_builder_cls = native_backend.get_builder_cls()
    # Skipping the native forward must not skip the cache write.
    whole_decode = whole_decode and not getattr(native_backend, "forward_includes_kv_cache_update", True)
    impl_cls = act_impl(impl_base or native_impl, kv_split, whole_decode)
    builder_cls = act_builder(native_builder_cls)

    def get_impl_cls():
        return impl_cls if act_enabled_for_current_engine() else native_impl

    def get_builder_cls():
        return builder_cls if act_enabled_for_current_engine() else native_builder_cls

    return type(
        "ACT" + native_backend.__name__,
        (native_backend,),
        {"get_impl_cls": staticmethod(get_impl_cls), "get_builder_cls": staticmethod(get_builder_cls),
         "act_native_backend": native_backend},
    )
