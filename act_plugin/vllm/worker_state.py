"""The ACT state of one vLLM worker process (:data:`worker_state`).

The profiles in force, the arm of each request slot (resolved once, when the request is
admitted, so a reconfiguration never changes the arm of a running request), the per-layer
local heads of each profile under this worker's tensor-parallel slice, the layers its
pipeline-parallel stage holds, the start-up layer report and counters. (The front end's
state is :mod:`act_plugin.vllm.frontend_state`.)

A request *slot* is where the model runner keeps a request: the persistent-batch row under
the V1 model runner, the request-state index under Model Runner V2. The routers
(:mod:`act_plugin.vllm.router`) fill :attr:`WorkerState.arms` from either runner; the step
plan (:mod:`act_plugin.vllm.plan`) maps batch positions to slots.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from act_plugin.config import ACTConfig, ACTConfigError, ACTEngineConfig
from act_plugin.vllm.config_source import ADDITIONAL_CONFIG_KEY
from act_plugin.vllm.layer_support import ACTEngineError, check_profiles_against_layers
from act_plugin.vllm.rule_support import refuse_unserved_rules

logger = logging.getLogger("act_plugin")

# Log the first preemption of a calibrated request, then every this many.
PREEMPTION_LOG_EVERY = 100


@dataclass(frozen=True)
class Arm:
    """What one request runs: a profile name and that profile's settings at admission."""

    profile: str
    config: ACTConfig
    # The settings' content hash, computed once at admission: the per-step plan and every
    # calibrated layer key on it, and hashing the settings costs tens of microseconds.
    hash: str = field(init=False, compare=False)
    rule: str = field(init=False, compare=False)  # the profile's rule, read once at admission
    # ``spans`` arms: the request's emphasised prompt tokens, half-open ``(start, end)`` ranges
    # of token positions (the front end mapped them from its character spans).
    token_ranges: tuple[tuple[int, int], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", self.config.hash)
        object.__setattr__(self, "rule", self.config.rule)

    def with_token_ranges(self, ranges: tuple[tuple[int, int], ...]) -> "Arm":
        """This arm for one request of a ``spans`` profile, with its emphasised tokens."""
        return Arm(self.profile, self.config, token_ranges=ranges)


@dataclass(frozen=True)
class TPSlice:
    """This worker's contiguous slice of the global query heads."""

    rank: int
    num_heads: int  # global query heads
    num_layers: int

    def local_heads(self, global_heads: tuple[int, ...], num_local_heads: int) -> list[int]:
        start = self.rank * num_local_heads
        return [h - start for h in global_heads if start <= h < start + num_local_heads]


@dataclass(frozen=True)
class PPStage:
    """This worker's pipeline-parallel stage, and which layers every stage holds.

    ``ranges`` are vLLM's own partition (``get_pp_indices``, which also honours
    ``VLLM_PP_LAYER_PARTITION``), ``[start, end)`` per stage, so a worker knows where a layer it
    does not hold lives. No ranges: no pipeline parallelism (this worker holds every layer)."""

    rank: int = 0
    ranges: tuple[tuple[int, int], ...] = ()

    @property
    def size(self) -> int:
        return max(1, len(self.ranges))

    @property
    def layers(self) -> tuple[int, int] | None:
        """``[start, end)`` of this stage's layers (None: every layer)."""
        return self.ranges[self.rank] if self.ranges else None

    def holds(self, layer: int) -> bool:
        own = self.layers
        return own is None or own[0] <= layer < own[1]

    def stage_of(self, layer: int) -> int | None:
        """The stage holding ``layer`` (None: no stage holds it)."""
        if not self.ranges:
            return 0
        return next((i for i, (start, end) in enumerate(self.ranges) if start <= layer < end), None)


@dataclass
class WorkerState:
    engine_cfg: ACTEngineConfig = field(default_factory=ACTEngineConfig)
    version: int = 0
    tp: TPSlice | None = None
    pp: PPStage = field(default_factory=PPStage)
    runner: str = "unknown"  # "v1" or "v2": which model runner feeds the routers
    # request slot -> its arm (slots of uncalibrated requests hold no entry)
    arms: dict[int, Arm] = field(default_factory=dict)
    # profiles removed by a reconfiguration, kept so that a request the front end admitted
    # before the removal still runs the arm it was admitted with
    retired: dict[str, ACTConfig] = field(default_factory=dict)
    preemptions: int = 0  # calibrated requests recomputed after a preemption
    # V1 runner: slot -> prompt length of a calibrated request re-added with output tokens,
    # until its next step shows whether it was preempted (see judge_readmitted)
    readmitted: dict[int, int] = field(default_factory=dict)
    unroutable: int = 0  # requests naming a profile this worker never held (a bug if > 0)
    layers: list[dict] = field(default_factory=list)  # start-up report (startup_check)
    # FULL CUDA graphs of decode steps read ACT's device tables (act_plugin.vllm.graph_plan),
    # which carry 'act' arms only: a profile of another rule is then refused.
    full_decode_graphs: bool = False
    _heads_cache: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ configuration
    def check(self, engine_cfg: ACTEngineConfig) -> None:
        """Raise ACTConfigError if this worker cannot run ``engine_cfg`` (nothing changes)."""
        refuse_unserved_rules(engine_cfg, "ACT runtime control")
        if self.full_decode_graphs:
            for name, prof in engine_cfg.profiles.items():
                if prof.rule != "act":
                    raise ACTEngineError(
                        f"{self.where()}: profile '{name}' uses rule '{prof.rule}', which ACT cannot run inside the "
                        "FULL CUDA graphs this engine captures for decode steps; start the engine with "
                        "cudagraph_mode=PIECEWISE to serve it"
                    )
        if self.tp is not None:
            engine_cfg.validate_for({"num_hidden_layers": self.tp.num_layers, "num_attention_heads": self.tp.num_heads})
        self._check_stages_hold(engine_cfg)
        # Each stage judges the configured layers it holds; the others are judged where they live.
        check_profiles_against_layers(engine_cfg, self.layers, holds=self.pp.holds, where=self.where())

    def where(self) -> str:
        """This worker's place, as messages name it: "PP stage 1 / TP rank 0"."""
        return f"PP stage {self.pp.rank} / TP rank {self.tp.rank if self.tp else 0}"

    def _check_stages_hold(self, engine_cfg: ACTEngineConfig) -> None:
        """Refuse a configured layer that no pipeline stage holds (so no stage would judge it)."""
        for name, prof in engine_cfg.profiles.items():
            for layer in prof.heads:
                if not prof.is_identity and self.pp.stage_of(layer) is None:
                    raise ACTEngineError(
                        f"{self.where()}: profile '{name}': ACT cannot calibrate layer {layer}: no pipeline stage "
                        f"holds it (stages hold layers {[list(r) for r in self.pp.ranges]}). Remove it from the "
                        "ACT configuration."
                    )

    def configure(self, engine_cfg: ACTEngineConfig) -> None:
        self.check(engine_cfg)
        with self.lock:
            for name, prof in self.engine_cfg.profiles.items():
                if name not in engine_cfg.profiles:
                    self.retired[name] = prof
            for name in engine_cfg.profiles:
                self.retired.pop(name, None)
            self.engine_cfg = engine_cfg
            self.version += 1

    # ------------------------------------------------------------------ requests
    def resolve_arm(self, value: Any) -> Arm | None:
        """The arm of a request being admitted (None = uncalibrated); ``value`` is read by the
        vocabulary (:mod:`act_plugin.config.vocabulary`), as the front end read it."""
        cfg = self.engine_cfg
        try:
            name = cfg.resolve_request(value)
        except ACTConfigError:
            retired = self.retired.get(value.strip()) if isinstance(value, str) else None
            if retired is not None:
                return Arm(value.strip(), retired)
            # The front end validates every value against profiles the workers hold
            # (control.py updates workers first), so this is a bug, not user input:
            # count and log it rather than take the engine down.
            self.unroutable += 1
            logger.error("act-plugin: request names ACT profile %r that this worker never held; "
                         "running it uncalibrated (unroutable=%d)", value, self.unroutable)
            return None
        if name is None:
            return None
        prof = cfg.profiles[name]
        return None if prof.is_identity else Arm(name, prof)

    def note_admitted(self, arm: Arm | None, resumed: bool) -> None:
        """Count calibrated requests that come back after a preemption: vLLM recomputes them
        in one prefill over prompt + output, so their later tokens see other statistics.
        Every worker sees every admission and counts it; only the first one (PP stage 0, TP
        rank 0) logs, and the status reports one worker's count, so each is counted once."""
        if arm is None or not resumed:
            return
        self.preemptions += 1
        if not self.is_first_worker():
            return
        if self.preemptions == 1 or self.preemptions % PREEMPTION_LOG_EVERY == 0:
            logger.warning(
                "act-plugin: %d calibrated request(s) preempted and recomputed so far; their later tokens are "
                "calibrated with different statistics (enlarge the KV cache to avoid preemption)",
                self.preemptions,
            )

    def judge_readmitted(self, slots: Any, q_lens: list[int], seq_lens: Any) -> None:
        """Count the re-added requests of this step that vLLM recomputes after a preemption.

        The V1 runner re-adds a request to its persistent batch both when it comes back from a
        preemption and when it merely sat out a step (pipeline parallelism interleaves
        micro-batches, so that happens every other step there); only a preempted one is
        recomputed from its first token, in one prefill (prefix caching and chunked prefill are
        off under ACT) over prompt and output."""
        for pos, slot in enumerate(slots):
            prompt_len = self.readmitted.pop(slot, None)
            if prompt_len is not None:
                seq_len = int(seq_lens[pos])
                self.note_admitted(self.arms.get(slot), resumed=q_lens[pos] == seq_len > prompt_len)
            if not self.readmitted:
                return

    def is_first_worker(self) -> bool:
        return self.pp.rank == 0 and (self.tp is None or self.tp.rank == 0)

    # ------------------------------------------------------------------ heads
    def calibrated_layers(self) -> frozenset[int]:
        """Layers that some profile (or a retired profile still in use) calibrates."""
        key = ("layers", self.version, len(self.retired))
        got = self._heads_cache.get(key)
        if got is None:
            profs = list(self.engine_cfg.profiles.values()) + list(self.retired.values())
            got = frozenset(layer for prof in profs if not prof.is_identity for layer in prof.heads)
            self._heads_cache[key] = got
        return got

    def other_rules_in_force(self) -> bool:
        """Whether some profile (or a retired one still in use) has a rule other than ``act``:
        the step plan then sorts those arms' rows apart (one test per step, not per group)."""
        key = ("rules", self.version, len(self.retired))
        got = self._heads_cache.get(key)
        if got is None:
            profs = list(self.engine_cfg.profiles.values()) + list(self.retired.values())
            got = any(prof.rule != "act" for prof in profs)
            self._heads_cache[key] = got
        return got

    def local_head_scales(
        self, prof: ACTConfig, layer: int, num_local_heads: int, device: torch.device
    ) -> torch.Tensor | None:
        """``first_token``: gamma of each of :meth:`local_heads`' heads, float32 (None = none)."""
        if prof.is_identity or layer not in prof.heads:
            return None
        tp = self.tp or TPSlice(0, num_local_heads, layer + 1)
        global_heads = prof.resolve(max(tp.num_layers, layer + 1), tp.num_heads)[layer]
        # pair each local head with its global one through the slice's own mapping
        pairs = [(g, tp.local_heads((g,), num_local_heads)) for g in global_heads]
        gammas = prof.head_scales(layer, [g for g, local in pairs if local])
        return torch.tensor(gammas, dtype=torch.float32, device=device) if gammas else None

    def local_heads(
        self, prof: ACTConfig, layer: int, num_local_heads: int, device: torch.device
    ) -> torch.Tensor | None:
        """Local query-head indices of ``prof`` in ``layer`` for this worker (None = none).
        Not cached here: each layer's calibrator keeps its own per-profile result
        (``LayerCalibrator._heads_of``), keyed by the hash the arm computed at admission."""
        if prof.is_identity or layer not in prof.heads:
            return None
        tp = self.tp or TPSlice(0, num_local_heads, layer + 1)
        global_heads = prof.resolve(max(tp.num_layers, layer + 1), tp.num_heads)[layer]
        local = tp.local_heads(global_heads, num_local_heads)
        return torch.tensor(local, dtype=torch.long, device=device) if local else None

    def status(self) -> dict:
        return {
            "config": self.engine_cfg.to_dict(),
            "runner": self.runner,
            "tp_rank": self.tp.rank if self.tp else 0,
            "pp_rank": self.pp.rank,
            "pp_size": self.pp.size,
            "stage_layers": list(self.pp.layers) if self.pp.layers is not None else None,
            "layers": self.layers,
            "preemptions": self.preemptions,
            "unroutable": self.unroutable,
            "retired_profiles": sorted(self.retired),
        }


worker_state = WorkerState()
_init_lock = threading.Lock()


def init_worker_state(vllm_config: Any) -> WorkerState:
    """Load the engine's ACT config into this worker (once per process)."""
    with _init_lock:
        if worker_state.tp is None:
            from vllm.distributed import get_tensor_model_parallel_rank  # vLLM itself, in its worker

            try:
                rank = get_tensor_model_parallel_rank()
            except (AssertionError, RuntimeError):  # parallel state not initialised (tests)
                rank = 0
            hf = vllm_config.model_config.hf_text_config
            worker_state.tp = TPSlice(
                rank=rank, num_heads=int(hf.num_attention_heads), num_layers=int(hf.num_hidden_layers)
            )
            worker_state.pp = pp_stage_of(vllm_config, int(hf.num_hidden_layers))
            worker_state.runner = "v2" if getattr(vllm_config, "use_v2_model_runner", False) else "v1"
            raw = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
            worker_state.engine_cfg = ACTEngineConfig.from_any(raw)
            worker_state.version += 1
    return worker_state


def pp_stage_of(vllm_config: Any, num_layers: int) -> PPStage:
    """This worker's pipeline stage and vLLM's layer partition (no PP: the default stage)."""
    pp_size = int(getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1) or 1)
    if pp_size == 1:
        return PPStage()
    from vllm.distributed import get_pp_group  # vLLM itself, in its worker
    from vllm.distributed.utils import get_pp_indices

    try:
        rank = get_pp_group().rank_in_group
    except (AssertionError, RuntimeError):  # parallel state not initialised (tests)
        rank = 0
    return PPStage(rank=rank, ranges=tuple(get_pp_indices(num_layers, r, pp_size) for r in range(pp_size)))
