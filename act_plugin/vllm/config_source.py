"""Where an engine's ACT configuration comes from, read in one place.

``additional_config={"act": X}`` is the engine's own setting:

* a mapping / YAML or JSON text / file path: ACT on with that configuration;
* ``False`` (or ``"off"``): ACT explicitly off. The ``ACT_CONFIG`` environment variable is
  then ignored, so a tool that wants a vanilla engine (the eval's baseline) says so and an
  exported variable cannot calibrate it.

Only when ``additional_config`` has no ``act`` key at all does ``ACT_CONFIG=file`` apply (for
tools that cannot pass engine arguments); the engine then logs that it did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from act_plugin.config import ACTEngineConfig

__all__ = ["ADDITIONAL_CONFIG_KEY", "ENV_CONFIG", "EngineSettings", "read_engine_settings", "act_explicitly_off"]

ADDITIONAL_CONFIG_KEY = "act"
ENV_CONFIG = "ACT_CONFIG"
_OFF_VALUES = (False, "off", "false", "none")


@dataclass(frozen=True)
class EngineSettings:
    """An engine's ACT configuration, parsed once, and where it came from."""

    engine_cfg: ACTEngineConfig
    source: str  # "additional_config" or "ACT_CONFIG=<path>"


def act_explicitly_off(additional_config: Any) -> bool:
    if not isinstance(additional_config, dict) or ADDITIONAL_CONFIG_KEY not in additional_config:
        return False
    value = additional_config[ADDITIONAL_CONFIG_KEY]
    return value is False or (isinstance(value, str) and value.strip().lower() in _OFF_VALUES)


def raw_setting(additional_config: Any) -> tuple[Any, str] | None:
    """The ACT configuration as given and its source; None when ACT is off."""
    if isinstance(additional_config, dict) and ADDITIONAL_CONFIG_KEY in additional_config:
        if act_explicitly_off(additional_config):
            return None
        return additional_config[ADDITIONAL_CONFIG_KEY], "additional_config"
    path = os.environ.get(ENV_CONFIG)
    if path:
        return path, f"{ENV_CONFIG}={path}"
    return None


def read_engine_settings(additional_config: Any) -> EngineSettings | None:
    raw = raw_setting(additional_config)
    if raw is None:
        return None
    value, source = raw
    return EngineSettings(engine_cfg=ACTEngineConfig.from_any(value), source=source)


def act_configured(vllm_config: Any) -> bool:
    return vllm_config is not None and raw_setting(getattr(vllm_config, "additional_config", None)) is not None
