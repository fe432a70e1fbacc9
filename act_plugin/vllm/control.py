"""Runtime control and status of a running engine's ACT configuration (no restart).

    from act_plugin.vllm import control
    control.set_act_config(llm, {"profiles": {"x": {...}}, "default": "x"})   # vllm.LLM
    await control.aset_act_config(engine, {...})                              # AsyncLLM (vllm serve)
    control.get_act_config(llm); control.get_act_status(llm)

A change is atomic from the user's point of view: every worker (each tensor- and
pipeline-parallel rank: ``collective_rpc`` reaches all TP x PP workers) first checks the new
configuration against its model (nothing changes if any refuses); the front end then stops
accepting profiles that are going away, the workers switch (rolled back if one fails), and
only then does the front end accept the new profile names. So a request the front end
accepts always names a profile the workers hold; a request already admitted
keeps the arm it was admitted with.

The new configuration is read by the ``act`` vocabulary (:mod:`act_plugin.config.vocabulary`,
surface ``CONTROL``): an ACT config, a file, ``{"profiles": ..., "default": ...}``, or an off
keyword (``"off"``, ``False``, ...) for **no profile** -- the engine keeps its ACT set-up and
runs every request uncalibrated. A single ACT config that calibrates nothing (no heads,
``beta: 1``) is refused, as at engine start.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Generator
from typing import Any

from act_plugin.config import NO_PROFILE_SETTING, ACTConfigError, ACTEngineConfig, engine_config_from_setting
from act_plugin.config.vocabulary import Surface
from act_plugin.vllm.config_source import ADDITIONAL_CONFIG_KEY, act_explicitly_off
from act_plugin.vllm.frontend_state import frontend_state

__all__ = ["set_act_config", "aset_act_config", "get_act_config", "aget_act_config", "get_act_status",
           "aget_act_status"]

_NO_CONTROL = (
    "this engine has no ACT runtime control: start it with an ACT configuration "
    f"(additional_config={{'act': {{...}}}}; {NO_PROFILE_SETTING} for ACT ready with no profile)"
)


def _vllm_config(engine: Any) -> Any:
    inner = getattr(engine, "llm_engine", None)  # vllm.LLM
    return getattr(inner, "vllm_config", None) or getattr(engine, "vllm_config", None)


def _act_on(engine: Any) -> bool:
    cfg = _vllm_config(engine)
    if cfg is None:
        return True  # unknown kind of engine: let the RPC answer
    additional = getattr(cfg, "additional_config", None)
    return (
        isinstance(additional, dict)
        and isinstance(additional.get(ADDITIONAL_CONFIG_KEY), dict)
        and not act_explicitly_off(additional)
    )


def _validated(engine: Any, config: Any) -> ACTEngineConfig:
    if not _act_on(engine):
        raise ACTConfigError(_NO_CONTROL)
    cfg = engine_config_from_setting(config, Surface.CONTROL)
    if cfg is None:  # only the ENGINE surface reads off as None
        raise ACTConfigError(_NO_CONTROL)
    vcfg = _vllm_config(engine)
    if vcfg is not None and vcfg.model_config is not None:
        cfg.validate_for(vcfg.model_config.hf_text_config)
    return cfg


def _transition(old: ACTEngineConfig | None, new: ACTEngineConfig) -> ACTEngineConfig:
    """What the front end accepts while workers switch: profiles in both old and new."""
    keep = {n: p for n, p in new.profiles.items() if old is not None and n in old.profiles}
    return ACTEngineConfig(profiles=keep, default=new.default if new.default in keep else None)


# Each operation is written once, as a generator of RPC steps: it yields (method, args),
# receives the workers' results (or has the RPC's exception thrown into it) and returns its
# answer. _run drives it on vllm.LLM, _arun on AsyncLLM.
Steps = Generator[tuple[str, tuple], Any, Any]


def _run(engine: Any, steps: Steps, api: str) -> Any:
    return _drive(steps, lambda method, args: _sync(engine.collective_rpc(method, args=args), api))


async def _arun(engine: Any, steps: Steps) -> Any:
    done, call = _resume(steps, None, None)  # an operation may answer without any RPC
    while not done:
        try:
            result, error = await engine.collective_rpc(call[0], args=call[1]), None
        except Exception as e:  # the step may roll back (one more RPC) before re-raising
            result, error = None, e
        done, call = _resume(steps, result, error)
    return call


def _drive(steps: Steps, rpc: Callable[[str, tuple], Any]) -> Any:
    done, call = _resume(steps, None, None)  # an operation may answer without any RPC
    while not done:
        try:
            result, error = rpc(*call), None
        except TypeError:  # the sync API on an async engine: nothing was sent
            steps.close()
            raise
        except Exception as e:
            result, error = None, e
        done, call = _resume(steps, result, error)
    return call


def _resume(steps: Steps, result: Any, error: Exception | None) -> tuple[bool, Any]:
    """Hand one RPC's outcome to the operation: ``(False, next call)`` or ``(True, answer)``."""
    try:
        return False, (steps.throw(error) if error is not None else steps.send(result))
    except StopIteration as stop:
        return True, stop.value


