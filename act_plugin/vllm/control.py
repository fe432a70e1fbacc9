"""Runtime control of a running engine's ACT configuration (no restart).

    from act_plugin.vllm import control
    control.set_act_config(llm, {"beta": 0.3, "heads": {"5": [1, 2]}})
    control.get_act_config(llm)   # -> the config in force, as a dict

Works with ``vllm.LLM`` (and anything with ``collective_rpc``): every worker (each
tensor-parallel rank) switches before the call returns; requests already running use the
new profiles from their next step on.
"""

from __future__ import annotations

from typing import Any

from act_plugin.config import ACTConfigError, ACTEngineConfig
from act_plugin.vllm.runtime import frontend_state


def _rpc(llm: Any, method: str, *args: Any) -> list:
    try:
        return llm.collective_rpc(method, args=args)
    except NotImplementedError as e:
        raise ACTConfigError(
            "this engine has no ACT runtime control: start it with an ACT configuration "
            "(additional_config={'act': {...}}, an empty {} is enough)"
        ) from e


def set_act_config(llm: Any, config: Any) -> ACTEngineConfig:
    """Replace the profiles/default of a running engine; validated before any worker sees it."""
    cfg = ACTEngineConfig.from_any(config)
    model_config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    if model_config is not None:
        cfg.validate_for(model_config.hf_text_config)
    results = _rpc(llm, "act_set_config", cfg.to_dict())
    frontend_state.set(cfg)  # per-request values are validated against the new profiles
    applied = {ACTEngineConfig.from_any(r).model_dump_json() for r in results}
    if applied != {cfg.model_dump_json()}:
        raise RuntimeError(f"workers disagree on the ACT config after reconfiguration: {applied}")
    return cfg


def get_act_config(llm: Any) -> ACTEngineConfig:
    """The configuration in force (checked to be the same on every worker)."""
    results = _rpc(llm, "act_get_config")
    cfgs = [ACTEngineConfig.from_any(r) for r in results]
    if len({c.model_dump_json() for c in cfgs}) != 1:
        raise RuntimeError("workers disagree on the ACT config")
    return cfgs[0]
