"""Backend-independent orchestration of ACT inside a vLLM attention layer.

The native kernel computes every head of the layer first; for the configured heads the
calibrator then recomputes the output with :func:`act_plugin.core.act_attention_blocked`
from the queries and the paged KV cache and overwrites those heads. Uncalibrated heads and
layers keep the native result bit for bit.

Work is organised per step, not per token: the first calibrated layer of a forward pass
builds a :class:`StepPlan` (which rows asked for which profile; decode rows and prefill
rows in separate padded groups) and caches it on that step's attention-metadata object,
which every layer of the KV-cache group shares. Each group is one batched call into the
core maths: no Python loop over tokens, and requests never see each other's keys.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from act_plugin.kernels import calibrate_paged
from act_plugin.vllm.kv_layout import KVSplit
from act_plugin.vllm.runtime import WorkerState

_PLAN_ATTR = "_act_step_plan"


@dataclass
class SeqGroup:
    """The sequences of one profile in one step (all decode rows, or all prefill rows)."""

    profile: str
    block_table: torch.Tensor  # [G, blocks]
    seq_lens: torch.Tensor  # [G] keys of each sequence, this step's included
    query_start: torch.Tensor  # [G] first row of each sequence in the flat query
    query_lens: torch.Tensor  # [G] rows of each sequence in this step
    max_query_len: int
    max_seq_len: int


@dataclass
class StepPlan:
    version: int
    groups: list[SeqGroup]
    small: bool = True  # only decode rows: little work per layer (see _one_thread)


def _host(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.cpu()


def build_plan(state: WorkerState, metadata, device: torch.device) -> StepPlan:
    qsl = _host(metadata.query_start_loc)
    seq_lens = _host(metadata.seq_lens)  # one small copy per step on accelerators
    num_reqs = seq_lens.shape[0]
    q_lens = (qsl[1 : num_reqs + 1] - qsl[:num_reqs]).tolist()
    profiles = state.row_profiles(num_reqs)
    by_key: dict[tuple[str, bool], list[int]] = {}
    for i, (prof, ql) in enumerate(zip(profiles, q_lens)):
        if prof is None or ql <= 0:
            continue
        by_key.setdefault((prof, ql == 1), []).append(i)
    groups = []
    for (prof, _is_decode), idx_list in by_key.items():
        idx = torch.tensor(idx_list, dtype=torch.long)
        ql = torch.tensor([q_lens[i] for i in idx_list], dtype=torch.long)
        kl = seq_lens[idx].long()
        groups.append(
            SeqGroup(
                profile=prof,
                block_table=metadata.block_table.index_select(0, idx.to(metadata.block_table.device)),
                seq_lens=kl.to(device, non_blocking=True),
                query_start=qsl[idx].long().to(device, non_blocking=True),
                query_lens=ql.to(device, non_blocking=True),
                max_query_len=int(ql.max()),
                max_seq_len=int(kl.max()),
            )
        )
    small = all(g.max_query_len == 1 for g in groups)
    return StepPlan(version=state.version, groups=groups, small=small)


@contextlib.contextmanager
def _one_thread(enabled: bool):
    """Run a burst of small CPU ops on one thread.

    A decode step's calibration is a few dozen small tensor ops; on a CPU each of them is an
    OpenMP parallel region whose fork/join costs more than the op, and when any other
    process holds one of the bound cores every region waits for a descheduled thread
    (measured here: 46 ms per layer on two threads vs 3.4 ms on one, with one core busy).
    """
    if not enabled:
        yield
        return
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


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
        unsupported: str | None = None,
    ) -> None:
        self.state = state
        self.num_heads = num_heads
        self.queries_per_kv = num_heads // num_kv_heads
        self.scale = scale
        self.window = sliding_window if sliding_window and sliding_window > 0 else None
        self.kv_split = kv_split
        self.unsupported = unsupported
        self.layer_index: int | None = None

    def _layer_index(self, layer) -> int:
        if self.layer_index is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self.layer_index = extract_layer_index(layer.layer_name)
        return self.layer_index

    def apply(self, layer, query: torch.Tensor, kv_cache: torch.Tensor, metadata, output: torch.Tensor) -> None:
        """Overwrite the configured heads of ``output`` ([tokens, heads, D]) with ACT."""
        if metadata is None or kv_cache.numel() == 0:
            return
        state = self.state
        layer_idx = self._layer_index(layer)
        if layer_idx not in state.calibrated_layers():
            return
        plan = getattr(metadata, _PLAN_ATTR, None)
        if plan is None or plan.version != state.version:
            plan = build_plan(state, metadata, query.device)
            setattr(metadata, _PLAN_ATTR, plan)
        if not plan.groups:
            return
        key_cache, value_cache = self.kv_split(kv_cache)
        out = output.view(output.shape[0], self.num_heads, -1)
        with _one_thread(query.device.type == "cpu" and plan.small):
            self._apply_groups(plan, layer_idx, query, key_cache, value_cache, out)

    def _apply_groups(self, plan: StepPlan, layer_idx: int, query, key_cache, value_cache, out) -> None:
        state = self.state
        for group in plan.groups:
            heads = state.local_heads(group.profile, layer_idx, self.num_heads, query.device)
            if heads is None:
                continue
            if self.unsupported:
                raise RuntimeError(f"ACT cannot calibrate layer {layer_idx}: {self.unsupported}")
            prof = state.profile(group.profile)
            calibrate_paged(
                query, out, key_cache, value_cache, group.block_table, group.seq_lens, group.query_start,
                group.query_lens, heads, heads // self.queries_per_kv,
                scale=self.scale, beta=prof.beta, threshold=prof.threshold, window=self.window,
                max_query_len=group.max_query_len, max_seq_len=group.max_seq_len,
            )
