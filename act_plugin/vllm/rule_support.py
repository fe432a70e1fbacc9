"""Which calibration rules the vLLM plugin serves, and the refusal of the others.

``act`` and ``first_token`` run in the engine (prefill and decode, every wrapped backend).
``spans`` needs each request's emphasised tokens (character spans mapped to tokens in the
front end and handed to the worker), which the engine does not carry yet: an engine setting
or a runtime reconfiguration with a ``spans`` profile is refused, never run as a no-op. The
HF path serves every rule (:mod:`act_plugin.hf`).
"""

from __future__ import annotations

from typing import Final

from act_plugin.config import ACTConfigError, ACTEngineConfig

__all__ = ["ENGINE_RULES", "refuse_unserved_rules"]

ENGINE_RULES: Final = ("act", "first_token")


def refuse_unserved_rules(engine_cfg: ACTEngineConfig, where: str) -> None:
    """Raise ACTConfigError naming the first profile whose rule the engine does not serve."""
    for name, prof in engine_cfg.profiles.items():
        if prof.rule not in ENGINE_RULES:
            raise ACTConfigError(
                f"{where}: profile '{name}' uses rule '{prof.rule}', which the vLLM plugin does not serve yet "
                f"(requests cannot mark their spans through the engine); it is served by the HF path only for now "
                f"(act_plugin.hf, ACTHandle.set_emphasis). The engine serves the rules {', '.join(ENGINE_RULES)}."
            )
