"""The eval config: which model, engine, arms, tasks -- validated, with clear messages.

Example (``configs/demo.yaml``)::

    name: demo
    model: smollm2-135m            # embedded model name or a model folder / hub id
    engine: {dtype: float32, max_model_len: 2048}
    arms:
      baseline: null               # required: no calibration
      act: {beta: 0.4, heads: "2-27:0,4"}   # or a path to an ACT config file
    tasks: [sst2, agnews, arc_easy]
    limit: 50                      # documents per task; 'all' (default) for the whole split

An arm that calibrates nothing (no heads, or ``beta: 1``) would run as the baseline while the
report calls it calibrated, so it is refused unless marked as a deliberate control::

    arms:
      identity: {control: true, beta: 1.0, heads: "2-27:0,4"}
      searched: {control: false, config: searched.yaml}   # 'config': a path, with arm options

Paths: calibrated arms given as paths are read relative to the eval config's folder (then
the current directory); ``data_dir`` and ``output_dir`` are relative to the current
directory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from act_plugin.config import (
    RESERVED_PROFILE_NAMES,
    ACTConfig,
    ACTConfigError,
    engine_args,
    explain_validation,
    read_config_mapping,
)

__all__ = ["EvalConfig", "load_eval_config", "BASELINE", "ALL"]

BASELINE = "baseline"
ALL: Final = "all"  # limit: every document of each task's split
# Keys of an arm mapping that are options of the arm, not of its ACT config.
_ARM_OPTIONS = ("control", "config")
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED = RESERVED_PROFILE_NAMES - {BASELINE}


class EvalConfig(BaseModel):
    """An A/B evaluation: ``baseline`` (uncalibrated) against one or more calibrated arms."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str | None = Field(None, description="label for reports (default: the config file's stem)")
    description: str | None = Field(None, description="free text shown in the report")
    model: str = Field(..., description="embedded model name (smollm2-135m), model folder or hub id")
    engine: dict[str, Any] = Field(default_factory=dict, description="vLLM engine arguments (LLM(**engine))")
    arms: dict[str, ACTConfig | None] = Field(
        ..., description="'baseline' (no calibration) plus calibrated arms: name -> ACT config (inline or path)"
    )
    controls: list[str] = Field(
        default_factory=list,
        description="arms that are deliberate controls (set by 'control: true' on an arm); only these may "
                    "calibrate nothing (no heads or beta 1)",
    )
    tasks: list[str] = Field(..., description="project tasks (sst2, arc_easy, ...), suites, or lm_eval:<task>")
    num_fewshot: int = Field(0, ge=0, description="in-context examples per prompt (k)")
    limit: int | float | Literal["all"] = Field(
        ALL, description="documents per task (int), a fraction (<1), or 'all' (null means 'all')"
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4],
                             description="few-shot seeds (k>0 runs once per seed; k=0 uses the first only)")
    data_dir: str | None = Field(None, description="offline data folder (default: $ACT_DATA_DIR, ../shared/data)")
    output_dir: str | None = Field(
        None, description="where results go (default runs/<name>; the same command resumes an interrupted run)")
    share_engine: bool = Field(True, description="one engine for all arms (per-request switch) or one per arm")
    next_token: bool = Field(True, description="score single-token answers from one prefill of the prompt")
    batch_size: int | str = Field("auto", description="requests per engine call ('auto' = all at once)")
    bootstrap_resamples: int = Field(10000, ge=100, description="paired bootstrap resamples for CIs")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="CI level")
    stats_seed: int = Field(0, description="seed of the bootstrap")

    # ----------------------------------------------------------------- validators
    @model_validator(mode="before")
    @classmethod
    def _arm_options(cls, data: Any) -> Any:
        """Move each arm's ``control`` flag into ``controls`` (the arm keeps its ACT config)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("arms"), Mapping):
            return data
        data = dict(data)
        controls = data.get("controls") or []
        if not isinstance(controls, list):
            raise ACTConfigError(f"controls must be a list of arm names, got {controls!r}")
        controls = [str(c) for c in controls]
        arms = {}
        for name, spec in data["arms"].items():
            if isinstance(spec, Mapping) and any(k in spec for k in _ARM_OPTIONS):
                spec = dict(spec)
                control = spec.pop("control", False)
                if not isinstance(control, bool):
                    raise ACTConfigError(f"arm '{name}': control must be true or false, got {control!r}")
                if control and str(name) not in controls:
                    controls.append(str(name))
                if "config" in spec:
                    if set(spec) != {"config"}:
                        raise ACTConfigError(
                            f"arm '{name}': give either 'config: PATH' or the ACT config's keys, not both "
                            f"(got {sorted(spec)})"
                        )
                    spec = spec["config"]
            arms[name] = spec
        data["arms"] = arms
        data["controls"] = controls
        return data

    @model_validator(mode="after")
    def _arms_calibrate(self) -> EvalConfig:
        unknown = [c for c in self.controls if c not in self.arms]
        if unknown:
            raise ACTConfigError(f"controls name arm(s) {unknown} that are not among the arms {list(self.arms)}")
        if BASELINE in self.controls:
            raise ACTConfigError("'baseline' is the reference, not a control arm: remove it from the controls")
        for name, act in self.calibrated_arms.items():
            if act.is_identity and name not in self.controls:
                why = "beta is 1 (no change)" if act.beta == 1.0 else "it names no heads"
                raise ACTConfigError(
                    f"arm '{name}' calibrates nothing ({why}): it would run as the baseline while the report "
                    f"calls it calibrated. Fix its ACT config, or mark it a deliberate control "
                    f"('control: true' on the arm)"
                )
        return self

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, v: Any) -> Any:
        return engine_args(v, "the eval runner (use the top-level 'model' and the 'arms')")

    @field_validator("arms", mode="before")
    @classmethod
    def _arms(cls, v: Any, info) -> Any:
        if not isinstance(v, Mapping) or not v:
            raise ACTConfigError("arms must map arm names to ACT configs, with a 'baseline' arm (null)")
        base_dir = (info.context or {}).get("base_dir") if info.context else None
        arms: dict[str, ACTConfig | None] = {}
        for name, spec in v.items():
            name = str(name)
            if not _ARM_NAME.match(name):
                raise ACTConfigError(f"arm name {name!r}: use letters, digits, '_', '-', '.' (it names files)")
            if name == BASELINE:
                if spec not in (None, False, "off", {}) and not (isinstance(spec, str) and spec.lower() == "off"):
                    raise ACTConfigError(
                        "arm 'baseline' is the uncalibrated model: give it no ACT config (baseline: null)"
                    )
                arms[name] = None
                continue
            if name.lower() in _RESERVED:
                raise ACTConfigError(f"arm name {name!r} is reserved (it means on/off/default to the engine)")
            if spec is None:
                raise ACTConfigError(f"arm '{name}' has no ACT config (only 'baseline' may be null)")
            try:
                arms[name] = _load_arm(spec, base_dir)
            except ACTConfigError as e:
                raise ACTConfigError(f"arm '{name}': {e}") from None
        if BASELINE not in arms:
            raise ACTConfigError(f"arms must include 'baseline' (the uncalibrated model); got {sorted(arms)}")
        if len(arms) < 2:
            raise ACTConfigError("arms: add at least one calibrated arm besides 'baseline'")
        return arms

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, v: Any) -> Any:
        from act_plugin.tasks import parse_task_list

        return parse_task_list(v, "(e.g. [sst2, arc_easy] or [classification])")

    @field_validator("limit", mode="before")
    @classmethod
    def _limit(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() == ALL):
            return ALL
        if isinstance(v, str):
            try:
                v = float(v) if any(c in v for c in ".eE") else int(v)
            except ValueError:
                raise ACTConfigError(
                    f"limit must be 'all', a number of documents or a fraction < 1, got {v!r}"
                ) from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ACTConfigError(
                f"limit must be 'all', a positive number of documents or a fraction < 1, got {v!r}"
            )
        if isinstance(v, float) and v >= 1:
            if not v.is_integer():
                raise ACTConfigError(f"limit {v} must be an integer count or a fraction below 1")
            return int(v)
        return v

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, list) or not v or not all(isinstance(s, int) and not isinstance(s, bool) for s in v):
            raise ACTConfigError(f"seeds must be a non-empty list of integers, got {v!r}")
        if len(set(v)) != len(v):
            raise ACTConfigError(f"seeds must be distinct, got {v}")
        return v

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ACTConfigError(f"batch_size must be 'auto' or a positive integer, got {v!r}")

    # ----------------------------------------------------------------- helpers
    @property
    def calibrated_arms(self) -> dict[str, ACTConfig]:
        return {n: c for n, c in self.arms.items() if c is not None}

    @property
    def lm_eval_limit(self) -> int | float | None:
        """``limit`` as lm-eval takes it (None = every document)."""
        return None if self.limit == ALL else self.limit

    def calibrates(self, arm: str) -> bool:
        """Whether the arm can change any output (False: baseline and no-op controls)."""
        act = self.arms[arm]
        return act is not None and not act.is_identity

    @property
    def run_seeds(self) -> list[int]:
        """Seeds actually run: all of them with few-shot examples, the first one at k = 0."""
        return list(self.seeds) if self.num_fewshot > 0 else [self.seeds[0]]

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["arms"] = {n: (c.to_dict() if c is not None else None) for n, c in self.arms.items()}
        return data


def _load_arm(spec: Any, base_dir: Path | None) -> ACTConfig:
    if isinstance(spec, (str, Path)) and not (isinstance(spec, str) and spec.strip().startswith("{")):
        p = Path(spec).expanduser()
        candidates = [p] if p.is_absolute() else ([base_dir / p] if base_dir else []) + [Path.cwd() / p]
        for c in candidates:
            if c.is_file():
                return ACTConfig.from_file(c)
        raise ACTConfigError(f"ACT config file not found: {spec} (looked in {', '.join(str(c) for c in candidates)})")
    return ACTConfig.from_any(spec)


def load_eval_config(source: str | Path | Mapping[str, Any], **overrides: Any) -> EvalConfig:
    """An :class:`EvalConfig` from a YAML/JSON file or a mapping (``overrides`` replace keys;
    ``None`` values are ignored). Errors raise :class:`ACTConfigError` with one clear message."""
    data, path = read_config_mapping(source, "eval config")
    base_dir = path.resolve().parent if path else None
    where = str(path) if path else "eval config"
    if path:
        data.setdefault("name", path.stem)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return EvalConfig.model_validate(data, context={"base_dir": base_dir})
    except ACTConfigError as e:
        raise ACTConfigError(f"{where}: {e}") from None
    except ValidationError as e:
        raise ACTConfigError(f"{where}: {explain_validation(e, EvalConfig, 'eval config')}") from None
