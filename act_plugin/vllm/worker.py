"""Worker extension: runtime control and status of ACT through ``collective_rpc``.

Installed as vLLM's ``worker_extension_cls`` when ACT is on; every worker (each tensor- and
pipeline-parallel rank) gets the same calls. Use :mod:`act_plugin.vllm.control` rather than
calling these directly: it checks every worker before any switches and updates the front end
only after all have.
"""

from __future__ import annotations

from typing import Any

from act_plugin.config import ACTEngineConfig
from act_plugin.vllm.startup_check import configured_layer_report
from act_plugin.vllm.worker_state import WorkerState, init_worker_state


def _state(worker: Any) -> WorkerState:
    return init_worker_state(worker.vllm_config)


class ACTWorkerExtension:
    def act_check_config(self, config: Any) -> None:
        """Raise if this worker cannot run ``config``; changes nothing."""
        _state(self).check(ACTEngineConfig.from_any(config))

    def act_set_config(self, config: Any) -> dict:
        """Replace the engine's ACT profiles/default; returns the config now in force."""
        state = _state(self)
        state.configure(ACTEngineConfig.from_any(config))
        return state.engine_cfg.to_dict()

    def act_get_config(self) -> dict:
        return _state(self).engine_cfg.to_dict()

    def act_profiling(self, on: bool) -> dict:
        """Switch this worker's host-time accounting of the calibration on or off; returns
        what it accumulated since the last switch (:mod:`act_plugin.vllm.profiling`)."""
        from act_plugin.vllm.profiling import set_profiling

        return set_profiling(bool(on))

    def act_status(self) -> dict:
        state = _state(self)
        status = state.status()
        status["layers"] = configured_layer_report(state)
        return status
