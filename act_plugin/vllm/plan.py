"""The per-step ACT plan, built where vLLM builds per-step attention metadata.

:func:`build_step_plan` runs inside the wrapped metadata builder (see
:mod:`act_plugin.vllm.backends`), once per step and KV-cache group, from vLLM's
``CommonAttentionMetadata``: which batch rows run which arm, grouped so that each group is
one call into :func:`act_plugin.kernels.calibrate_paged` per calibrated layer. Everything it
reads on the host (query offsets, sequence lengths, the batch position -> request slot map)
vLLM already keeps on the host, so building the plan copies nothing back from the device.

Under Model Runner V2 ``CommonAttentionMetadata.req_idx`` maps batch positions to request
slots; under the V1 runner batch position ``i`` is persistent-batch row ``i``.

Memory: the torch reference kernel gathers each group's keys and values into padded float32
copies. Groups are split so that this stays under ``ACT_MAX_TRANSIENT_MB`` (default 256 MiB)
whatever the batch; the figure per token is ``2 * heads * head_size * 4`` bytes per
calibrated sequence-key (64 KiB per 1,000 keys for 8 heads of 128).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from act_plugin.vllm.runtime import Arm, WorkerState

MAX_TRANSIENT_ENV = "ACT_MAX_TRANSIENT_MB"
DEFAULT_MAX_TRANSIENT_MB = 256


def max_transient_bytes() -> int:
    raw = os.environ.get(MAX_TRANSIENT_ENV, "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_MAX_TRANSIENT_MB
    except ValueError:
        raise ValueError(f"{MAX_TRANSIENT_ENV}={raw!r}: expected a number of MiB") from None
    return int(mb * (1 << 20))


@dataclass
class SeqGroup:
    """Sequences of one arm in one step (all decode rows, or all prefill rows)."""

    arm: Arm
    block_table: torch.Tensor  # [G, blocks]
    seq_lens: torch.Tensor  # [G] keys of each sequence, this step's included
    query_start: torch.Tensor  # [G] first row of each sequence in the flat query
    query_lens: torch.Tensor  # [G] rows of each sequence in this step
    max_query_len: int
    max_seq_len: int


@dataclass
class StepPlan:
    groups: list[SeqGroup] = field(default_factory=list)

    @property
    def is_decode_only(self) -> bool:
        return all(g.max_query_len == 1 for g in self.groups)


EMPTY_PLAN = StepPlan()


def _host_seq_lens(common) -> np.ndarray:
    num_reqs = common.num_reqs
    upper = getattr(common, "seq_lens_cpu_upper_bound", None)
    # Exact except for async speculative decoding, which the plugin refuses at start.
    if upper is not None:
        return np.asarray(upper[:num_reqs], dtype=np.int64)
    seq_lens = common.seq_lens[:num_reqs]
    return (seq_lens if seq_lens.device.type == "cpu" else seq_lens.cpu()).numpy().astype(np.int64)


def build_step_plan(
    state: WorkerState, common, device: torch.device, *, head_size: int, max_heads: int
) -> StepPlan:
    """Group this step's calibrated rows by arm and kind (decode / prefill)."""
    arms = state.arms
    if not arms:
        return EMPTY_PLAN
    num_reqs = common.num_reqs
    qsl = np.asarray(common.query_start_loc_cpu[: num_reqs + 1], dtype=np.int64)
    q_lens = qsl[1:] - qsl[:-1]
    req_idx = getattr(common, "req_idx", None)
    slots = np.asarray(req_idx[:num_reqs], dtype=np.int64) if req_idx is not None else np.arange(num_reqs)
    by_key: dict[tuple[str, str, bool], list[int]] = {}
    arm_of: dict[tuple[str, str, bool], Arm] = {}
    for pos in range(num_reqs):
        arm = arms.get(int(slots[pos]))
        if arm is None or q_lens[pos] <= 0:
            continue
        key = (arm.profile, arm.hash, bool(q_lens[pos] == 1))
        by_key.setdefault(key, []).append(pos)
        arm_of[key] = arm
    if not by_key:
        return EMPTY_PLAN
    seq_lens = _host_seq_lens(common)
    budget = max_transient_bytes()
    bytes_per_key = 2 * max(1, max_heads) * head_size * 4  # gathered K and V, float32
    groups = []
    for key, positions in by_key.items():
        for chunk in _chunks(positions, seq_lens, bytes_per_key, budget):
            idx = np.asarray(chunk, dtype=np.int64)
            kl, ql = seq_lens[idx], q_lens[idx]
            idx_t = torch.from_numpy(idx)
            groups.append(
                SeqGroup(
                    arm=arm_of[key],
                    block_table=common.block_table_tensor.index_select(0, idx_t.to(common.block_table_tensor.device)),
                    seq_lens=torch.from_numpy(kl).to(device, non_blocking=True),
                    query_start=torch.from_numpy(qsl[idx]).to(device, non_blocking=True),
                    query_lens=torch.from_numpy(ql).to(device, non_blocking=True),
                    max_query_len=int(ql.max()),
                    max_seq_len=int(kl.max()),
                )
            )
    return StepPlan(groups=groups)


def _chunks(positions: list[int], seq_lens: np.ndarray, bytes_per_key: int, budget: int) -> list[list[int]]:
    """Split a group so that its padded K/V copies (G x max_len keys) stay within budget."""
    out: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for pos in positions:
        new_max = max(cur_max, int(seq_lens[pos]))
        if cur and (len(cur) + 1) * new_max * bytes_per_key > budget:
            out.append(cur)
            cur, new_max = [], int(seq_lens[pos])
        cur.append(pos)
        cur_max = new_max
    if cur:
        out.append(cur)
    return out
