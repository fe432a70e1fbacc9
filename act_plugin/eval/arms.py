"""The arms of an eval config: the baseline, calibrated arms and per-task arms.

Every ``act`` value an arm holds is read through the ``act`` vocabulary (surface ARM): null
and the off words belong to the baseline alone, and 'on'/'default' name no configuration.
A calibrated arm is one ACT config (inline, or a path relative to the eval config's folder,
then the current directory) or a per-task arm (``{profiles: PATH or task -> ACT config}``,
as ``act-plugin search`` writes them with ``per_task: true``). What the arms mean together
(an arm that calibrates nothing must be a ``control``; which task runs which profile) is
judged by :class:`act_plugin.eval.config.EvalConfig`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from act_plugin.config import (
    RESERVED_PROFILE_NAMES,
    ACTConfig,
    ACTConfigError,
    ACTEngineConfig,
    parse_act_file,
)
from act_plugin.config.vocabulary import Kind, Surface, interpret
from act_plugin.tasks import get_task

__all__ = ["BASELINE", "ARM_OPTIONS", "ARM_NAME", "RESERVED_ARM_NAMES", "PerTaskArm", "check_baseline",
           "calibrated_arm", "comparison_pairs", "check_comparisons"]

BASELINE = "baseline"
# Keys of an arm mapping that are options of the arm, not of its ACT config.
ARM_OPTIONS = ("control", "config")
# Keys of a per-task arm (besides the arm option 'control').
_PER_TASK_KEYS = ("profiles", "source")
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESERVED_ARM_NAMES = RESERVED_PROFILE_NAMES - {BASELINE}


class PerTaskArm(BaseModel):
    """An arm that calibrates each task with its own ACT profile (task name -> config);
    a task without a profile runs uncalibrated in this arm."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profiles: dict[str, ACTConfig] = Field(..., description="task (project task name or lm_eval:<task>) -> "
                                                            "the ACT config that task runs with")
    source: str | None = Field(None, description="the profiles file it was read from (informational)")

    def profile(self, task: str) -> ACTConfig | None:
        """The ACT config of ``task`` (None: no profile, the task runs uncalibrated)."""
        return self.profiles.get(task)

    def hash_for(self, tasks: Iterable[str]) -> str:
        """Stable hash of the profiles these tasks run with (tasks without one count as none)."""
        payload = {t: (p.hash if (p := self.profile(t)) is not None else None) for t in tasks}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"profiles": {t: p.to_dict() for t, p in self.profiles.items()}}
        if self.source:
            out["source"] = self.source
        return out


def check_baseline(spec: Any) -> None:
    """The baseline arm takes no ACT config: null, an off keyword (the ``act`` vocabulary,
    surface ARM) or an empty mapping."""
    try:
        uncalibrated = (isinstance(spec, Mapping) and not spec) or interpret(spec, Surface.ARM).kind is Kind.OFF
    except ACTConfigError:
        uncalibrated = False
    if not uncalibrated:
        raise ACTConfigError(
            f"arm 'baseline' is the uncalibrated model: give it no ACT config (baseline: null), got {spec!r}"
        )


def calibrated_arm(name: str, spec: Any, base_dir: Path | None) -> ACTConfig | PerTaskArm:
    """A calibrated arm's ACT config through the ``act`` vocabulary (surface ARM): off words
    and null belong to the baseline alone, 'on'/'default' name no config."""
    where = f"arm '{name}'"
    if interpret(spec, Surface.ARM, where).kind is Kind.OFF:
        raise ACTConfigError(
            f"{where} has no ACT config ({spec!r} means uncalibrated, and only 'baseline' may be): give an ACT "
            f"config; for a deliberate arm that calibrates nothing, give one with 'control: true'"
        )
    try:
        return _load_arm(spec, base_dir)
    except ACTConfigError as e:
        raise ACTConfigError(f"{where}: {e}") from None


def _is_path(spec: Any) -> bool:
    return isinstance(spec, (str, Path)) and not (isinstance(spec, str) and spec.strip().startswith("{"))


