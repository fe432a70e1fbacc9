"""The ``act`` vocabulary: what a value means wherever an ACT setting is given.

Four surfaces take an ``act`` value, and all of them read it here (:func:`interpret`):

* ``ENGINE``: ``additional_config={"act": X}`` (``ACT_CONFIG=file`` when that key is absent);
* ``REQUEST``: ``SamplingParams.extra_args={"act": X}``, ``vllm_xargs`` over HTTP;
* ``CONTROL``: ``act_plugin.vllm.control.set_act_config(engine, X)``;
* ``ARM``: an eval config's ``arms: {NAME: X}``.

Keywords, the same on every surface (any case, surrounding spaces ignored): **off** is
``"off"``, ``"none"``, ``"baseline"``, ``"false"``, ``false`` and ``0``; **default** is
``"on"``, ``"default"``, ``"true"``, ``true`` and ``1``. The numbers are there because vLLM's
OpenAI server delivers JSON ``true``/``false`` in ``vllm_xargs`` as ``1``/``0``; other numbers
are never keywords. Profile names equal to a keyword are refused (:data:`RESERVED_PROFILE_NAMES`):
a request could never select them.

What a value means, per surface (where a surface differs, it is because of what it sets):

============  ====================  ===================  ====================  ====================
value         ENGINE                REQUEST              CONTROL               ARM
============  ====================  ===================  ====================  ====================
off           ACT off: vanilla      uncalibrated         no profile: the       the baseline (only
              engine, ACT_CONFIG                         engine keeps its ACT  the arm named
              ignored                                    set-up, every         'baseline')
                                                         request uncalibrated
default       refused: names no     the engine's         refused               refused
              configuration         default profile
null/absent   refused (ambiguous)   the default profile  refused               the baseline
a string      file path or          a profile the        file path or          file path
              YAML/JSON text        engine holds         YAML/JSON text
a mapping     a configuration       refused: a request   a configuration       a configuration
                                    selects, never
                                    carries, a config
other         refused               refused              refused               refused
============  ====================  ===================  ====================  ====================

A configuration that calibrates nothing is judged by the surface that builds it: the
engine and runtime control refuse a single ACT config with no heads or ``beta: 1``
(:func:`act_plugin.config.profiles.engine_config_from_setting`), an eval refuses such an arm
unless it is marked ``control: true``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Any, Final

from pydantic import BaseModel

from act_plugin.config.errors import ACTConfigError

__all__ = ["REQUEST_KEY", "OFF_WORDS", "DEFAULT_WORDS", "RESERVED_PROFILE_NAMES", "NO_REQUEST_VALUE",
           "NO_PROFILE_SETTING", "Surface", "Kind", "Meaning", "keyword", "what_it_takes", "interpret",
           "request_profile",
           "normalize_request_value", "check_profile_name", "REQUEST_OFF", "REQUEST_DEFAULT"]

# The key of the ACT setting in ``additional_config`` and of a request's arm in
# ``extra_args`` / ``vllm_xargs``.
REQUEST_KEY: Final = "act"
OFF_WORDS: Final = ("off", "none", "baseline", "false")
DEFAULT_WORDS: Final = ("on", "default", "true")
# The words alone, under their older names (booleans and 0/1 are read by keyword()).
REQUEST_OFF: Final = OFF_WORDS
REQUEST_DEFAULT: Final = DEFAULT_WORDS
RESERVED_PROFILE_NAMES: Final = frozenset(OFF_WORDS + DEFAULT_WORDS)
# Marks "the request did not say": it follows the engine's default profile.
NO_REQUEST_VALUE: Final = "__act_default__"
# The engine setting "ACT ready, no profile": set up for ACT, every request uncalibrated
# until runtime control adds profiles.
NO_PROFILE_SETTING: Final = '{"profiles": {}, "default": null}'


class Surface(enum.Enum):
    """Where an ``act`` value is given; the value is how messages name the place."""

    ENGINE = "additional_config 'act'"
    REQUEST = "request"
    CONTROL = "set_act_config"
    ARM = "arm"


class Kind(enum.Enum):
    UNSET = "unset"  # a request that did not say: the engine's default profile
    OFF = "off"
    DEFAULT = "default"
    PROFILE = "profile"  # a request naming a profile
    CONFIG = "config"  # a configuration (mapping, YAML/JSON text, file path, config object)


@dataclass(frozen=True)
class Meaning:
    """What a value means on one surface; ``value`` is the profile name or the configuration."""

    kind: Kind
    value: Any = None


_WHAT_IT_TAKES = {
    Surface.ENGINE: "give an ACT config (a mapping, YAML/JSON text or a file path), "
                    '{"profiles": {NAME: ACT config}, "default": NAME or null}, or false / \'off\' for ACT off',
    Surface.CONTROL: "give an ACT config (a mapping, YAML/JSON text or a file path), "
                     '{"profiles": {NAME: ACT config}, "default": NAME or null}, or \'off\' for no profile',
    Surface.ARM: "give an ACT config (a mapping or a file path) or {profiles: ...}; only the arm 'baseline' is "
                 "uncalibrated (null / 'off')",
}


def what_it_takes(surface: Surface) -> str:
    """What a configuration surface accepts, for messages."""
    return _WHAT_IT_TAKES[surface]


def keyword(value: Any) -> Kind | None:
    """``Kind.OFF`` / ``Kind.DEFAULT`` for a keyword value, None for anything else."""
    if isinstance(value, bool):
        return Kind.DEFAULT if value else Kind.OFF
    if isinstance(value, int) and value in (0, 1):
        return Kind.DEFAULT if value else Kind.OFF
    if isinstance(value, str):
        word = value.strip().lower()
        if word in OFF_WORDS:
            return Kind.OFF
        if word in DEFAULT_WORDS:
            return Kind.DEFAULT
    return None


def interpret(value: Any, surface: Surface, where: str | None = None) -> Meaning:
    """What ``value`` means on ``surface`` (see the module's table); an
    :class:`ACTConfigError` naming the setting (``where``, default the surface's name) when it
    means nothing there."""
    if surface is Surface.REQUEST:
        return _request_meaning(value)
    return _config_meaning(value, surface, where or surface.value)


def _request_meaning(value: Any) -> Meaning:
    if value is None or (isinstance(value, str) and value == NO_REQUEST_VALUE):
        return Meaning(Kind.UNSET)
    kind = keyword(value)
    if kind is not None:
        return Meaning(kind)
    if isinstance(value, str):
        return Meaning(Kind.PROFILE, value.strip())
    raise ACTConfigError(
        f"request value for '{REQUEST_KEY}' must be a profile name, 'off', 'default', true or false; got {value!r}"
    )


def _config_meaning(value: Any, surface: Surface, where: str) -> Meaning:
    takes = _WHAT_IT_TAKES[surface]
    if value is None:
        if surface is Surface.ARM:
            return Meaning(Kind.OFF)
        raise ACTConfigError(
            f"{where}: null says neither ACT off nor a configuration; {takes}, or {NO_PROFILE_SETTING} for ACT "
            f"ready with no profile"
        )
    kind = keyword(value)
    if kind is Kind.OFF:
        return Meaning(Kind.OFF)
    if kind is Kind.DEFAULT:
        raise ACTConfigError(
            f"{where}: {value!r} means 'the default profile', which only a request can select; it names no "
            f"configuration: {takes}"
        )
    if isinstance(value, (str, PathLike, Mapping, BaseModel)):
        return Meaning(Kind.CONFIG, value)
    raise ACTConfigError(f"{where}: {takes}; got {value!r}")


def request_profile(value: Any, profiles: Mapping[str, Any], default: str | None) -> str | None:
    """The profile a request's ``act`` value selects on an engine holding ``profiles`` with
    ``default`` (None: uncalibrated). Unknown names and values of other types are refused."""
    meaning = _request_meaning(value)
    if meaning.kind in (Kind.UNSET, Kind.DEFAULT):
        return default
    if meaning.kind is Kind.OFF:
        return None
    if meaning.value in profiles:
        return str(meaning.value)
    raise ACTConfigError(
        f"unknown ACT profile {value!r} in the request (engine has {sorted(profiles)}; or use 'off' / 'default')"
    )


def normalize_request_value(value: Any) -> Any:
    """A request value with JSON booleans that arrived as 1/0 over HTTP read back as booleans."""
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    return value


def check_profile_name(name: Any) -> str:
    """``name`` if requests can select a profile by it, else an :class:`ACTConfigError`."""
    if isinstance(name, bool):  # YAML reads a key on/off/yes/no/true/false as a boolean
        raise ACTConfigError(
            f"profile name {name!r} (YAML reads on/off/yes/no/true/false as booleans) is reserved: "
            f"it means ACT {'on' if name else 'off'} in a request; rename the profile"
        )
    if not isinstance(name, str) or not name.strip():
        raise ACTConfigError(f"profile name {name!r}: use a non-empty name such as 'cls'")
    if name != name.strip():
        raise ACTConfigError(f"profile name {name!r} has surrounding spaces (requests could not select it)")
    kind = keyword(name)
    if kind is not None:
        raise ACTConfigError(
            f"profile name {name!r} is reserved: in a request it means "
            f"{'ACT off' if kind is Kind.OFF else 'the default profile'}"
            f", so this profile could never be selected; rename it "
            f"(reserved: {', '.join(sorted(RESERVED_PROFILE_NAMES))})"
        )
    return name
