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

A per-task arm calibrates each task with its own profile, as ``act-plugin search`` with
``per_task: true`` writes them (``{"profiles": {<task>: ACT config}, "default": null}``)::

    arms:
      baseline: null
      per_task: {profiles: smollm2_searched_profiles.yaml}     # a path, or inline:
      mine: {profiles: {sst2: {beta: 0.4, heads: "1:0"}, mr: {beta: 0.4, heads: "19:3"}}}

Task ``t`` runs with the profile named ``t`` (a project task name such as ``sst2``, or
``lm_eval:<task>``). A task without a profile runs uncalibrated in that arm: it is not run
again, its records are the baseline's (delta 0), and the start-up message, ``report.md`` and
``results.json`` say so. Profiles for tasks outside the eval are ignored (and listed at
start-up). Refused unless the arm is a control: no task of the eval has a profile, or a
profile calibrates nothing.

A ``spans`` arm (or a per-task arm's ``spans`` profile) runs on span-marked tasks only
(``boolq_spans``): each request carries its document's spans (:mod:`act_plugin.eval.prompt_spans`),
and a task whose documents mark none is refused, naming the arm and the task.

Every calibrated arm is compared with the baseline. Two calibrated arms are compared with each
other on the same documents when named in ``comparisons`` (treatment first, then reference)::

    comparisons: [[rules, act]]    # "## rules vs act" in report.md: rules minus act

A per-task arm without a profile for a task stands there as the baseline's records, so on that
task the pair compares the other arm with the baseline (the row says so). Comparisons only
change what is reported: rerunning a finished run with new ones re-uses every piece.

Paths: calibrated arms and profiles files given as paths are read relative to the eval
config's folder (then the current directory); ``data_dir`` and ``output_dir`` are relative to
the current directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from act_plugin.config import (
    ACTConfig,
    ACTConfigError,
    engine_args,
    explain_validation,
    read_config_mapping,
)
from act_plugin.eval.arms import (
    ARM_NAME,
    ARM_OPTIONS,
    BASELINE,
    RESERVED_ARM_NAMES,
    PerTaskArm,
    calibrated_arm,
    check_baseline,
    check_comparisons,
    comparison_pairs,
)
from act_plugin.eval.prompt_spans import task_marks_spans

__all__ = ["EvalConfig", "PerTaskArm", "load_eval_config", "BASELINE", "ALL"]

ALL: Final = "all"  # limit: every document of each task's split


class EvalConfig(BaseModel):
    """An A/B evaluation: ``baseline`` (uncalibrated) against one or more calibrated arms."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str | None = Field(None, description="label for reports (default: the config file's stem)")
    description: str | None = Field(None, description="free text shown in the report")
    model: str = Field(..., description="embedded model name (smollm2-135m), model folder or hub id")
    engine: dict[str, Any] = Field(default_factory=dict, description="vLLM engine arguments (LLM(**engine))")
    arms: dict[str, ACTConfig | PerTaskArm | None] = Field(
        ..., description="'baseline' (no calibration) plus calibrated arms: name -> ACT config (inline or path), "
                         "or {profiles: PATH or {task: ACT config}} for a per-task arm"
    )
    controls: list[str] = Field(
        default_factory=list,
        description="arms that are deliberate controls (set by 'control: true' on an arm); only these may "
                    "calibrate nothing (no heads or beta 1)",
    )
    comparisons: list[tuple[str, str]] = Field(
        default_factory=list,
        description="[treatment, reference] pairs of calibrated arms compared with each other on the same documents "
                    "(every arm is compared with the baseline anyway); reported only: they change no number of the "
                    "run, so adding one to a finished run re-uses every piece",
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
    data_parallel: int = Field(1, description="engine replicas scoring the documents side by side (one per GPU on "
                                              "CUDA, a block of cores each on CPU); results equal one replica's")
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
            if isinstance(spec, Mapping) and any(k in spec for k in ARM_OPTIONS):
                spec = dict(spec)
                control = spec.pop("control", False)
                if not isinstance(control, bool):
                    raise ACTConfigError(f"arm '{name}': control must be true or false, got {control!r}")
                if control and str(name) not in controls:
                    controls.append(str(name))
                if "config" in spec and "profiles" in spec:
                    raise ACTConfigError(
                        f"arm '{name}': give either 'config: PATH' (one ACT config for every task) or "
                        f"'profiles' (one ACT config per task), not both"
                    )
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
            _check_spans_tasks(name, act, self.tasks)
            if isinstance(act, PerTaskArm):
                self._check_per_task(name, act)
            elif act.is_identity and name not in self.controls:
                raise ACTConfigError(
                    f"arm '{name}' calibrates nothing ({act.identity_reason()}): it would run as the baseline while "
                    f"the report calls it calibrated. Fix its ACT config, or mark it a deliberate control "
                    f"('control: true' on the arm)"
                )
        self._check_profile_names()
        check_comparisons(self.comparisons, self.arms)
        return self

    def _check_per_task(self, name: str, arm: PerTaskArm) -> None:
        if name in self.controls:
            return  # a deliberate control may calibrate nothing (no profile, or beta 1)
        covered = [t for t in self.tasks if arm.profile(t) is not None]
        if not covered:
            raise ACTConfigError(
                f"arm '{name}': no task of this eval ({', '.join(self.tasks)}) has a profile (profiles: "
                f"{', '.join(arm.profiles) or 'none'}), so the arm would calibrate nothing. Name profiles after "
                f"the eval's tasks, add those tasks to 'tasks', or mark the arm a deliberate control "
                f"('control: true' on the arm)"
            )
        for task in covered:
            act = arm.profiles[task]
            if act.is_identity:
                raise ACTConfigError(
                    f"arm '{name}': the profile for task '{task}' calibrates nothing ({act.identity_reason()}): "
                    f"the report would call the task calibrated. Fix the profile, remove it (the task then runs "
                    f"uncalibrated, and says so), or mark the arm a deliberate control ('control: true' on the arm)"
                )

    def _check_profile_names(self) -> None:
        """Every arm's engine profile name must be unique: a shared engine holds them all."""
        seen: dict[str, str] = {}
        for name, arm, task, _ in self._engine_entries(self.calibrated_arms):
            who = f"arm '{arm}'" + (f" (task '{task}')" if task is not None else "")
            if name in seen:
                raise ACTConfigError(
                    f"{who} and {seen[name]} would both be the engine profile {name!r}; rename one of the arms"
                )
            seen[name] = who

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
        arms: dict[str, ACTConfig | PerTaskArm | None] = {}
        for name, spec in v.items():
            name = str(name)
            if not ARM_NAME.match(name):
                raise ACTConfigError(f"arm name {name!r}: use letters, digits, '_', '-', '.' (it names files)")
            if name == BASELINE:
                check_baseline(spec)
                arms[name] = None
                continue
            if name.lower() in RESERVED_ARM_NAMES:
                raise ACTConfigError(f"arm name {name!r} is reserved (it means on/off/default to the engine)")
            arms[name] = calibrated_arm(name, spec, base_dir)
        if BASELINE not in arms:
            raise ACTConfigError(f"arms must include 'baseline' (the uncalibrated model); got {sorted(arms)}")
        if len(arms) < 2:
            raise ACTConfigError("arms: add at least one calibrated arm besides 'baseline'")
        return arms

    @field_validator("comparisons", mode="before")
    @classmethod
    def _comparisons(cls, v: Any) -> Any:
        return comparison_pairs(v)

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

    @field_validator("data_parallel", mode="before")
    @classmethod
    def _data_parallel(cls, v: Any) -> Any:
        from act_plugin.vllm.placement import replica_count

        return replica_count(v)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ACTConfigError(f"batch_size must be 'auto' or a positive integer, got {v!r}")

    # ----------------------------------------------------------------- helpers
    @property
    def calibrated_arms(self) -> dict[str, ACTConfig | PerTaskArm]:
        """Every arm but the baseline (controls included)."""
        return {n: c for n, c in self.arms.items() if c is not None}

    def is_per_task(self, arm: str) -> bool:
        return isinstance(self.arms[arm], PerTaskArm)

    def act_for(self, arm: str, task: str) -> ACTConfig | None:
        """The ACT config ``arm`` runs ``task`` with (None: uncalibrated)."""
        act = self.arms[arm]
        return act.profile(task) if isinstance(act, PerTaskArm) else act

    def runs(self, arm: str, task: str) -> bool:
        """Whether (arm, task) is run. A per-task arm's task without a profile is not: an
        uncalibrated run would only reproduce the baseline's records, which it reuses."""
        act = self.arms[arm]
        return not isinstance(act, PerTaskArm) or act.profile(task) is not None

    @property
    def pieces(self) -> list[tuple[str, str]]:
        """The (arm, task) pieces that run."""
        return [(a, t) for a in self.arms for t in self.tasks if self.runs(a, t)]

    def uncalibrated_tasks(self, arm: str) -> list[str]:
        """Tasks a per-task arm has no profile for (they run uncalibrated); [] for other arms."""
        return [t for t in self.tasks if not self.runs(arm, t)]

    def profiles_outside(self, arm: str) -> list[str]:
        """A per-task arm's profiles for tasks this eval does not run (ignored)."""
        act = self.arms[arm]
        return [t for t in act.profiles if t not in self.tasks] if isinstance(act, PerTaskArm) else []

    def profile_name(self, arm: str, task: str | None) -> str | None:
        """The engine profile that runs ``arm`` on ``task``: the arm's name, or ``<arm>.<task>``
        for a per-task arm (None: the baseline, or a task without a profile)."""
        act = self.arms[arm]
        if act is None:
            return None
        if isinstance(act, PerTaskArm):
            return f"{arm}.{task}" if task is not None and act.profile(task) is not None else None
        return arm

    def engine_profiles(self, arms: Iterable[str] | None = None) -> dict[str, ACTConfig]:
        """Engine profile name -> ACT config for ``arms`` (default: every calibrated arm);
        per-task arms contribute a profile per task of this eval that has one."""
        entries = self._engine_entries(self.calibrated_arms if arms is None else arms)
        return {name: act for name, _, _, act in entries}

    def _engine_entries(self, arms: Iterable[str]) -> Iterator[tuple[str, str, str | None, ACTConfig]]:
        """(engine profile name, arm, task or None for every task, ACT config) of ``arms``."""
        for arm in arms:
            act = self.arms[arm]
            if isinstance(act, PerTaskArm):
                for task in self.tasks:
                    profile, name = act.profile(task), self.profile_name(arm, task)
                    if profile is not None and name is not None:
                        yield name, arm, task, profile
            elif act is not None:
                yield arm, arm, None, act

    def arm_notes(self) -> list[str]:
        """What each per-task arm calibrates, for the start-up message: the tasks with a
        profile, those without (uncalibrated) and profiles this eval ignores."""
        lines = []
        for arm, act in self.calibrated_arms.items():
            if not isinstance(act, PerTaskArm):
                continue
            covered = [t for t in self.tasks if self.runs(arm, t)]
            lines.append(f"arm '{arm}': per-task profiles for {', '.join(covered) or 'no task'}"
                         + (f" (from {act.source})" if act.source else ""))
            missing = self.uncalibrated_tasks(arm)
            if missing:
                lines.append(f"arm '{arm}': UNCALIBRATED (no profile) on {', '.join(missing)}: not run, the "
                             f"baseline's records stand for them (delta 0)")
            outside = self.profiles_outside(arm)
            if outside:
                lines.append(f"arm '{arm}': ignored profiles (tasks not in this eval): {', '.join(outside)}")
        return lines

    @property
    def lm_eval_limit(self) -> int | float | None:
        """``limit`` as lm-eval takes it (None = every document)."""
        return None if self.limit == ALL else self.limit

    def calibrates(self, arm: str) -> bool:
        """Whether the arm can change any output (False: baseline and no-op controls)."""
        acts = [self.act_for(arm, t) for t in self.tasks] if self.is_per_task(arm) else [self.arms[arm]]
        return any(isinstance(a, ACTConfig) and not a.is_identity for a in acts)

    @property
    def run_seeds(self) -> list[int]:
        """Seeds actually run: all of them with few-shot examples, the first one at k = 0."""
        return list(self.seeds) if self.num_fewshot > 0 else [self.seeds[0]]

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["arms"] = {n: (c.to_dict() if c is not None else None) for n, c in self.arms.items()}
        return data


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


def _check_spans_tasks(name: str, act: ACTConfig | PerTaskArm, tasks: list[str]) -> None:
    """A ``spans`` profile emphasises each document's spans, which the eval sends with every
    request (:mod:`act_plugin.eval.prompt_spans`): a task whose documents mark none would have
    every request refused by the engine, so it is refused here, before any engine starts."""
    for task in tasks:
        profile = act.profile(task) if isinstance(act, PerTaskArm) else act
        if profile is not None and profile.rule == "spans" and not task_marks_spans(task):
            where = f"arm '{name}'" + (f" (its profile for task '{task}')" if isinstance(act, PerTaskArm) else "")
            raise ACTConfigError(
                f"{where} uses the 'spans' rule, which emphasises each document's marked spans, but task '{task}' "
                f"(setting 'tasks') marks none: a spans profile needs span-marked tasks such as boolq_spans. "
                f"Run this arm on span-marked tasks only, or give it an 'act' or 'first_token' profile"
            )