def _find_file(spec: str | Path, base_dir: Path | None, kind: str) -> Path:
    """A config file named in the eval config: relative to its folder, then the current directory."""
    p = Path(spec).expanduser()
    candidates = [p] if p.is_absolute() else ([base_dir / p] if base_dir else []) + [Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return c
    raise ACTConfigError(f"{kind} file not found: {spec} (looked in {', '.join(str(c) for c in candidates)})")


def _load_arm(spec: Any, base_dir: Path | None) -> ACTConfig | PerTaskArm:
    if isinstance(spec, Mapping) and "profiles" in spec:
        return _load_per_task(spec, base_dir)
    if _is_path(spec):
        path = _find_file(spec, base_dir, "ACT config")
        data = parse_act_file(path, lambda d: d)
        if isinstance(data, Mapping) and "profiles" in data:
            # an engine config of per-task profiles read as one ACT config would fail on
            # 'profiles'; say how to use it instead
            raise ACTConfigError(
                f"{path} holds per-task profiles, not one ACT config: give the arm as '{{profiles: {spec}}}' to "
                f"calibrate each task with its own profile"
            )
        return ACTConfig.from_file(path)
    return ACTConfig.from_any(spec)


def _load_per_task(spec: Mapping[str, Any], base_dir: Path | None) -> PerTaskArm:
    """A per-task arm: ``{profiles: PATH}`` (an engine config with 'profiles', as the search
    writes it) or ``{profiles: {task: ACT config}}``; profile names are matched to task names."""
    extra = sorted(str(k) for k in spec if k not in _PER_TASK_KEYS)
    if extra:
        raise ACTConfigError(
            f"a per-task arm takes 'profiles' (a path, or task -> ACT config) and the option 'control'; got "
            f"{extra} (each profile carries its own beta and heads)"
        )
    given, source = spec["profiles"], spec.get("source")
    if _is_path(given):
        path = _find_file(given, base_dir, "profiles")
        data = parse_act_file(path, lambda d: d)
        if not isinstance(data, Mapping) or "profiles" not in data:
            raise ACTConfigError(
                f"{path} holds no 'profiles' (an engine config {{profiles: {{task: ACT config}}, default: null}}, "
                f"as 'act-plugin search' writes with per_task: true); for one ACT config on every task give "
                f"the path as the arm itself"
            )
        where, source = f"{path}: ", source or str(path)
    elif isinstance(given, Mapping):
        data, where = {"profiles": given}, ""
    else:
        raise ACTConfigError(f"profiles must be a path or a mapping task -> ACT config, got {given!r}")
    try:
        engine = ACTEngineConfig.from_any(data)
    except ACTConfigError as e:
        raise ACTConfigError(f"{where}{e}") from None
    if engine.default is not None:
        raise ACTConfigError(
            f"{where}default profile '{engine.default}': a per-task arm runs a task without a profile "
            f"uncalibrated, never with a default; set 'default: null'"
        )
    if not engine.profiles:
        raise ACTConfigError(f"{where}no profiles")
    profiles: dict[str, ACTConfig] = {}
    for name, act in engine.profiles.items():
        task = _task_name(name)
        if task in profiles:
            raise ACTConfigError(f"{where}two profiles name task '{task}'; keep one")
        profiles[task] = act
    return PerTaskArm(profiles=profiles, source=None if source is None else str(source))


def _task_name(profile: str) -> str:
    """The eval task a profile is for: its project task name (``act_sst2`` -> ``sst2``), or
    the name as given (``lm_eval:<task>``, or a name no task has: then it is never used)."""
    if profile.startswith("lm_eval:"):
        return profile
    try:
        return get_task(profile).name
    except ACTConfigError:
        return profile


def comparison_pairs(value: Any) -> list[tuple[str, str]]:
    """The ``comparisons`` setting as (treatment, reference) pairs of arm names (shape only;
    :func:`check_comparisons` judges the names against the arms). Messages go out under the
    key's name (pydantic's location)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ACTConfigError(f"must be a list of [treatment, reference] pairs of arm names "
                             f"(e.g. [[rules, act]]), got {value!r}")
    pairs = []
    for pair in value:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(a, str) for a in pair):
            raise ACTConfigError(f"each entry must be a [treatment, reference] pair of two arm names "
                                 f"(e.g. [rules, act]), got {pair!r}")
        pairs.append((pair[0], pair[1]))
    return pairs


def check_comparisons(pairs: list[tuple[str, str]], arms: Iterable[str]) -> None:
    """Refuse a ``comparisons`` pair naming an unknown arm, the baseline (every arm is
    compared with it already), one arm twice, or a pair given before (in either order: the
    mirrored pair only flips the sign of every delta)."""
    arms = list(arms)
    seen: dict[frozenset[str], tuple[str, str]] = {}
    for treatment, reference in pairs:
        shown = f"comparisons: [{treatment}, {reference}]"
        for name in (treatment, reference):
            if name == BASELINE:
                raise ACTConfigError(f"{shown}: every arm is compared with '{BASELINE}' already (its '<arm> vs "
                                     f"baseline' section); name two calibrated arms")
            if name not in arms:
                raise ACTConfigError(f"{shown}: arm '{name}' is not among the arms {arms}")
        if treatment == reference:
            raise ACTConfigError(f"{shown}: compares arm '{treatment}' with itself; name two different arms")
        key = frozenset((treatment, reference))
        if key in seen:
            first = seen[key]
            how = "twice" if first == (treatment, reference) else (
                f"after [{first[0]}, {first[1]}] (the same pair mirrored: its deltas are the same with the sign "
                f"flipped)")
            raise ACTConfigError(f"{shown} is listed {how}; give each pair once")
        seen[key] = (treatment, reference)
