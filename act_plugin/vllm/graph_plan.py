"""The step plan that full CUDA graphs read: persistent device tables, written in place.

A FULL CUDA graph replays a decode step's kernels with the pointers and launch sizes it
captured, without running the attention layers' Python. ACT's per-step plan
(:mod:`act_plugin.vllm.plan`) is host data a layer reads in Python, so a captured layer
reads instead these device tables, which the wrapped metadata builder rewrites in place
before every step (outside the graph, where vLLM rewrites its own persistent metadata):

* ``row_arm`` int32 ``[max_rows]``: each batch row's arm slot; -1 for rows of uncalibrated
  requests, of rules other than ``act``, of prefill, and for padding;
* per arm slot ``beta`` and ``tau`` float32 ``[slots]`` and ``head_flags`` int8 ``[slots,
  layers, local heads]``: the heads the arm calibrates in each layer, written once when the
  arm first shows up (a slot goes to another arm only when every slot is taken and the arm
  holding it has no row in the step). Every row runs at most one arm, so ``max_rows``
  slots always suffice.

Nothing here is sized by a data-dependent count and nothing is read back from the device.
A captured calibrated layer launches the per-row decode kernel
(:func:`act_plugin.kernels.triton_decode.decode_split_k` with ``row_arms``) after the
native kernel, on vLLM's own persistent block table, lengths and query offsets; its split
bounds come from the model's maximum length, each row's length is read on the device.
The vLLM-facing decisions (which graphs, which backends) are in
:mod:`act_plugin.vllm.backends` and :mod:`act_plugin.vllm.config_hook`.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from act_plugin.kernels import RowArms
from act_plugin.vllm.worker_state import Arm, WorkerState

__all__ = ["GRAPH_ATTR", "GraphTables", "graph_tables", "ensure_graph_tables"]

# Attribute of vLLM's attention metadata holding the step's CommonAttentionMetadata (its
# persistent block table, lengths and query offsets), for the layers a graph captures.
GRAPH_ATTR = "act_graph_common"


class GraphTables:
    """The per-row arm tables of one worker (one per process; every layer indexes them)."""

    def __init__(self, state: WorkerState, *, max_rows: int, num_layers: int, num_heads: int, max_seq_len: int,
                 device: torch.device | str) -> None:
        if max_rows <= 0 or num_layers <= 0 or num_heads <= 0:
            raise ValueError(f"graph tables need positive sizes (rows {max_rows}, layers {num_layers}, "
                             f"heads {num_heads})")
        self.state = state
        self.max_rows = max_rows
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.max_seq_len = max_seq_len  # the bound a captured launch plans its splits for
        self.slots = max_rows
        self.row_arm = torch.full((max_rows,), -1, dtype=torch.int32, device=device)
        # every row without an arm: the launch that compiles the kernel before a capture (no writes)
        self.row_off = torch.full((max_rows,), -1, dtype=torch.int32, device=device)
        self.beta = torch.ones(self.slots, dtype=torch.float32, device=device)
        self.tau = torch.ones(self.slots, dtype=torch.float32, device=device)
        self.head_flags = torch.zeros(self.slots, num_layers, num_heads, dtype=torch.int8, device=device)
        self._host_rows = np.full(max_rows, -1, dtype=np.int32)
        self._slot_of: dict[str, int] = {}  # arm hash -> slot
        self._hash_in: list[str | None] = [None] * self.slots
        self._views: dict[tuple[int, bool], RowArms] = {}

    def row_arms(self, layer: int, off: bool = False) -> RowArms:
        """The kernel's tables for ``layer`` (views of the persistent tensors: a graph captures
        their addresses, the builder rewrites their contents); ``off``: every row without an arm."""
        got = self._views.get((layer, off))
        if got is None:
            rows = self.row_off if off else self.row_arm
            got = self._views[(layer, off)] = RowArms(rows, self.beta, self.tau, self.head_flags[:, layer])
        return got

    def write_step(self, common: Any) -> None:
        """Rewrite ``row_arm`` for this step's batch (vLLM's ``CommonAttentionMetadata``)."""
        rows = self._host_rows
        rows.fill(-1)
        arms = self.state.arms
        num_reqs = min(int(common.num_reqs), self.max_rows)
        if arms:
            qsl = common.query_start_loc_cpu
            qsl = (qsl.numpy() if isinstance(qsl, torch.Tensor) else np.asarray(qsl))[: num_reqs + 1]
            decode = (qsl[1:] - qsl[:-1]) == 1
            req_idx = getattr(common, "req_idx", None)  # Model Runner V2: batch position -> request slot
            slots = np.asarray(req_idx[:num_reqs]).tolist() if req_idx is not None else range(num_reqs)
            calibrated = [(pos, arm) for pos, arm in ((p, arms.get(s)) for p, s in enumerate(slots))
                          if arm is not None and arm.rule == "act" and decode[pos]]
            in_step = {arm.hash for _, arm in calibrated}  # their slots are never given to another arm now
            for pos, arm in calibrated:
                rows[pos] = self._slot(arm, in_step)
        self.row_arm.copy_(torch.from_numpy(rows), non_blocking=True)  # pageable source: staged before return

    def _slot(self, arm: Arm, in_step: set[str]) -> int:
        slot = self._slot_of.get(arm.hash)
        if slot is not None:
            return slot
        # no more arms than rows in a step, and as many slots as rows: some slot is empty or held
        # by an arm without rows in this step
        free = [s for s, h in enumerate(self._hash_in) if h is None or h not in in_step]
        slot = next((s for s in free if self._hash_in[s] is None), free[0])
        old = self._hash_in[slot]
        if old is not None:
            del self._slot_of[old]
        self._hash_in[slot] = arm.hash
        self._slot_of[arm.hash] = slot
        self._fill(slot, arm)
        return slot

    def _fill(self, slot: int, arm: Arm) -> None:
        """The arm's beta, tau and heads per layer (stream-ordered after earlier replays)."""
        prof = arm.config
        flags = torch.zeros(self.num_layers, self.num_heads, dtype=torch.int8)
        if prof.beta != 1.0:  # beta = 1 changes nothing: no head flagged
            for layer in self.state.calibrated_layers():
                if layer < self.num_layers:
                    heads = self.state.local_heads(prof, layer, self.num_heads, torch.device("cpu"))
                    if heads is not None:
                        flags[layer, heads] = 1
        self.head_flags[slot].copy_(flags, non_blocking=True)
        self.beta[slot].fill_(float(prof.beta))
        self.tau[slot].fill_(float(prof.threshold))


_tables: GraphTables | None = None
_lock = threading.Lock()


def graph_tables() -> GraphTables | None:
    """This worker's tables, or None when no builder made them (no full decode graphs)."""
    return _tables


def ensure_graph_tables(state: WorkerState, *, max_rows: int, num_layers: int, num_heads: int, max_seq_len: int,
                        device: torch.device | str) -> GraphTables:
    """The worker's tables, made by the first builder that asks (every KV-cache group's
    builder shares them: a batch row runs the same arm in every layer)."""
    global _tables
    with _lock:
        if _tables is None:
            _tables = GraphTables(state, max_rows=max_rows, num_layers=num_layers, num_heads=num_heads,
                                  max_seq_len=max_seq_len, device=device)
            state.full_decode_graphs = True
        return _tables
