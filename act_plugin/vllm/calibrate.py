"""ACT inside one vLLM attention layer: run the step plan's groups through the kernels.

The native kernel has computed every head; for each group of the step plan (built by the
wrapped metadata builder, :mod:`act_plugin.vllm.plan`) the calibrator calls
:func:`act_plugin.kernels.calibrate_paged` once, which overwrites that group's configured
heads. Uncalibrated heads and layers keep the native result bit for bit. Nothing here reads
from the device or logs per step.
"""

from __future__ import annotations

import torch

from act_plugin.calibration import kv_heads_of
from act_plugin.kernels import calibrate_paged
from act_plugin.vllm.kv_layout import KVSplit
from act_plugin.vllm.runtime import WorkerState

# Attribute of vLLM's per-step attention metadata that carries the ACT step plan; set by
# the wrapped metadata builder (act_plugin.vllm.backends.act_builder).
PLAN_ATTR = "act_plan"


class LayerCalibrator:
    """ACT for one attention layer; owned by the wrapped backend's ``Impl``."""

    def __init__(
        self,
        *,
        state: WorkerState,
        num_heads: int,
        num_kv_heads: int,
        scale: float,
        sliding_window: int | None,
        kv_split: KVSplit,
    ) -> None:
        self.state = state
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.window = sliding_window
        self.kv_split = kv_split
        # Set by the start-up self-check, which knows the layer's name; None = never
        # calibrated (not configured, or not decoder self-attention).
        self.layer_index: int | None = None

    def apply(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata, output: torch.Tensor) -> None:
        """Overwrite the configured heads of ``output`` ([tokens, heads, D]) with ACT."""
        layer = self.layer_index
        if metadata is None or layer is None or kv_cache.numel() == 0:
            return  # profiling / dummy runs, and layers the self-check found not calibratable
        state = self.state
        if layer not in state.calibrated_layers():
            return
        plan = getattr(metadata, PLAN_ATTR, None)
        if plan is None:
            raise RuntimeError(
                f"ACT: layer {layer} received attention metadata without an ACT step plan "
                f"({type(metadata).__name__}); its metadata builder is not the ACT wrapper"
            )
        if not plan.groups:
            return
        key_cache, value_cache = self.kv_split(kv_cache)
        out = output.view(output.shape[0], self.num_heads, -1)
        for group in plan.groups:
            heads = state.local_heads(group.arm.config, layer, self.num_heads, query.device)
            if heads is None:
                continue
            prof = group.arm.config
            calibrate_paged(
                query, out, key_cache, value_cache, group.block_table, group.seq_lens, group.query_start,
                group.query_lens, heads, kv_heads_of(heads, self.num_heads, self.num_kv_heads),
                scale=self.scale, beta=prof.beta, threshold=prof.threshold, window=self.window,
                max_query_len=group.max_query_len, max_seq_len=group.max_seq_len,
            )
