"""Where an engine's ACT configuration comes from, read in one place.

``additional_config={"act": X}`` is the engine's own setting, read through the ``act``
vocabulary (:mod:`act_plugin.config.vocabulary`, surface ``ENGINE``):

* a mapping / YAML or JSON text / file path: ACT on with that configuration (a single ACT
  config that calibrates nothing is refused; ``{"profiles": {}, "default": null}`` is ACT
  ready with no profile);
* an off keyword (``false``, ``"off"``, ``"none"``, ``"baseline"``, ``"false"``, any case):
  ACT explicitly off. The ``ACT_CONFIG`` environment variable is then ignored, so a tool that
  wants a vanilla engine (the eval's baseline) says so and an exported variable cannot
  calibrate it;
* anything else (``null``, ``true``/``"on"``, numbers, lists) is refused, naming the setting.

Only when ``additional_config`` has no ``act`` key at all does ``ACT_CONFIG=file`` apply (for
tools that cannot pass engine arguments); the engine then logs that it did. ``ACT_CONFIG=off``
(any off word) reads as the word says; a file's content must be a configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from act_plugin.config import ACTEngineConfig, engine_config_from_setting
from act_plugin.config.vocabulary import REQUEST_KEY, Kind, Surface, keyword
from act_plugin.vllm.rule_support import refuse_unserved_rules

__all__ = ["ADDITIONAL_CONFIG_KEY", "ENV_CONFIG", "EngineSettings", "read_engine_settings", "act_explicitly_off"]

ADDITIONAL_CONFIG_KEY = REQUEST_KEY
ENV_CONFIG = "ACT_CONFIG"


@dataclass(frozen=True)
class EngineSettings:
    """An engine's ACT configuration, parsed once, and where it came from."""

    engine_cfg: ACTEngineConfig
    source: str  # "additional_config" or "ACT_CONFIG=<path>"


def act_explicitly_off(additional_config: Any) -> bool:
    if not isinstance(additional_config, dict) or ADDITIONAL_CONFIG_KEY not in additional_config:
        return False
    return keyword(additional_config[ADDITIONAL_CONFIG_KEY]) is Kind.OFF


def raw_setting(additional_config: Any) -> tuple[Any, str] | None:
    """The ACT configuration as given and its source; None when ACT is off."""
    if isinstance(additional_config, dict) and ADDITIONAL_CONFIG_KEY in additional_config:
        if act_explicitly_off(additional_config):
            return None
        return additional_config[ADDITIONAL_CONFIG_KEY], "additional_config"
    path = os.environ.get(ENV_CONFIG)
    if path and keyword(path) is not Kind.OFF:  # ACT_CONFIG=off reads as the word says
        return path, f"{ENV_CONFIG}={path}"
    return None


def read_engine_settings(additional_config: Any) -> EngineSettings | None:
    raw = raw_setting(additional_config)
    if raw is None:
        return None
    value, source = raw
    where = f"additional_config '{ADDITIONAL_CONFIG_KEY}'" if source == "additional_config" else source
    engine_cfg = engine_config_from_setting(value, Surface.ENGINE, where)
    if engine_cfg is None:  # off keywords never get here (raw_setting), but the type allows it
        return None
    refuse_unserved_rules(engine_cfg, where)
    return EngineSettings(engine_cfg=engine_cfg, source=source)


def act_configured(vllm_config: Any) -> bool:
    return vllm_config is not None and raw_setting(getattr(vllm_config, "additional_config", None)) is not None
