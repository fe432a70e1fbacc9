"""Each arm's engine setting, the per-request value that picks its calibration, and the
read-back that checks the engine runs exactly the arm's calibration before a document is scored.

Every engine is told its ACT setting explicitly (a vanilla baseline engine gets ``False``), so
an exported ``ACT_CONFIG`` can never calibrate an arm; a read-back that differs from the
config is an error, never a silent change.
"""

from __future__ import annotations

import os
from typing import Any

from act_plugin.config import ACTConfig, ACTConfigError, ACTEngineConfig
from act_plugin.eval.config import BASELINE, EvalConfig, PerTaskArm

__all__ = ["engine_status", "engine_setting", "request_value", "read_back"]


def engine_status(lm: Any) -> dict[str, Any]:
    """The engine's ACT status read back from its workers (``config``: the engine config in
    force or None when ACT is off; ``preemptions``: calibrated requests preempted so far)."""
    from act_plugin.vllm.control import get_act_status

    return get_act_status(lm.model)


def engine_setting(cfg: EvalConfig, arm: str) -> Any:
    """``additional_config["act"]`` of the engine that runs ``arm``: every engine is told its
    ACT setting explicitly, so an exported ``ACT_CONFIG`` can never calibrate an arm. A
    vanilla engine (the baseline's, without a shared engine) gets ``False``: ACT off. A
    per-task arm's own engine holds its tasks' profiles with no default (requests name them)."""
    if cfg.share_engine:
        return ACTEngineConfig(profiles=cfg.engine_profiles(), default=None).to_dict()
    act = cfg.arms[arm]
    if act is None:
        return False
    if isinstance(act, PerTaskArm):
        return ACTEngineConfig(profiles=cfg.engine_profiles([arm]), default=None).to_dict()
    return ACTEngineConfig(profiles={arm: act}, default=arm).to_dict()


def request_value(cfg: EvalConfig, arm: str, task: str) -> str | None:
    """The per-request ``extra_args["act"]`` value of ``arm`` on ``task`` (None: none sent, on
    a vanilla engine). A per-task arm's task without a profile is never run, so has none."""
    if arm == BASELINE:
        return "off" if cfg.share_engine else None
    name = cfg.profile_name(arm, task)
    if name is None:
        raise ValueError(f"arm '{arm}' has no profile for task '{task}': that piece is not run")
    return name


def read_back(cfg: EvalConfig, arm: str, task: str, status: dict[str, Any]) -> dict[str, Any]:
    """The calibration of ``arm`` on ``task`` as the engine reports it, checked against the
    config: an engine that would run anything else for this (arm, task) is an error, never a
    silent change (a per-task arm is checked task by task: its requests name one profile each)."""
    raw = status.get("config")
    request = request_value(cfg, arm, task)
    who = f"arm '{arm}'" + (f", task '{task}'" if cfg.is_per_task(arm) else "")
    told = engine_setting(cfg, arm)
    calibration: ACTConfig | None = None
    if raw is not None:
        engine_cfg = ACTEngineConfig.from_any(raw)
        try:
            profile = engine_cfg.resolve_request(request)
        except ACTConfigError as e:
            raise RuntimeError(f"{who}: {e} (engine told additional_config act={told!r}). "
                               f"Refusing to report a different arm.") from None
        calibration = engine_cfg.profiles[profile] if profile is not None else None
    wanted = cfg.act_for(arm, task)
    got_hash = calibration.hash if calibration is not None else None
    want_hash = wanted.hash if wanted is not None else None
    if got_hash != want_hash:
        raise RuntimeError(
            f"{who}: the engine runs {calibration.to_dict() if calibration else 'no calibration'} for "
            f"requests with act={request!r}, but the eval config asks for "
            f"{wanted.to_dict() if wanted else 'no calibration'} (engine told additional_config act={told!r}; "
            f"ACT_CONFIG={os.environ.get('ACT_CONFIG')!r}). Refusing to report a different arm."
        )
    return {
        "act_setting": told, "request": request, "config": raw,
        "calibration": calibration.to_dict() if calibration is not None else None,
        "preemptions": status.get("preemptions"),
    }
