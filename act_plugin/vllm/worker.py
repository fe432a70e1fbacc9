"""Worker extension: runtime control of ACT through ``LLM.collective_rpc``.

Installed as vLLM's ``worker_extension_cls`` when ACT is on; every worker (each
tensor-parallel rank) gets the same calls.
"""

from __future__ import annotations

from typing import Any

from act_plugin.config import ACTEngineConfig


class ACTWorkerExtension:
    def act_set_config(self, config: Any) -> dict:
        """Replace the engine's ACT profiles/default; returns the config now in force."""
        from act_plugin.vllm.runtime import init_worker_state

        state = init_worker_state(self.vllm_config)  # type: ignore[attr-defined]
        state.configure(ACTEngineConfig.from_any(config))
        return state.engine_cfg.to_dict()

    def act_get_config(self) -> dict:
        from act_plugin.vllm.runtime import init_worker_state

        return init_worker_state(self.vllm_config).engine_cfg.to_dict()  # type: ignore[attr-defined]
