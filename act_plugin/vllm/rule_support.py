"""Which calibration rules the vLLM plugin serves, and the refusal of the others.

``act``, ``first_token`` and ``spans`` run in the engine (prefill and decode, every wrapped
backend, both model runners). ``spans`` arms carry each request's emphasised tokens: the front
end maps the request's character spans to token ranges (:mod:`act_plugin.vllm.request_spans`)
and the step plan hands them to the calibrator. A rule added to the configuration but not to
:data:`ENGINE_RULES` is refused at engine start and by runtime control, never run as a no-op.
The HF path serves every rule (:mod:`act_plugin.hf`).
"""

from __future__ import annotations

from typing import Final

from act_plugin.config import ACTConfigError, ACTEngineConfig

__all__ = ["ENGINE_RULES", "refuse_unserved_rules"]

ENGINE_RULES: Final = ("act", "first_token", "spans")


def refuse_unserved_rules(engine_cfg: ACTEngineConfig, where: str) -> None:
    """Raise ACTConfigError naming the first profile whose rule the engine does not serve."""
    for name, prof in engine_cfg.profiles.items():
        if prof.rule not in ENGINE_RULES:
            raise ACTConfigError(
                f"{where}: profile '{name}' uses rule '{prof.rule}', which the vLLM plugin does not serve yet; "
                f"it is served by the HF path (act_plugin.hf). The engine serves the rules {', '.join(ENGINE_RULES)}."
            )
