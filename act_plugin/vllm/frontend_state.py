"""The front end's ACT state: which profiles requests may name.

It lives in the process that builds the engine configuration (the config hook sets it) and
validates per-request values (``SamplingParams.extra_args["act"]``, see
:mod:`act_plugin.vllm.router`) before they reach the engine; runtime control
(:mod:`act_plugin.vllm.control`) changes it around a reconfiguration of the workers.
"""

from __future__ import annotations

from act_plugin.config import ACTEngineConfig

__all__ = ["FrontendState", "frontend_state"]


class FrontendState:
    """The front end's view: which profiles requests may name (None = ACT not configured)."""

    def __init__(self) -> None:
        self.engine_cfg: ACTEngineConfig | None = None
        self.explicitly_off = False

    def set(self, cfg: ACTEngineConfig | None, explicitly_off: bool = False) -> None:
        self.engine_cfg = cfg
        self.explicitly_off = explicitly_off


frontend_state = FrontendState()
