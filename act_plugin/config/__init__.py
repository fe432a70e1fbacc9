"""ACT configuration, by job:

* :mod:`~act_plugin.config.heads`: the head grammar (``"2-27:0,4"``, ranges, ``all``);
* :mod:`~act_plugin.config.shape`: a model's layers and heads, to check configs against;
* :mod:`~act_plugin.config.act_config`: :class:`ACTConfig`, one calibration (rule, its settings, heads);
* :mod:`~act_plugin.config.rule_settings`: the ``rule`` key and each rule's settings (act: beta,
  threshold; first_token: scale; spans: alpha), other rules' keys refused by name;
* :mod:`~act_plugin.config.profiles`: :class:`ACTEngineConfig`, an engine's named profiles,
  and how an engine setting becomes one;
* :mod:`~act_plugin.config.vocabulary`: what an ``act`` value means on each surface (engine
  setting, request, runtime control, eval arm);
* :mod:`~act_plugin.config.files`: the one loader of config files;
* :mod:`~act_plugin.config.errors`: :class:`ACTConfigError` and readable validation messages.

Everything is importable from ``act_plugin.config`` directly.
"""

from act_plugin.config.act_config import ACTConfig
from act_plugin.config.errors import ACTConfigError, explain_validation
from act_plugin.config.files import engine_args, load_config_file, parse_act_file, read_config_mapping
from act_plugin.config.heads import ALL_HEADS, MAX_INDEX, parse_heads, parse_index_spec
from act_plugin.config.profiles import SINGLE_PROFILE, ACTEngineConfig, engine_config_from_setting
from act_plugin.config.shape import ModelShape, model_shape
from act_plugin.config.vocabulary import (
    DEFAULT_WORDS,
    NO_PROFILE_SETTING,
    OFF_WORDS,
    REQUEST_DEFAULT,
    REQUEST_KEY,
    REQUEST_OFF,
    RESERVED_PROFILE_NAMES,
    check_profile_name,
)

__all__ = [
    "ACTConfig", "ACTEngineConfig", "ACTConfigError", "ModelShape", "model_shape", "parse_index_spec", "parse_heads",
    "ALL_HEADS", "MAX_INDEX", "SINGLE_PROFILE", "RESERVED_PROFILE_NAMES", "REQUEST_KEY", "OFF_WORDS",
    "DEFAULT_WORDS", "REQUEST_OFF", "REQUEST_DEFAULT", "NO_PROFILE_SETTING", "check_profile_name",
    "engine_config_from_setting", "engine_args", "explain_validation", "load_config_file", "parse_act_file",
    "read_config_mapping",
]
