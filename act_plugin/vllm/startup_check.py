"""Start-up check: every configured layer is calibrated, or the engine does not start.

Runs once per worker process (every tensor- and pipeline-parallel rank), after the model is
loaded (from the first ACT metadata builder; see :mod:`act_plugin.vllm.backends`). It walks
the layers vLLM registered for the forward pass, judges each with
:mod:`act_plugin.vllm.layer_support`, refuses the engine
(:class:`~act_plugin.vllm.layer_support.ACTEngineError`, naming the worker -- PP stage and TP
rank --, the layer, what vLLM chose and the setting to change) if a configured layer cannot be
calibrated, so that a request can never find it later, and tells each calibratable layer's
calibrator its layer index. Under pipeline parallelism a stage judges the configured layers it
holds (vLLM's ``get_pp_indices`` partition); the others are judged on the stage that holds
them. The report it keeps (per configured layer: attention type, backend, impl, calibrated or
not, local heads per profile) is what ``control.get_act_status`` returns.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from act_plugin.kernels import whole_prefill_enabled
from act_plugin.vllm.layer_support import check_profiles_against_layers, describe_layer
from act_plugin.vllm.worker_state import WorkerState, init_worker_state

logger = logging.getLogger("act_plugin")

__all__ = ["run_startup_check", "configured_layer_report"]

_done = False
_lock = threading.Lock()


def run_startup_check(vllm_config: Any) -> None:
    """Check every configured layer of this worker once; bind layer indices; log a summary."""
    global _done
    with _lock:
        if _done:
            return
        state = init_worker_state(vllm_config)
        whole_prefill_enabled()  # a bad ACT_WHOLE_PREFILL refuses the engine here, not in its first step
        ctx = vllm_config.compilation_config.static_forward_context
        rows = [describe_layer(name, module) for name, module in ctx.items()]
        check_profiles_against_layers(state.engine_cfg, rows, holds=state.pp.holds, where=state.where())
        _bind_calibrators(rows)
        state.layers = [{k: v for k, v in row.items() if k != "_calibrator"} for row in rows]
        _done = True
        _log_summary(state, rows)


def _bind_calibrators(rows: list[dict]) -> None:
    """Tell each calibratable layer's calibrator its index. vLLM builds an attention ``Impl``
    without the layer's name (the ``Attention`` layer registers its name only after the impl
    exists), so the name -> index mapping is first known here; a calibrator left unbound
    never calibrates."""
    for row in rows:
        calibrator = row["_calibrator"]
        if calibrator is not None and not row["unsupported"] and row["layer"] is not None:
            calibrator.bind_layer(row["layer"])


def _log_summary(state: WorkerState, rows: list[dict]) -> None:
    configured = sorted(layer for layer in state.calibrated_layers() if state.pp.holds(layer))
    backends = sorted({str(r["backend"]) for r in rows if r["layer"] in configured})
    logger.info(
        "act-plugin: start-up check passed on %s: %d configured layer(s) %s calibrated on %s; "
        "runner %s; profiles %s (default %s)",
        state.where(), len(configured), _ranges(configured), ", ".join(backends) or "-",
        state.runner, sorted(state.engine_cfg.profiles), state.engine_cfg.default,
    )


def configured_layer_report(state: WorkerState) -> list[dict]:
    """Status rows of the layers the current profiles configure, with local heads per profile."""
    configured = state.calibrated_layers()
    out = []
    for row in state.layers:
        if row["layer"] not in configured:
            continue
        heads = {}
        for name, prof in state.engine_cfg.profiles.items():
            if prof.is_identity or row["layer"] not in prof.heads:
                continue
            local = state.local_heads(prof, row["layer"], _num_local_heads(state), torch.device("cpu"))
            heads[name] = local.tolist() if local is not None else []
        out.append({**row, "local_heads": heads})
    return out


def _num_local_heads(state: WorkerState) -> int:
    from vllm.distributed import get_tensor_model_parallel_world_size  # vLLM itself

    try:
        world = get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError):
        world = 1
    assert state.tp is not None  # set by init_worker_state before any layer is reported
    return state.tp.num_heads // world


def _ranges(values: list[int]) -> str:
    if not values:
        return "[]"
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        if v is not None:
            start = prev = v
    return ",".join(parts)
