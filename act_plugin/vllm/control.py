"""Runtime control and status of a running engine's ACT configuration (no restart).

    from act_plugin.vllm import control
    control.set_act_config(llm, {"profiles": {"x": {...}}, "default": "x"})   # vllm.LLM
    await control.aset_act_config(engine, {...})                              # AsyncLLM (vllm serve)
    control.get_act_config(llm); control.get_act_status(llm)

A change is atomic from the user's point of view: every worker (each tensor-parallel rank)
first checks the new configuration against its model (nothing changes if any refuses); the
front end then stops accepting profiles that are going away, the workers switch (rolled back
if one fails), and only then does the front end accept the new profile names. So a request
the front end accepts always names a profile the workers hold; a request already admitted
keeps the arm it was admitted with.
"""

from __future__ import annotations

import inspect
from typing import Any

from act_plugin.config import ACTConfigError, ACTEngineConfig
from act_plugin.vllm.runtime import frontend_state
from act_plugin.vllm.settings import ADDITIONAL_CONFIG_KEY, act_explicitly_off

__all__ = ["set_act_config", "aset_act_config", "get_act_config", "aget_act_config", "get_act_status",
           "aget_act_status"]

_NO_CONTROL = (
    "this engine has no ACT runtime control: start it with an ACT configuration "
    "(additional_config={'act': {...}}, an empty {} is enough)"
)


def _vllm_config(engine: Any) -> Any:
    inner = getattr(engine, "llm_engine", None)  # vllm.LLM
    return getattr(inner, "vllm_config", None) or getattr(engine, "vllm_config", None)


def _act_on(engine: Any) -> bool:
    cfg = _vllm_config(engine)
    if cfg is None:
        return True  # unknown kind of engine: let the RPC answer
    additional = getattr(cfg, "additional_config", None)
    return isinstance(additional, dict) and isinstance(additional.get(ADDITIONAL_CONFIG_KEY), dict) and not act_explicitly_off(additional)


def _validated(engine: Any, config: Any) -> ACTEngineConfig:
    if not _act_on(engine):
        raise ACTConfigError(_NO_CONTROL)
    cfg = ACTEngineConfig.from_any(config)
    vcfg = _vllm_config(engine)
    if vcfg is not None and vcfg.model_config is not None:
        cfg.validate_for(vcfg.model_config.hf_text_config)
    return cfg


def _transition(old: ACTEngineConfig | None, new: ACTEngineConfig) -> ACTEngineConfig:
    """What the front end accepts while workers switch: profiles in both old and new."""
    keep = {n: p for n, p in new.profiles.items() if old is not None and n in old.profiles}
    return ACTEngineConfig(profiles=keep, default=new.default if new.default in keep else None)


def _sync(result: Any, what: str) -> Any:
    if inspect.isawaitable(result):
        if hasattr(result, "close"):
            result.close()
        raise TypeError(f"this engine's collective_rpc is async (AsyncLLM): use `await control.a{what}(engine, ...)`")
    return result


def _check_results(cfg: ACTEngineConfig, results: list) -> None:
    applied = {ACTEngineConfig.from_any(r).model_dump_json() for r in results}
    if applied != {cfg.model_dump_json()}:
        raise RuntimeError(f"workers disagree on the ACT config after reconfiguration: {applied}")


def set_act_config(llm: Any, config: Any) -> ACTEngineConfig:
    """Replace the profiles/default of a running ``vllm.LLM``; see the module docstring."""
    cfg = _validated(llm, config)
    old_results = _sync(llm.collective_rpc("act_get_config"), "set_act_config")
    old = ACTEngineConfig.from_any(old_results[0])
    _sync(llm.collective_rpc("act_check_config", args=(cfg.to_dict(),)), "set_act_config")
    frontend_state.set(_transition(frontend_state.engine_cfg, cfg))
    try:
        results = llm.collective_rpc("act_set_config", args=(cfg.to_dict(),))
    except Exception:
        llm.collective_rpc("act_set_config", args=(old.to_dict(),))
        frontend_state.set(old)
        raise
    frontend_state.set(cfg)
    _check_results(cfg, results)
    return cfg


async def aset_act_config(engine: Any, config: Any) -> ACTEngineConfig:
    """:func:`set_act_config` for ``AsyncLLM`` (what ``vllm serve`` runs)."""
    cfg = _validated(engine, config)
    old = ACTEngineConfig.from_any((await engine.collective_rpc("act_get_config"))[0])
    await engine.collective_rpc("act_check_config", args=(cfg.to_dict(),))
    frontend_state.set(_transition(frontend_state.engine_cfg, cfg))
    try:
        results = await engine.collective_rpc("act_set_config", args=(cfg.to_dict(),))
    except Exception:
        await engine.collective_rpc("act_set_config", args=(old.to_dict(),))
        frontend_state.set(old)
        raise
    frontend_state.set(cfg)
    _check_results(cfg, results)
    return cfg


def _one_config(results: list) -> ACTEngineConfig:
    cfgs = [ACTEngineConfig.from_any(r) for r in results]
    if len({c.model_dump_json() for c in cfgs}) != 1:
        raise RuntimeError("workers disagree on the ACT config")
    return cfgs[0]


def get_act_config(llm: Any) -> ACTEngineConfig:
    """The configuration the workers run (checked to be the same on every worker)."""
    if not _act_on(llm):
        raise ACTConfigError(_NO_CONTROL)
    return _one_config(_sync(llm.collective_rpc("act_get_config"), "get_act_config"))


async def aget_act_config(engine: Any) -> ACTEngineConfig:
    if not _act_on(engine):
        raise ACTConfigError(_NO_CONTROL)
    return _one_config(await engine.collective_rpc("act_get_config"))


_OFF_STATUS = {"config": None, "runner": None, "layers": [], "preemptions": 0, "unroutable": 0, "workers": []}


def _merge_status(results: list) -> dict:
    cfg = _one_config([r["config"] for r in results])
    return {
        "config": cfg.to_dict(),
        "runner": results[0]["runner"],
        "layers": results[0]["layers"],  # rank 0's report; every rank's is under "workers"
        "preemptions": sum(r["preemptions"] for r in results),
        "unroutable": sum(r["unroutable"] for r in results),
        "workers": results,
    }


def get_act_status(llm: Any) -> dict:
    """What the workers run, read back from them: ``config`` (None when ACT is off), the model
    ``runner``, ``layers`` (per configured layer: attention type, backend, impl, calibrated,
    local heads per profile), ``preemptions`` of calibrated requests, per-``workers`` detail."""
    if not _act_on(llm):
        return dict(_OFF_STATUS)
    return _merge_status(_sync(llm.collective_rpc("act_status"), "get_act_status"))


async def aget_act_status(engine: Any) -> dict:
    if not _act_on(engine):
        return dict(_OFF_STATUS)
    return _merge_status(await engine.collective_rpc("act_status"))