def _sync(result: Any, api: str) -> Any:
    if inspect.isawaitable(result):
        if hasattr(result, "close"):
            result.close()
        raise TypeError(f"this engine's collective_rpc is async (AsyncLLM): use `await control.a{api}(engine, ...)`")
    return result


def _set_steps(engine: Any, config: Any) -> Steps:
    cfg = _validated(engine, config)
    old = ACTEngineConfig.from_any((yield ("act_get_config", ()))[0])
    yield ("act_check_config", (cfg.to_dict(),))  # every worker accepts, or nothing changes
    frontend_state.set(_transition(frontend_state.engine_cfg, cfg))
    try:
        results = yield ("act_set_config", (cfg.to_dict(),))
    except Exception:
        yield ("act_set_config", (old.to_dict(),))
        frontend_state.set(old)
        raise
    frontend_state.set(cfg)
    applied = {ACTEngineConfig.from_any(r).model_dump_json() for r in results}
    if applied != {cfg.model_dump_json()}:
        raise RuntimeError(f"workers disagree on the ACT config after reconfiguration: {applied}")
    return cfg


def _get_steps(engine: Any) -> Steps:
    if not _act_on(engine):
        raise ACTConfigError(_NO_CONTROL)
    return _one_config((yield ("act_get_config", ())))


_OFF_STATUS: dict[str, Any] = {
    "config": None, "runner": None, "layers": [], "preemptions": 0, "unroutable": 0, "workers": [],
}


def _status_steps(engine: Any) -> Steps:
    if not _act_on(engine):
        return copy.deepcopy(_OFF_STATUS)  # callers may change the lists they get
    results = yield ("act_status", ())
    return aggregate_status(results)


def aggregate_status(results: list[dict]) -> dict:
    """One engine status from the workers' rows (every TP x PP rank answers ``act_status``).

    ``layers``: TP rank 0's report of each pipeline stage, in layer order (each stage reports
    the layers it holds; every rank's own report is under ``workers``). Every worker sees every
    request, so the counters are one worker's (the highest, should they ever differ), not a
    sum that would count each preemption once per rank."""
    cfg = _one_config([r["config"] for r in results])
    workers = sorted(results, key=lambda r: (r.get("pp_rank", 0), r.get("tp_rank", 0)))
    layers = [row for r in workers if r.get("tp_rank", 0) == 0 for row in r["layers"]]
    return {
        "config": cfg.to_dict(),
        "runner": workers[0]["runner"],
        "layers": sorted(layers, key=lambda row: (row["layer"] is None, row["layer"] or 0)),
        "preemptions": max(r["preemptions"] for r in workers),
        "unroutable": max(r["unroutable"] for r in workers),
        "workers": workers,
    }


def _one_config(results: list) -> ACTEngineConfig:
    cfgs = [ACTEngineConfig.from_any(r) for r in results]
    if len({c.model_dump_json() for c in cfgs}) != 1:
        raise RuntimeError("workers disagree on the ACT config")
    return cfgs[0]


def set_act_config(llm: Any, config: Any) -> ACTEngineConfig:
    """Replace the profiles/default of a running ``vllm.LLM``; see the module docstring."""
    return _run(llm, _set_steps(llm, config), "set_act_config")


async def aset_act_config(engine: Any, config: Any) -> ACTEngineConfig:
    """:func:`set_act_config` for ``AsyncLLM`` (what ``vllm serve`` runs)."""
    return await _arun(engine, _set_steps(engine, config))


def get_act_config(llm: Any) -> ACTEngineConfig:
    """The configuration the workers run (checked to be the same on every worker)."""
    return _run(llm, _get_steps(llm), "get_act_config")


async def aget_act_config(engine: Any) -> ACTEngineConfig:
    return await _arun(engine, _get_steps(engine))


def get_act_status(llm: Any) -> dict:
    """What the workers run, read back from them: ``config`` (None when ACT is off), the model
    ``runner``, ``layers`` (per configured layer, from the pipeline stage holding it: attention
    type, backend, impl, calibrated, local heads per profile), ``preemptions`` of calibrated
    requests (each counted once), per-``workers`` detail (one row per TP x PP rank, with
    ``tp_rank``, ``pp_rank`` and the ``stage_layers`` it holds)."""
    return _run(llm, _status_steps(llm), "get_act_status")


async def aget_act_status(engine: Any) -> dict:
    return await _arun(engine, _status_steps(engine))
