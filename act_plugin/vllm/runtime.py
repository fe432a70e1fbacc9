"""Per-process ACT state of a vLLM engine.

* :data:`frontend_state` lives in the process that builds the engine configuration and
  validates per-request values (``SamplingParams.extra_args["act"]``) before they reach
  the engine.
* :data:`worker_state` lives in each worker: the profiles in force, which batch row
  (persistent-batch index) asked for which profile, and the per-layer local head indices
  of each profile under this worker's tensor-parallel slice.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from act_plugin.config import ACTConfig, ACTEngineConfig

# Marks "the request did not say": it follows the engine's default profile, even when the
# default changes at runtime.
NO_REQUEST_VALUE = "__act_default__"


class FrontendState:
    def __init__(self) -> None:
        self.engine_cfg: ACTEngineConfig | None = None

    def set(self, cfg: ACTEngineConfig | None) -> None:
        self.engine_cfg = cfg


frontend_state = FrontendState()


@dataclass(frozen=True)
class TPSlice:
    """This worker's contiguous slice of the global query heads."""

    rank: int
    size: int
    num_heads: int  # global query heads
    num_layers: int

    def local_heads(self, global_heads: tuple[int, ...], num_local_heads: int) -> list[int]:
        start = self.rank * num_local_heads
        return [h - start for h in global_heads if start <= h < start + num_local_heads]


@dataclass
class WorkerState:
    engine_cfg: ACTEngineConfig = field(default_factory=ACTEngineConfig)
    version: int = 0
    tp: TPSlice | None = None
    # persistent-batch row -> raw per-request value (kept by the request router)
    rows: dict[int, Any] = field(default_factory=dict)
    _heads_cache: dict = field(default_factory=dict)
    _layers_cache: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def configure(self, engine_cfg: ACTEngineConfig) -> None:
        if self.tp is not None:
            engine_cfg.validate_for(
                {"num_hidden_layers": self.tp.num_layers, "num_attention_heads": self.tp.num_heads}
            )
        with self.lock:
            self.engine_cfg = engine_cfg
            self.version += 1
            self._heads_cache.clear()
            self._layers_cache.clear()

    def profile(self, name: str | None) -> ACTConfig | None:
        if name is None:
            return None
        return self.engine_cfg.profiles.get(name)

    def row_profiles(self, num_rows: int) -> list[str | None]:
        """Profile name of each batch row (None = uncalibrated)."""
        cfg = self.engine_cfg
        out: list[str | None] = []
        for i in range(num_rows):
            raw = self.rows.get(i, NO_REQUEST_VALUE)
            if raw == NO_REQUEST_VALUE:
                out.append(cfg.default)
                continue
            try:
                out.append(cfg.resolve_request(raw))
            except ValueError:
                # Validated in the front end; a profile removed by a later reconfiguration
                # leaves its running requests uncalibrated rather than crashing the engine.
                out.append(None)
        return out

    def calibrated_layers(self) -> frozenset[int]:
        """Layers that some profile calibrates (fast path for all other layers)."""
        key = ("layers", self.version)
        got = self._layers_cache.get(key)
        if got is None:
            got = frozenset(
                layer
                for prof in self.engine_cfg.profiles.values()
                if not prof.is_identity
                for layer in prof.heads
            )
            self._layers_cache = {key: got}
        return got

    def local_heads(self, profile: str, layer: int, num_local_heads: int, device: torch.device) -> torch.Tensor | None:
        """Local query-head indices of ``profile`` in ``layer`` for this worker (None = none)."""
        key = (self.version, profile, layer, num_local_heads, device)
        if key in self._heads_cache:
            return self._heads_cache[key]
        prof = self.engine_cfg.profiles.get(profile)
        result = None
        if prof is not None and not prof.is_identity and layer in prof.heads:
            tp = self.tp or TPSlice(0, 1, num_local_heads, layer + 1)
            global_heads = prof.resolve(max(tp.num_layers, layer + 1), tp.num_heads)[layer]
            local = tp.local_heads(global_heads, num_local_heads)
            if local:
                result = torch.tensor(local, dtype=torch.long, device=device)
        self._heads_cache[key] = result
        return result


worker_state = WorkerState()
_init_lock = threading.Lock()


def init_worker_state(vllm_config: Any) -> WorkerState:
    """Load the engine's ACT config into this worker (once per process and config)."""
    from act_plugin.vllm.engine import ADDITIONAL_CONFIG_KEY

    with _init_lock:
        if worker_state.tp is None:
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

            try:
                rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
            except (AssertionError, RuntimeError):  # parallel state not initialised (tests)
                rank, size = 0, 1
            hf = vllm_config.model_config.hf_text_config
            worker_state.tp = TPSlice(
                rank=rank, size=size, num_heads=int(hf.num_attention_heads), num_layers=int(hf.num_hidden_layers)
            )
            raw = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
            worker_state.configure(ACTEngineConfig.from_any(raw))
    return worker_state
