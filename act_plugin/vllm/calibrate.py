"""ACT inside one vLLM attention layer: run the step plan's groups through the kernels.

The native kernel has computed every head; for each group of the step plan (built by the
wrapped metadata builder, :mod:`act_plugin.vllm.plan`) the calibrator calls
:func:`act_plugin.kernels.calibrate_paged` once, which overwrites that group's configured
heads. Uncalibrated heads and layers keep the native result bit for bit. Nothing here reads
from the device or logs per step.
"""

from __future__ import annotations

import time

import torch

from act_plugin.calibration import kv_heads_of
from act_plugin.kernels import calibrate_paged
from act_plugin.vllm.kv_layout import KVSplit
from act_plugin.vllm.profiling import timer
from act_plugin.vllm.runtime import Arm, WorkerState

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
        # profile hash -> (local heads, their KV heads) in this layer; None = none here
        self._heads: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._kv: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor] | None = None

    def apply(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata, output: torch.Tensor) -> None:
        """Overwrite the configured heads of ``output`` ([tokens, heads, D]) with ACT."""
        if not timer.enabled:
            self._apply(query, kv_cache, metadata, output)
            return
        start = time.perf_counter()
        kind = self._apply(query, kv_cache, metadata, output)
        if kind is not None:
            timer.add(kind, time.perf_counter() - start)

    def _heads_of(self, arm: Arm, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if arm.hash in self._heads:
            return self._heads[arm.hash]
        heads = self.state.local_heads(arm.config, layer, self.num_heads, device)
        got = None if heads is None else (heads, kv_heads_of(heads, self.num_heads, self.num_kv_heads))
        self._heads[arm.hash] = got
        return got

    def _split(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value cache views; the cache tensor is the same every step,
        so its views are made once (a handful of views costs ~10 us per layer and step)."""
        cached = self._kv
        if cached is not None and cached[0] is kv_cache and cached[1] == kv_cache.data_ptr():
            return cached[2], cached[3]
        key_cache, value_cache = self.kv_split(kv_cache)
        self._kv = (kv_cache, kv_cache.data_ptr(), key_cache, value_cache)
        return key_cache, value_cache

    def _apply(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata, output: torch.Tensor) -> str | None:
        """The calibration; returns the kind of step it calibrated (None: nothing to do)."""
        layer = self.layer_index
        if metadata is None or layer is None or kv_cache.numel() == 0:
            return None  # profiling / dummy runs, and layers the self-check found not calibratable
        state = self.state
        if layer not in state.calibrated_layers():
            return None
        plan = getattr(metadata, PLAN_ATTR, None)
        if plan is None:
            raise RuntimeError(
                f"ACT: layer {layer} received attention metadata without an ACT step plan "
                f"({type(metadata).__name__}); its metadata builder is not the ACT wrapper"
            )
        if not plan.groups:
            return None
        key_cache, value_cache = self._split(kv_cache)
        out = output.view(output.shape[0], self.num_heads, -1)
        for group in plan.groups:
            prof = group.arm.config
            heads = self._heads_of(group.arm, layer, query.device)
            if heads is None:
                continue
            calibrate_paged(
                query, out, key_cache, value_cache, group.block_table, group.seq_lens, group.query_start,
                group.query_lens, heads[0], heads[1],
                scale=self.scale, beta=prof.beta, threshold=prof.threshold, window=self.window,
                max_query_len=group.max_query_len, max_seq_len=group.max_seq_len,
            )
        return "decode" if plan.is_decode_only else "prefill"
