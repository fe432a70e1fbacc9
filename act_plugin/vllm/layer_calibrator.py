"""ACT inside one vLLM attention layer: run the step plan's groups through the kernels.

The native kernel has computed every head; for each group of the step plan (built by the
wrapped metadata builder, :mod:`act_plugin.vllm.plan`) the calibrator calls the paged kernel
(:func:`act_plugin.kernels.calibrate_paged`, bound once per KV-cache tensor) once, which
overwrites that group's configured heads. This runs in every calibrated layer of every
step, so it does no work that does not change between steps. Uncalibrated heads and layers
keep the native result bit for bit (but see the whole-layer decode below). Nothing here
reads from the device or logs per step.

Steps whose every row runs an ACT arm skip the native kernel in calibrated layers:
:meth:`LayerCalibrator.whole_layer` computes every head of the layer with ACT on the configured
heads in the same pass. Decode steps do so on the backends that allow it (CPU_ATTN, FLASH_ATTN,
TRITON_ATTN, FLASHINFER; :func:`act_plugin.kernels.bind_decode_attention`: the cache is read
once), steps with prefill rows on CPU_ATTN unless switched off (``ACT_WHOLE_PREFILL=0``,
:func:`act_plugin.kernels.bind_layer_attention`: each calibrated head's scores are computed
once, for its output and its column statistics).
The uncalibrated heads of such a layer then equal the native result within float rounding, not
bit for bit; rows of ACT-off requests never take this path.

Arms of the ``first_token`` and ``spans`` rules (the plan's ``rule_groups``) run after the ACT
groups, on the native output (:func:`act_plugin.kernels.first_token.first_token_paged`,
:func:`act_plugin.kernels.spans.spans_paged`); a decode step with any such row declines the
whole-layer path (native kernel, then :meth:`apply`).

The native row log-sum-exp, where the backend returns it (FLASH_ATTN), goes to the kernels
that read it: ACT's prefill kernels and ``first_token`` (prefill and decode rows: given it,
the rule reads one key and one value per row). :meth:`LayerCalibrator.wants_native_lse` tells
the backend in which steps to ask for it.

Inside a FULL CUDA graph of a decode step (Python runs only at capture) the layer runs the
native kernel and then :meth:`decode_in_graph`: the per-row decode kernel on the device
tables of :mod:`act_plugin.vllm.graph_plan`, which the builder rewrites before every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from act_plugin.calibration import kv_heads_of
from act_plugin.config import ACTConfig
from act_plugin.kernels import (
    DecodeAttention,
    DecodeRows,
    LayerAttention,
    PagedKernel,
    bind_decode_attention,
    bind_decode_rows,
    bind_layer_attention,
    bind_paged,
)
from act_plugin.kernels.cache_layout import KVSplit
from act_plugin.kernels.first_token import first_token_paged
from act_plugin.kernels.spans import spans_paged
from act_plugin.vllm.graph_plan import GRAPH_ATTR, GraphTables
from act_plugin.vllm.plan import PLAN_ATTR, SeqGroup, StepPlan
from act_plugin.vllm.profiling import timer
from act_plugin.vllm.worker_state import Arm

__all__ = ["HeadSource", "LayerCalibrator"]


class HeadSource(Protocol):
    """Where a calibrator learns which layers and heads the profiles in force calibrate
    (the worker state, :class:`act_plugin.vllm.worker_state.WorkerState`)."""

    def calibrated_layers(self) -> frozenset[int]: ...

    def local_heads(
        self, prof: ACTConfig, layer: int, num_local_heads: int, device: torch.device
    ) -> torch.Tensor | None: ...

    def local_head_scales(
        self, prof: ACTConfig, layer: int, num_local_heads: int, device: torch.device
    ) -> torch.Tensor | None: ...


@dataclass(frozen=True, slots=True)
class BoundKernels:
    """A layer's cache views and the kernels bound to them, valid while the layer's KV-cache
    tensor (same object, same storage) and the query dtype stay the same."""

    kv_cache: torch.Tensor
    data_ptr: int
    query_dtype: torch.dtype
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    paged: PagedKernel
    decode: DecodeAttention | None  # the whole-layer decode kernel; None: none for these tensors
    layer: LayerAttention | None  # the whole-layer kernel for steps with prefill rows (CPU); None: none
    rows: DecodeRows | None  # the per-row decode kernel (CUDA graphs); None: none for these tensors


class LayerCalibrator:
    """ACT for one attention layer; owned by the wrapped backend's ``Impl``."""

    def __init__(
        self,
        *,
        heads: HeadSource,
        num_heads: int,
        num_kv_heads: int,
        scale: float,
        sliding_window: int | None,
        kv_split: KVSplit,
    ) -> None:
        self.head_source = heads
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.window = sliding_window
        self.kv_split = kv_split
        # None until bind_layer(): never calibrated (not configured, or not decoder
        # self-attention, or not checked at start-up).
        self.layer_index: int | None = None
        # profile hash -> (local heads, their KV heads) in this layer; None = none here
        self._heads: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._gammas: dict[str, torch.Tensor | None] = {}  # first_token: profile hash -> gamma per local head
        self._bound: BoundKernels | None = None
        self._no_heads: torch.Tensor | None = None  # an empty head list, for rows of arms without heads here
        self._graph_warm: set[int] = set()  # batch sizes whose per-row kernel has run once (warm_graph_kernel)

    def bind_layer(self, index: int) -> None:
        """Make this calibrator the one of layer ``index`` (the start-up check calls it once it
        has judged the layer calibratable; before that the calibrator does nothing)."""
        self.layer_index = index
        self._heads.clear()
        self._gammas.clear()

    def apply(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata, output: torch.Tensor,
              lse: torch.Tensor | None = None) -> None:
        """Overwrite the configured heads of ``output`` ([tokens, heads, D]) with ACT. ``lse``:
        the native call's row log-sum-exp (``[tokens, heads]`` view, natural log) where the
        backend returned it; the prefill and ``first_token`` kernels then skip their own pass."""
        if not timer.enabled:
            self._apply(query, kv_cache, metadata, output, lse)
            return
        start = time.perf_counter()
        plan = self._apply(query, kv_cache, metadata, output, lse)
        if plan is not None:
            timer.add("decode" if plan.is_decode_only else "prefill", time.perf_counter() - start)

    def calibrates_layer(self) -> bool:
        """Whether some profile in force calibrates this layer."""
        return self.layer_index is not None and self.layer_index in self.head_source.calibrated_layers()

    def wants_native_lse(self, plan: StepPlan, device: torch.device) -> bool:
        """Whether a kernel this step runs in this layer reads the native row log-sum-exp:
        an ACT group with prefill rows, or a ``first_token`` group (prefill or decode), whose
        arm has heads here. ACT decode rows and ``spans`` groups compute without it."""
        layer = self.layer_index
        if layer is None or layer not in self.head_source.calibrated_layers():
            return False
        return any(g.max_query_len > 1 and self._heads_of(g.arm, layer, device) is not None for g in plan.groups) \
            or any(g.arm.rule == "first_token" and self._heads_of(g.arm, layer, device) is not None
                   for g in plan.rule_groups)

    def _heads_of(self, arm: Arm, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if arm.hash in self._heads:
            return self._heads[arm.hash]
        heads = self.head_source.local_heads(arm.config, layer, self.num_heads, device)
        got = None if heads is None else (heads, kv_heads_of(heads, self.num_heads, self.num_kv_heads))
        self._heads[arm.hash] = got
        return got

    def _bind(self, query: torch.Tensor, output: torch.Tensor, kv_cache: torch.Tensor) -> BoundKernels:
        """The layer's key and value cache views and the kernels bound to their device and
        dtypes. The cache tensor is the same every step, so all are made once: views and
        the kernel's choice cost ~10 us each per layer and step."""
        bound = self._bound
        # inline, not a method: this test runs in every calibrated layer of every step
        if (bound is not None and bound.kv_cache is kv_cache and bound.data_ptr == kv_cache.data_ptr()
                and bound.query_dtype is query.dtype):
            return bound
        key_cache, value_cache = self.kv_split(kv_cache)
        self._bound = bound = BoundKernels(
            kv_cache=kv_cache, data_ptr=kv_cache.data_ptr(), query_dtype=query.dtype,
            key_cache=key_cache, value_cache=value_cache,
            paged=bind_paged(query, output, key_cache, value_cache),
            decode=bind_decode_attention(query, output, key_cache, value_cache),
            layer=bind_layer_attention(query, output, key_cache, value_cache),
            rows=bind_decode_rows(query, output, key_cache, value_cache),
        )
        return bound

    def whole_layer(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata, output: torch.Tensor) -> bool:
        """Compute this layer's whole attention for a step whose rows all run ACT arms, with
        ACT on each arm's heads in the same pass; False (nothing written) where that does not
        apply (and the caller runs the native kernel and :meth:`apply` instead): rows of other
        rules in the step, no arm with heads in this layer, or no whole-layer kernel for these
        tensors (steps with prefill rows: the CPU kernel only)."""
        layer = self.layer_index
        if metadata is None or layer is None:
            return False
        plan = getattr(metadata, PLAN_ATTR, None)
        if plan is None or not plan.covers_step or not plan.groups or plan.rule_groups:
            return False
        decode_only = plan.is_decode_only
        if not decode_only and query.device.type != "cpu":
            return False  # the whole-layer prefill kernel is the CPU kernel's: CUDA prefill keeps the native one
        if kv_cache.numel() == 0 or layer not in self.head_source.calibrated_layers():
            return False
        heads = [self._heads_of(g.arm, layer, query.device) for g in plan.groups]
        if all(h is None for h in heads):
            return False  # no arm of this step calibrates this layer: the native result, bit for bit
        out = output if output.dim() == 3 else output.view(output.shape[0], self.num_heads, -1)
        bound = self._bind(query, out, kv_cache)
        if (bound.decode if decode_only else bound.layer) is None:
            return False
        key_cache, value_cache = bound.key_cache, bound.value_cache
        start = time.perf_counter() if timer.enabled else 0.0
        if self._no_heads is None:
            self._no_heads = torch.zeros(0, dtype=torch.long, device=query.device)
        for group, h in zip(plan.groups, heads):
            prof = group.arm.config
            calibrated = self._no_heads if h is None else h[0]
            if decode_only:
                bound.decode(query, out, key_cache, value_cache, group.block_table, group.seq_lens,  # type: ignore[misc]
                             group.query_start, calibrated, self.scale, prof.beta, prof.threshold, self.window,
                             group.max_seq_len)
            else:
                bound.layer(query, out, key_cache, value_cache, group.block_table, group.seq_lens,  # type: ignore[misc]
                            group.query_start, group.query_lens, calibrated, self.scale, prof.beta, prof.threshold,
                            self.window, group.max_seq_len)
        if timer.enabled:
            timer.add("decode_whole_layer" if decode_only else "prefill_whole_layer", time.perf_counter() - start)
        return True

    def warm_graph_kernel(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata, output: torch.Tensor,
                          tables: GraphTables) -> None:
        """Outside a capture, once per layer and batch size: launch the per-row kernel with
        every row off (it writes nothing), so that Triton compiles it before vLLM captures a
        graph of that size (vLLM runs each size eagerly just before capturing it; compiling
        and loading a kernel inside a capture is not allowed)."""
        common = getattr(metadata, GRAPH_ATTR, None)
        if common is None or self.layer_index is None or common.num_reqs in self._graph_warm:
            return
        self._graph_warm.add(common.num_reqs)
        self.decode_in_graph(query, kv_cache, metadata, output, tables, off=True)

    def decode_in_graph(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata, output: torch.Tensor,
                        tables: GraphTables | None, off: bool = False) -> None:
        """While a FULL CUDA graph captures a decode step (after the native kernel): launch the
        per-row decode kernel in calibration mode on vLLM's persistent block table, lengths
        and query offsets, each row's arm read from ``tables`` on the device, so every replay
        calibrates the rows of that step's arms (:mod:`act_plugin.vllm.graph_plan`). Every
        bound layer captures it, whether or not an arm calibrates it now: runtime control
        may add one later, and a row of no arm in this layer changes nothing."""
        layer = self.layer_index
        if metadata is None or layer is None or kv_cache.numel() == 0:
            return
        common = getattr(metadata, GRAPH_ATTR, None)
        if tables is None or common is None:
            raise RuntimeError(
                f"ACT: a FULL CUDA graph is capturing layer {layer} without ACT's graph tables; its metadata builder "
                "declared no full-graph support (restart with cudagraph_mode=PIECEWISE)"
            )
        if int(common.max_query_len) != 1:
            raise RuntimeError(
                f"ACT: a FULL CUDA graph is capturing a batch with prefill rows in layer {layer}; ACT declares FULL "
                "graphs for single-token decode batches only (cudagraph_mode=FULL_AND_PIECEWISE or FULL_DECODE_ONLY)"
            )
        num_reqs = int(common.num_reqs)
        if num_reqs > tables.max_rows:
            raise RuntimeError(f"ACT: a CUDA graph of {num_reqs} rows exceeds the graph tables' {tables.max_rows}")
        out = output if output.dim() == 3 else output.view(output.shape[0], self.num_heads, -1)
        bound = self._bind(query, out, kv_cache)
        if bound.rows is None:
            raise RuntimeError(
                f"ACT: layer {layer} has no per-row decode kernel for these tensors ({query.device}, {query.dtype}, "
                f"cache {kv_cache.dtype}); restart with cudagraph_mode=PIECEWISE"
            )
        bound.rows(query, out, bound.key_cache, bound.value_cache, common.block_table_tensor[:num_reqs],
                   common.seq_lens, common.query_start_loc, tables.row_arms(layer, off), self.scale, self.window,
                   tables.max_seq_len)

    def _apply(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata, output: torch.Tensor,
               lse: torch.Tensor | None = None) -> StepPlan | None:
        """The calibration; returns the step plan it ran (None: no kernel ran, e.g. no arm of
        the step has heads in this layer)."""
        layer = self.layer_index
        if metadata is None or layer is None or kv_cache.numel() == 0:
            return None  # profiling / dummy runs, and layers the start-up check found not calibratable
        if layer not in self.head_source.calibrated_layers():
            return None
        plan = getattr(metadata, PLAN_ATTR, None)
        if plan is None:
            raise RuntimeError(
                f"ACT: layer {layer} received attention metadata without an ACT step plan "
                f"({type(metadata).__name__}); its metadata builder is not the ACT wrapper"
            )
        if not plan.groups and not plan.rule_groups:
            return None
        # vLLM hands the output as [T, H, D] already; a view costs ~3 us per layer and step
        out = output if output.dim() == 3 else output.view(output.shape[0], self.num_heads, -1)
        bound = self._bind(query, out, kv_cache)
        key_cache, value_cache, kernel = bound.key_cache, bound.value_cache, bound.paged
        if lse is not None and lse.shape[0] < query.shape[0]:
            # The native LSE covers the step's actual tokens; query and output may also hold
            # padding rows past them (CUDA-graph sizes), which no group reads. The kernels take
            # an LSE only as long as the query.
            query, out = query[: lse.shape[0]], out[: lse.shape[0]]
        ran = False
        for group in plan.groups:
            arm = group.arm
            heads = self._heads_of(arm, layer, query.device)
            if heads is None:
                continue
            prof = arm.config
            kernel(query, out, key_cache, value_cache, group.block_table, group.seq_lens, group.query_start,
                   group.query_lens, heads[0], heads[1], self.scale, prof.beta, prof.threshold, self.window,
                   group.max_query_len, group.max_seq_len, lse=lse)
            ran = True
        if plan.rule_groups:
            ran = self._apply_rules(plan, layer, query, out, key_cache, value_cache, lse) or ran
        return plan if ran else None

    def _apply_rules(self, plan: StepPlan, layer: int, query: torch.Tensor, out: torch.Tensor,
                     key_cache: torch.Tensor, value_cache: torch.Tensor, lse: torch.Tensor | None) -> bool:
        """The groups of non-``act`` rules, each on the native output of its own rows and heads
        (``first_token`` with the native row LSE where given); whether any kernel ran."""
        ran = False
        for group in plan.rule_groups:
            arm = group.arm
            heads = self._heads_of(arm, layer, query.device)
            if heads is None:
                continue
            ran = True
            if arm.rule == "spans":
                self._apply_spans(group, heads, query, out, key_cache, value_cache)
                continue
            if arm.rule != "first_token":  # refused at start and by runtime control (rule_support)
                raise RuntimeError(f"ACT: rule '{arm.rule}' of profile '{arm.profile}' is not served by the engine")
            gammas = self._gammas.get(arm.hash)
            if gammas is None:
                gammas = self.head_source.local_head_scales(arm.config, layer, self.num_heads, query.device)
                assert gammas is not None  # same heads as _heads_of found
                self._gammas[arm.hash] = gammas
            first_token_paged(query, out, key_cache, value_cache, group.block_table, group.seq_lens,
                              group.query_start, group.query_lens, heads[0], heads[1], gammas, scale=self.scale,
                              window=self.window, max_query_len=group.max_query_len,
                              max_seq_len=group.max_seq_len, lse=lse)
        return ran

    def _apply_spans(self, group: SeqGroup, heads: tuple[torch.Tensor, torch.Tensor], query: torch.Tensor,
                     out: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        """A ``spans`` group: each sequence's own emphasised tokens (the plan's ranges)."""
        alpha = group.arm.config.alpha
        if group.span_ranges is None or alpha is None:  # the plan gives every spans group its ranges
            raise RuntimeError(f"ACT: the step plan's group of spans profile '{group.arm.profile}' has no token ranges")
        spans_paged(query, out, key_cache, value_cache, group.block_table, group.seq_lens, group.query_start,
                    group.query_lens, heads[0], heads[1], group.span_ranges, alpha=float(alpha),
                    scale=self.scale, window=self.window, max_query_len=group.max_query_len,
                    max_seq_len=group.max_seq_len)
