"""``results.json`` of an A/B evaluation, as a typed model (schema ``act-plugin/eval-results`` v2).

The JSON schema generated from :class:`EvalResults` is committed at
``docs/eval_results.schema.json`` (``python -m act_plugin.eval.results > docs/eval_results.schema.json``;
a test checks it is current). Keys are only ever added within a schema version.

Accuracies and deltas are fractions (0.1 = 10 points). ``tasks.*.comparisons`` are an arm minus
the baseline over the same documents, top-level ``comparisons`` one calibrated arm minus another
(see :mod:`act_plugin.stats`). Floats that cannot be
computed (NaN) are written as ``null``.

Changes from v1: each arm records what the engine was told and what it read back
(``arms.*.engine``) and whether it is a control; comparisons carry the minimum detectable
effect (``mde``) and whether the observed delta is resolved at that n; ``settings.limit``
is ``"all"`` instead of ``null``; ``warnings`` lists what the report warns about; the
lm-eval output moved to ``lm_eval_raw.json`` only (``{arm: {task: {seed: ...}}}``).

Added within v2: per-task arms (each task calibrated with its own profile): ``arms.*.per_task``
and ``arms.*.tasks`` (per task: its profile or null, whether it was calibrated, the engine
read-back); ``tasks.*.comparisons.*.calibrated`` (false: the arm has no profile for the task,
so its records are the baseline's and the delta is 0); ``summary.*.uncalibrated_tasks``.
The minimum detectable effect (``mde``) is computed from the exact power of McNemar's test
(:mod:`act_plugin.stats`) instead of a normal approximation: same keys, and ``null`` now also
when no effect is resolvable at the n (e.g. too few discordant documents).
``comparisons``: the config's pairs of calibrated arms (``[treatment, reference]``), each with
per-task statistics (``tasks``: the same keys as ``tasks.*.comparisons``, the reference in the
baseline's place, plus whether each arm was calibrated on the task) and the mean over tasks
(``summary``); empty when the config names none.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SCHEMA", "SCHEMA_VERSION", "EvalResults", "ArmResult", "ArmTaskResult", "EngineArm", "TaskResult",
           "PairedStats", "ComparisonResult", "MeanOverTasks", "ArmSummary", "PairTaskResult", "PairSummary",
           "PairComparison", "json_schema"]

SCHEMA: Final = "act-plugin/eval-results"
SCHEMA_VERSION: Final = 2


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")


class Versions(_Model):
    act_plugin: str
    lm_eval: str
    vllm: str
    torch: str
    python: str


class ModelInfo(_Model):
    name: str = Field(description="as given in the eval config")
    path: str = Field(description="the model folder or hub id the engine loaded")


class Scoring(_Model):
    next_token: bool
    note: str


class Settings(_Model):
    num_fewshot: int
    limit: int | float | Literal["all"] = Field(description="documents per task, a fraction, or 'all'")
    seeds: list[int] = Field(description="few-shot seeds run (the first only at k = 0)")
    data_dir: str
    data_dir_source: str
    bootstrap_resamples: int
    confidence: float
    stats_seed: int
    mde_alpha: float = Field(description="two-sided alpha at which the minimum detectable effect is stated")
    mde_power: float = Field(description="power at which the minimum detectable effect is stated")


class EngineArm(_Model):
    """What the engine was told for an arm and what it reported back."""

    act_setting: Any = Field(description="the engine's additional_config['act'] as the runner set it "
                                         "(false: ACT explicitly off, so ACT_CONFIG is ignored)")
    request: str | None = Field(description="the per-request extra_args['act'] value sent (null: none sent)")
    config: dict[str, Any] | None = Field(
        description="the engine ACT config in force, read back from the engine (null: ACT off)")
    calibration: dict[str, Any] | None = Field(
        description="the ACT config this arm's requests ran with, resolved from the read-back config "
                    "(null: uncalibrated); checked to equal the arm's config")
    preemptions: int | None = Field(
        description="calibrated requests the engine preempted while this arm ran (recomputed with "
                    "different sink statistics); null when the engine does not count them")


class ArmTaskResult(_Model):
    """A per-task arm on one task: the profile it ran with, or none."""

    calibrated: bool = Field(description="false: the arm has no profile for this task, so the task was not run "
                                         "in this arm; its records are the baseline's (delta 0)")
    profile: str | None = Field(description="the engine profile the task's requests named (null: not run)")
    act: dict[str, Any] | None = Field(description="the task's profile (null: no profile, uncalibrated)")
    act_hash: str | None
    engine: EngineArm | None = Field(description="what the engine was told and read back for this task "
                                                 "(null: not run)")


class ArmResult(_Model):
    baseline: bool
    control: bool = Field(description="marked a deliberate control in the config")
    calibrates: bool = Field(description="false for the baseline and for arms with no heads or beta 1 "
                                         "(a per-task arm: on every task it has a profile for)")
    act: dict[str, Any] | None = Field(description="the arm's ACT config (null for the baseline and for a "
                                                   "per-task arm: see 'tasks')")
    act_hash: str | None = Field(description="hash of the ACT config (a per-task arm: of its tasks' profiles)")
    engine: EngineArm = Field(description="the engine read-back (a per-task arm: its first calibrated task's, "
                                          "every task's in 'tasks')")
    wall_time_s: float | None = Field(description="time spent scoring this arm (all its tasks and seeds)")
    preemptions: int | None = Field(description="sum over the arm's tasks (null: not counted)")
    documents: int = Field(description="scored (document, seed) pairs over all tasks (a per-task arm's tasks "
                                       "without a profile count the baseline's)")
    per_task: bool = Field(False, description="each task calibrated with its own profile ('tasks')")
    tasks: dict[str, ArmTaskResult] | None = Field(
        None, description="per-task arm: task -> its profile and whether it was calibrated (null: other arms)")


class PairedStats(_Model):
    """Two arms' per-document correctness compared on the same documents: the treatment (an arm)
    against the reference (the baseline in ``tasks.*.comparisons``; the pair's reference arm in
    ``comparisons``)."""

    n: int
    seeds: int
    base_acc: float | None = Field(description="the reference's accuracy (the baseline's in tasks.*.comparisons)")
    treat_acc: float | None = Field(description="the treatment's accuracy")
    delta: float | None = Field(description="treatment minus reference")
    ci_low: float | None
    ci_high: float | None
    confidence: float
    improved: int = Field(description="(document, seed) pairs: reference wrong -> treatment right")
    worsened: int = Field(description="(document, seed) pairs: reference right -> treatment wrong")
    both_correct: int
    both_wrong: int
    docs_better: int
    docs_worse: int
    p_value: float = Field(description="exact McNemar (one seed) / sign test over documents (several)")
    p_value_midp: float
    discordant_rate: float = Field(description="(docs_better + docs_worse) / n")
    mde: float | None = Field(description="minimum detectable |delta| at this n: the smallest change the exact "
                                             "McNemar test at settings.mde_alpha detects with power "
                                             "settings.mde_power (power computed exactly) at the observed "
                                             "discordant rate; null when no document changed or when no change "
                                             "reaches that power at this n")
    resolved: bool = Field(description="false when the delta is not 0 and this n cannot resolve it: |delta| < mde, "
                                       "no mde, or too few discordant documents for the exact test to reach "
                                       "p < settings.mde_alpha (the warnings say which)")


class ComparisonResult(PairedStats):
    """An arm (the treatment) against the baseline (the reference) on one task."""

    calibrated: bool = Field(True, description="false: a per-task arm with no profile for this task ran it "
                                               "uncalibrated; its records are the baseline's (not re-run), delta 0")


class PairTaskResult(PairedStats):
    """One task of a ``comparisons`` pair: the treatment arm against the reference arm."""

    treatment_calibrated: bool = Field(description="false: the treatment (a per-task arm) has no profile for this "
                                                   "task; the baseline's records stand for it")
    reference_calibrated: bool = Field(description="false: the reference (a per-task arm) has no profile for this "
                                                   "task; the baseline's records stand for it")


class TaskResult(_Model):
    lm_eval_task: str
    metric: str
    n: int
    num_fewshot: int
    seeds: list[int]
    accuracy: dict[str, float | None] = Field(description="arm -> mean over seeds and documents")
    accuracy_per_seed: dict[str, dict[str, float | None]]
    lm_eval: dict[str, dict[str, dict[str, float | None]]] = Field(
        description="arm -> seed -> lm-eval's numeric metrics as it reported them")
    samples: dict[str, str] = Field(description="arm -> per-sample file name")
    comparisons: dict[str, ComparisonResult] = Field(description="arm (not the baseline) -> comparison")


class MeanOverTasks(_Model):
    """A treatment's mean delta over tasks against its reference (unweighted; task-stratified
    bootstrap CI) and its flips."""

    mean_delta: float | None
    ci_low: float | None
    ci_high: float | None
    tasks_up: int
    tasks_down: int
    improved: int
    worsened: int


class ArmSummary(MeanOverTasks):
    uncalibrated_tasks: list[str] = Field(
        default_factory=list, description="tasks the arm ran uncalibrated (a per-task arm without a profile for "
                                          "them): delta 0, included in the mean")


class PairSummary(MeanOverTasks):
    treatment_uncalibrated_tasks: list[str] = Field(
        description="tasks the treatment ran uncalibrated (the baseline's records), included in the mean")
    reference_uncalibrated_tasks: list[str] = Field(
        description="tasks the reference ran uncalibrated (the baseline's records), included in the mean")


class PairComparison(_Model):
    """A ``comparisons`` pair of the config: the treatment arm minus the reference arm."""

    treatment: str
    reference: str
    tasks: dict[str, PairTaskResult] = Field(description="task -> the pair's comparison on it")
    summary: PairSummary = Field(description="the mean over tasks")


class Files(_Model):
    report: str = "report.md"
    chart: str = "deltas.png"
    config: str = "config.yaml"
    lm_eval_raw: str = "lm_eval_raw.json"
    run_state: str = "run_state.json"


class EvalResults(_Model):
    """Everything an A/B evaluation produced except the per-sample rows (in ``samples_*.jsonl``)."""

    schema_: Literal["act-plugin/eval-results"] = Field(SCHEMA, alias="schema")
    schema_version: Literal[2] = SCHEMA_VERSION
    name: str | None
    description: str | None
    created: str = Field(description="ISO-8601 UTC, when the results were assembled")
    versions: Versions
    model: ModelInfo
    engine: dict[str, Any] = Field(description="vLLM engine arguments as given")
    share_engine: bool
    engine_start_s: list[float] = Field(description="engine start times over the sessions of this run")
    scoring: Scoring
    settings: Settings
    arms: dict[str, ArmResult]
    tasks: dict[str, TaskResult]
    summary: dict[str, ArmSummary] = Field(description="arm (not the baseline) -> mean over tasks")
    comparisons: list[PairComparison] = Field(
        default_factory=list, description="the config's 'comparisons': two calibrated arms compared with each other, "
                                          "in the config's order (empty: none asked)")
    warnings: list[str] = Field(default_factory=list)
    files: Files = Field(default_factory=Files)

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null", populate_by_name=True)

    def to_json(self) -> str:
        return json.dumps(json.loads(self.model_dump_json(by_alias=True)), indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EvalResults:
        return cls.model_validate_json(text)


def json_schema() -> dict[str, Any]:
    """The JSON schema of ``results.json`` (what ``docs/eval_results.schema.json`` holds)."""
    schema = EvalResults.model_json_schema(by_alias=True, mode="serialization")
    schema["$id"] = f"https://act-plugin/schemas/eval-results-v{SCHEMA_VERSION}.json"
    return schema


if __name__ == "__main__":  # python -m act_plugin.eval.results > docs/eval_results.schema.json
    print(json.dumps(json_schema(), indent=1, sort_keys=True))
