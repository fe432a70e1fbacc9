"""What an engine holds: named ACT profiles and the one requests get by default, and how an
engine-level setting (``additional_config``, ``ACT_CONFIG``, runtime control) becomes one.

Accepted forms:

* a single ACT config (``{"beta": 0.4, "heads": {...}}``): one profile, ``act``
  (:data:`SINGLE_PROFILE`), which is also the default. As an engine setting it must calibrate
  something: with no heads or ``beta: 1`` it is refused (it would be the default profile of
  every request, calibrating nothing, while ACT still turns prefix caching off);
* ``{"profiles": {"cls": {...}, "mc": "path.yaml"}, "default": "cls"}``; ``default`` may be
  ``null``: requests are then uncalibrated unless they name a profile. Named profiles may
  calibrate nothing (an eval's ``control: true`` arm); the engine logs each one;
* ``{"profiles": {}, "default": null}``: **ACT ready, no profile** -- the engine is set up
  for ACT (scheduling, routers, runtime control) and every request runs uncalibrated until
  runtime control adds profiles. Logged at start.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from act_plugin.config.act_config import ACTConfig
from act_plugin.config.errors import ACTConfigError
from act_plugin.config.files import load_text, looks_like_path, parse_act_file
from act_plugin.config.vocabulary import (
    NO_PROFILE_SETTING,
    Kind,
    Surface,
    check_profile_name,
    interpret,
    request_profile,
    what_it_takes,
)

__all__ = ["ACTEngineConfig", "SINGLE_PROFILE", "engine_config_from_setting"]

# The profile a single ACT config becomes when given as an engine config.
SINGLE_PROFILE = "act"


class ACTEngineConfig(BaseModel):
    """Named ACT profiles and the default one (module docstring: the accepted forms).

    Profile names must not be request keywords
    (:data:`~act_plugin.config.vocabulary.RESERVED_PROFILE_NAMES`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    profiles: dict[str, ACTConfig] = Field(default_factory=dict)
    default: str | None = None

    @field_validator("profiles", mode="after")
    @classmethod
    def _profile_names(cls, v: dict[str, ACTConfig]) -> dict[str, ACTConfig]:
        for name in v:
            check_profile_name(name)
        return v

    @classmethod
    def from_any(cls, obj: Any) -> ACTEngineConfig:
        """Parse any accepted form (no keywords, no refusal of configs that calibrate
        nothing: :func:`engine_config_from_setting` applies those to engine settings)."""
        if isinstance(obj, ACTEngineConfig):
            return obj
        if isinstance(obj, ACTConfig):
            return cls(profiles={SINGLE_PROFILE: obj}, default=SINGLE_PROFILE)
        if isinstance(obj, Path) or (isinstance(obj, str) and looks_like_path(obj)):
            return parse_act_file(obj, cls.from_any)
        if isinstance(obj, str):
            obj = load_text(obj, "ACT engine config")
        if obj is None:
            return cls()
        if not isinstance(obj, Mapping):
            raise ACTConfigError(f"the 'act' engine config must be a mapping, got {type(obj).__name__}")
        if "profiles" not in obj:
            return cls.from_any(ACTConfig.from_any(obj))
        return cls._from_profiles_form(obj)

    @classmethod
    def _from_profiles_form(cls, obj: Mapping) -> ACTEngineConfig:
        extra = set(obj) - {"profiles", "default"}
        if extra:
            raise ACTConfigError(
                f"unknown key(s) {sorted(extra)} in the 'act' engine config (allowed: profiles, default)"
            )
        profiles_in = obj.get("profiles") or {}
        if not isinstance(profiles_in, Mapping):
            raise ACTConfigError("'profiles' must map a name to an ACT config")
        profiles = {}
        for name, spec in profiles_in.items():
            check_profile_name(str(name) if isinstance(name, (int, float)) and not isinstance(name, bool) else name)
            try:
                profiles[str(name)] = ACTConfig.from_any(spec)
            except ACTConfigError as e:
                raise ACTConfigError(f"profile '{name}': {e}") from None
        default = obj.get("default")
        if default is not None and default not in profiles:
            raise ACTConfigError(f"default profile '{default}' is not among the profiles {sorted(profiles)}")
        return cls(profiles=profiles, default=default)

    def validate_for(self, model_config: Any) -> None:
        for name, prof in self.profiles.items():
            try:
                prof.validate_for(model_config)
            except ACTConfigError as e:
                raise ACTConfigError(f"profile '{name}': {e}") from None

    def resolve_request(self, value: Any) -> str | None:
        """Profile name for a request's ``extra_args['act']`` value (None = uncalibrated)."""
        return request_profile(value, self.profiles, self.default)

    def calibrates_nothing_notes(self) -> list[str]:
        """What of this config calibrates nothing, one line each, for the start-up log."""
        if not self.profiles:
            return [f"ACT ready, no profile ({NO_PROFILE_SETTING}): every request runs uncalibrated until runtime "
                    f"control (act_plugin.vllm.control.set_act_config) adds profiles"]
        return [f"profile '{name}' calibrates nothing ({prof.identity_reason()}): requests that select it run "
                f"uncalibrated" for name, prof in self.profiles.items() if prof.is_identity]

    def to_dict(self) -> dict[str, Any]:
        return {"profiles": {n: p.to_dict() for n, p in self.profiles.items()}, "default": self.default}


def engine_config_from_setting(value: Any, surface: Surface = Surface.ENGINE,
                               where: str | None = None) -> ACTEngineConfig | None:
    """The engine config an engine setting (``surface`` ENGINE) or a runtime-control value
    (CONTROL) asks for, through the vocabulary: off is None for an engine (ACT off) and "no
    profile" for runtime control. A single ACT config that calibrates nothing is refused.
    ``where`` names the setting in messages (default: the surface's name)."""
    where = where or surface.value
    meaning = interpret(value, surface, where)
    if meaning.kind is Kind.OFF:
        return None if surface is Surface.ENGINE else ACTEngineConfig()
    value = meaning.value
    if isinstance(value, ACTEngineConfig):
        return value
    if isinstance(value, Path) or (isinstance(value, str) and looks_like_path(value)):
        # parse_act_file names the file in its messages
        return parse_act_file(value, lambda data: _from_data(data, surface, None))
    if isinstance(value, str):
        data = load_text(value, where)
        if not isinstance(data, Mapping):
            raise ACTConfigError(f"{where}: {value!r} is neither an existing file nor a YAML/JSON mapping; "
                                 f"{what_it_takes(surface)}")
        value = data
    return _from_data(value, surface, where)


def _from_data(data: Any, surface: Surface, where: str | None) -> ACTEngineConfig:
    """An engine config from parsed data; ``where`` prefixes messages (None: the caller does)."""
    at = f"{where}: " if where else ""
    if data is None:
        raise ACTConfigError(f"{at}no configuration: the file is empty ({NO_PROFILE_SETTING} is the setting for "
                             f"ACT ready with no profile)")
    if isinstance(data, ACTConfig) or (isinstance(data, Mapping) and "profiles" not in data):
        single = data if isinstance(data, ACTConfig) else ACTConfig.from_any(data)
        _refuse_calibrating_nothing(single, surface, at)
        return ACTEngineConfig.from_any(single)
    if not isinstance(data, Mapping):
        raise ACTConfigError(f"{at}the ACT engine config must be a mapping, got {type(data).__name__}")
    return ACTEngineConfig.from_any(data)


def _refuse_calibrating_nothing(single: ACTConfig, surface: Surface, at: str) -> None:
    reason = single.identity_reason()
    if reason is None:
        return
    consequence = (
        "yet it would be every request's default profile, and ACT would still turn prefix caching and chunked "
        "prefill off" if surface is Surface.ENGINE
        else "yet it would become every request's default profile"
    )
    off = "for ACT off, give false" if surface is Surface.ENGINE else "to run every request uncalibrated, give 'off'"
    raise ACTConfigError(
        f"{at}the ACT config calibrates nothing ({reason}), {consequence}. Name the heads to calibrate "
        f"(e.g. {{\"heads\": \"2-27:0,4\"}}, with beta below 1); for an engine ready for runtime control with no "
        f"profile yet, give {NO_PROFILE_SETTING}; {off}"
    )
