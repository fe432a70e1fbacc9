"""The per-step ACT plan, built where vLLM builds per-step attention metadata.

:func:`build_step_plan` runs inside the wrapped metadata builder (see
:mod:`act_plugin.vllm.backends`), once per step and KV-cache group, from vLLM's
``CommonAttentionMetadata``: which batch rows run which arm, grouped so that each group is
one call into :func:`act_plugin.kernels.calibrate_paged` per calibrated layer. Everything it
reads on the host (query offsets, sequence lengths, the batch position -> request slot map)
vLLM already keeps on the host, so building the plan copies nothing back from the device.

Groups of ``act`` arms go to :attr:`StepPlan.groups` (the ACT kernels); groups of other rules
(``first_token``, ``spans``) to :attr:`StepPlan.rule_groups`, run by the calibrator after the ACT
groups and never by the whole-layer decode path. A ``spans`` group also carries each
sequence's emphasised token ranges (:attr:`SeqGroup.span_ranges`). The sorting costs one test
per step while only ``act`` profiles are in force.

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

from act_plugin.vllm.worker_state import Arm, WorkerState

# Attribute of vLLM's per-step attention metadata that carries the step plan: the wrapped
# metadata builder sets it (act_plugin.vllm.backends), every calibrated layer reads it.
PLAN_ATTR = "act_plan"

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
    # ``spans`` groups: each sequence's emphasised token ranges, ``[G, R, 2]`` int64 padded
    # with ``(0, 0)`` (:func:`attach_span_ranges`); None for other rules.
    span_ranges: torch.Tensor | None = None


@dataclass
class StepPlan:
    groups: list[SeqGroup] = field(default_factory=list)
    # Every request of the step is in some group (no row runs without ACT): a calibrated layer
    # may then compute the whole step's attention itself (decode: one pass, see layer_calibrator.py).
    covers_step: bool = False
    # Groups of arms whose rule is not ``act`` (first_token): the calibrator runs them on the
    # native output after the ACT groups; a step with any takes no whole-layer decode.
    rule_groups: list[SeqGroup] = field(default_factory=list)

    @property
    def is_decode_only(self) -> bool:
        return all(g.max_query_len == 1 for g in self.groups)


EMPTY_PLAN = StepPlan()


def _host_array(values) -> np.ndarray:
    """A host tensor's numpy view (slicing the view, not the tensor: a torch slice costs
    microseconds); numpy arrays pass through."""
    return values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def _host_seq_lens(common) -> np.ndarray:
    num_reqs = common.num_reqs
    upper = getattr(common, "seq_lens_cpu_upper_bound", None)
    # Exact except for async speculative decoding, which the plugin refuses at start.
    if upper is not None:
        return _host_array(upper)[:num_reqs].astype(np.int64)
    seq_lens = common.seq_lens[:num_reqs]
    return (seq_lens if seq_lens.device.type == "cpu" else seq_lens.cpu()).numpy().astype(np.int64)


def build_step_plan(
    state: WorkerState, common, device: torch.device, *, head_size: int, max_heads: int
) -> StepPlan:
    """Group this step's calibrated rows by arm and kind (decode / prefill).

    Runs once per step: it works on Python ints and numpy arrays (per-element numpy scalars
    and small torch calls cost microseconds each), takes the block-table rows of a group of
    consecutive batch positions as a view, and moves nothing when the device is the CPU.
    """
    arms = state.arms
    if not arms:
        return EMPTY_PLAN
    num_reqs = common.num_reqs
    qsl = _host_array(common.query_start_loc_cpu)[: num_reqs + 1].astype(np.int64)
    q_lens = (qsl[1:] - qsl[:-1]).tolist()
    slots = _slots(common, num_reqs)
    seq_lens = None
    if state.readmitted:
        seq_lens = _host_seq_lens(common)
        state.judge_readmitted(slots, q_lens, seq_lens)
    by_key = _positions_by_arm(arms, slots, q_lens)
    if not by_key:
        return EMPTY_PLAN
    if seq_lens is None:
        seq_lens = _host_seq_lens(common)
    q_lens_np = np.asarray(q_lens, dtype=np.int64)
    budget = max_transient_bytes()
    bytes_per_key = 2 * max(1, max_heads) * head_size * 4  # gathered K and V, float32
    on_host = device.type == "cpu"
    chunks = [(arm, chunk) for arm, positions in by_key.values()
              for chunk in _chunks(positions, seq_lens, bytes_per_key, budget)]
    groups = [
        _group(arm, chunk, common.block_table_tensor, seq_lens, q_lens_np, qsl, device, on_host)
        for arm, chunk in chunks
    ]
    covered = sum(len(positions) for _, positions in by_key.values())
    if state.other_rules_in_force():
        attach_span_ranges(groups, [chunk for _, chunk in chunks], arms, slots, device, on_host)
        return StepPlan(groups=[g for g in groups if g.arm.rule == "act"], covers_step=covered == num_reqs,
                        rule_groups=[g for g in groups if g.arm.rule != "act"])
    return StepPlan(groups=groups, covers_step=covered == num_reqs)


def attach_span_ranges(groups: list[SeqGroup], chunks: list[list[int]], arms: dict[int, Arm], slots,
                       device: torch.device, on_host: bool) -> None:
    """Give each ``spans`` group its sequences' token ranges (``chunks[i]``: the batch
    positions of ``groups[i]``): every request of a spans profile emphasises its own tokens."""
    for group, chunk in zip(groups, chunks):
        if group.arm.rule != "spans":
            continue
        per_seq = [arms[slots[pos]].token_ranges for pos in chunk]
        table = np.zeros((len(per_seq), max(1, max(len(r) for r in per_seq)), 2), dtype=np.int64)
        for i, ranges in enumerate(per_seq):
            if ranges:
                table[i, : len(ranges)] = ranges
        group.span_ranges = _to(table, device, on_host)


def _slots(common, num_reqs: int):
    """Batch position -> request slot: ``req_idx`` under Model Runner V2, the identity under V1."""
    req_idx = getattr(common, "req_idx", None)
    return np.asarray(req_idx[:num_reqs], dtype=np.int64).tolist() if req_idx is not None else range(num_reqs)


def _positions_by_arm(arms: dict[int, Arm], slots, q_lens: list[int]) -> dict[tuple[str, str, bool], tuple[Arm, list]]:
    """The batch positions of calibrated rows, by (profile, settings, decode or not)."""
    by_key: dict[tuple[str, str, bool], tuple[Arm, list[int]]] = {}
    for pos, slot in enumerate(slots):
        arm = arms.get(slot)
        if arm is None:
            continue
        ql = q_lens[pos]
        if ql <= 0:
            continue
        key = (arm.profile, arm.hash, ql == 1)
        entry = by_key.get(key)
        if entry is None:
            by_key[key] = entry = (arm, [])
        entry[1].append(pos)
    return by_key


def _group(arm: Arm, chunk: list[int], block_table: torch.Tensor, seq_lens: np.ndarray, q_lens: np.ndarray,
           qsl: np.ndarray, device: torch.device, on_host: bool) -> SeqGroup:
    """One kernel call's sequences: the chunk's block-table rows, lengths and query offsets."""
    first, last = chunk[0], chunk[-1]
    rows: slice | np.ndarray
    if last - first + 1 == len(chunk):  # consecutive batch positions (the usual case)
        rows = slice(first, last + 1)
        table = block_table[first : last + 1]
    else:
        rows = np.asarray(chunk, dtype=np.int64)
        idx_t = torch.from_numpy(rows)
        table = block_table.index_select(0, idx_t if block_table.is_cpu else idx_t.to(block_table.device))
    kl, ql, qs = seq_lens[rows].copy(), q_lens[rows], qsl[:-1][rows].copy()
    return SeqGroup(
        arm=arm,
        block_table=table,
        seq_lens=_to(kl, device, on_host),
        query_start=_to(qs, device, on_host),
        query_lens=_to(ql.copy(), device, on_host),
        max_query_len=int(ql.max()),
        max_seq_len=int(kl.max()),
    )


def _to(values: np.ndarray, device: torch.device, on_host: bool) -> torch.Tensor:
    t = torch.from_numpy(values)
    return t if on_host else t.to(device, non_blocking=True)


def _chunks(positions: list[int], seq_lens: np.ndarray, bytes_per_key: int, budget: int) -> list[list[int]]:
    """Split a group so that its padded K/V copies (G x max_len keys) stay within budget."""
    if len(positions) * int(seq_lens[positions].max()) * bytes_per_key <= budget:
        return [positions]  # the usual case: one group
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
