"""The head-search config (``act-plugin search CONFIG.yaml``): validated, unknown keys rejected.

Example (``configs/search_smollm2.yaml``)::

    name: smollm2-135m-classification-searched
    model: smollm2-135m                # embedded model name or a model folder
    tasks: [sst2, sst5, mr, subj, agnews, trec, cb, dbpedia]
    split: train                       # the only split a search may use
    samples_per_task: 64               # search part per task (rank + verify)
    validation_per_task: 300           # validation part per task (accept / refuse, paired per task)
    seed: 0
    beta: 0.4
    threshold: 0.1
    candidates: null                   # every (layer, head); or a compact spec "2-28:*"
    score: clipped_margin              # or margin, accuracy, worst_task
    alpha: 0.05                        # per-task paired test on validation
    gain: positive                     # or 'significant': some task must also improve at p < alpha
    per_task: true                     # also one set per task, as profiles of one engine config
    method: fast                       # or exact (the paper's brute force, in one vLLM engine)
    fast: {top_k: 16, verify: vllm, check_layers: null}
    output: configs/smollm2_searched.yaml
    rules: [act]                       # or [act, first_token] with a first_token grid
                                       # (act_plugin.search.rules_config)

Where a search writes (:meth:`SearchConfig.destinations`): by default everything goes into
the run folder ``run_dir`` (default ``runs/<name>/``), under the file names of ``output``,
``profiles_output``, ``report`` and ``heatmap``; those paths themselves -- for the shipped
config, the shipped profiles and ``docs/search/`` -- are written only when asked
(``act-plugin search --update-shipped``), so a run never overwrites the checkout's files by
accident. Paths (``output``, ``report``, ``heatmap``, ``run_dir``, ``state_dir``,
``data_dir``) are relative to the current directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from act_plugin.config import (
    ACTConfig,
    ACTConfigError,
    engine_args,
    explain_validation,
    parse_index_spec,
    read_config_mapping,
)
from act_plugin.search.rules_config import FirstTokenOptions, parse_rules

__all__ = ["SearchConfig", "FastOptions", "HFOptions", "OutputPaths", "load_search_config", "SearchConfigError"]


class SearchConfigError(ACTConfigError):
    """A search config that cannot be used (the message names the key and the problem)."""


@dataclass(frozen=True)
class OutputPaths:
    """The files one search run writes."""

    output: Path  # the shared ACT config (written only if a set passed validation)
    profiles: Path  # the per-task engine config (with per_task)
    report: Path  # JSON report; its Markdown summary is ``summary``
    heatmap: Path

    @property
    def summary(self) -> Path:
        return self.report.with_suffix(".md")


class FastOptions(BaseModel):
    """Options of method ``fast`` (first-order ranking of every head, then exact checks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    top_k: int = Field(16, ge=0, description="how many top-ranked candidates are scored exactly")
    verify: Literal["hf", "vllm"] = Field(
        "vllm", description="backend of the exact scores: 'vllm' (one engine, runtime reconfiguration) or 'hf' "
        "(transformers, recomputing only the layers from the candidate's layer up, from cached hidden states)")
    check_layers: Any = Field(None, description="layers whose heads are ALL scored exactly as a brute-force check "
                              "of the ranking (Spearman, top-k overlap); compact spec like '4,15,26'")

    @field_validator("check_layers", mode="before")
    @classmethod
    def _check_layers(cls, v: Any) -> Any:
        if v is None or v == [] or v == "":
            return None
        parsed = parse_index_spec(v, "fast.check_layers")
        if parsed == "all":
            raise SearchConfigError("fast.check_layers: name the layers (e.g. '4,15,26'); 'all' is method 'exact'")
        return parsed


class HFOptions(BaseModel):
    """The transformers path (ranking, and exact scores when ``fast.verify: hf``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_tokens: int = Field(2048, ge=16, description="padded tokens per batch (prompts sorted by length)")
    threads: int | Literal["auto"] | None = Field(
        "auto", description="torch threads: a number, 'auto' (every core other processes leave free, checked before "
        "each batch) or null (torch's default)")

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> Any:
        if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise SearchConfigError(f"hf.threads must be a positive integer, 'auto' or null, got {v!r}")
    cache_hidden: bool = Field(True, description="keep each verified layer's input hidden states in memory so an "
                               "exact score recomputes only the layers from the candidate's layer up")
    cache_gib: float = Field(4.0, ge=0, description="memory for caching every candidate layer's inputs during the "
                             "ranking pass (saves a baseline pass); above it only the verified layers are cached")


class SearchConfig(BaseModel):
    """A head search (ACT_SPEC section 3) over training-split calibration prompts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, description="name of the produced ACT config (default: from the file name)")
    model: str = Field(..., description="embedded model name (smollm2-135m) or a model folder")
    engine: dict[str, Any] = Field(default_factory=dict, description="vLLM engine arguments (exact scores in vLLM)")
    data_parallel: int = Field(1, description="scoring replicas: the exact scores (vLLM engines, or transformers "
                               "models with fast.verify: hf) run in N processes side by side, each on its own cores "
                               "or GPUs; one candidate's score is made by one replica, so results equal N = 1's")
    data_dir: str | None = Field(None, description="offline data folder (default $ACT_DATA_DIR or ../shared/data)")
    tasks: list[str] = Field(..., description="calibration tasks (single-token answers) or suites")
    split: str = Field("train", description="must be 'train': never search heads on the split you report")
    samples_per_task: int = Field(64, ge=1, description="SEARCH part: training prompts per task on which heads "
                                  "are ranked and verified (fewer if the task has fewer)")
    validation_per_task: int = Field(
        300, ge=0, description="VALIDATION part: further training prompts per task (disjoint from the search part) on "
        "which every head set is accepted or refused, per task, with a paired test; 0 = no validation (the search "
        "part alone decides, as in the paper). 300 prompts detect a ~5 point change at 10% flips (the report "
        "gives each task's minimum detectable effect); a 2 point change needs ~2,000")
    seed: int = Field(0, description="seed of the training draw and of the search/validation division")
    beta: float = Field(0.4, description="ACT beta of every candidate")
    threshold: float = Field(0.1, description="ACT sink threshold tau")
    candidates: Any = Field(None, description="candidate heads, compact spec like ACTConfig heads; null = all")
    score: Literal["margin", "clipped_margin", "accuracy", "worst_task"] = Field(
        "clipped_margin", description="objective on the search part (a gain over the uncalibrated model): 'margin' "
        "mean log-prob margin of the gold answer over the best wrong one; 'clipped_margin' that margin clipped to "
        "[-clip, clip]; 'accuracy' net flips; 'worst_task' the smallest per-task margin change (macro over tasks "
        "otherwise)")
    clip: float = Field(1.0, gt=0, description="bound of 'clipped_margin' (nats)")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the per-task paired test (exact "
                         "McNemar) on validation: a set that lowers any task's accuracy at p < alpha is refused")
    gain: Literal["positive", "significant"] = Field(
        "positive", description="what a set must gain on validation besides harming no task: 'positive' a positive "
        "mean per-task accuracy change; 'significant' also some task's accuracy up at p < alpha (ships only sets "
        "with evidence of a gain; sets whose small gains the validation part cannot resolve are refused)")
    validate_singles: bool = Field(True, description="also score every verified single head on validation (shows "
                                   "which objective generalises; costs one validation pass per verified head)")
    per_task: bool = Field(False, description="also build one head set per task, written as named profiles in "
                           "one engine config ('profiles_output'); a task no set helps gets no profile")
    profiles_output: str | None = Field(None, description="engine config with the per-task profiles (default: "
                                        "<output>.profiles.yaml)")
    method: Literal["fast", "exact"] = Field("fast", description="'fast' (first-order ranking + exact top-K) or "
                                             "'exact' (every candidate calibrated alone, the paper's procedure)")
    fast: FastOptions = Field(default_factory=FastOptions)
    hf: HFOptions = Field(default_factory=HFOptions)
    combine: bool = Field(True, description="build a combined set (greedy forward selection, each step accepted "
                          "on validation); false: the best single head that passes validation")
    combine_max_heads: int | None = Field(
        16, ge=1, description="heads tried by the combined-set step, the best by exact single-head gain on the "
        "search part (one validation evaluation each); null = every kept head")
    combine_max_evals: int | None = Field(None, ge=1, description="cap on the combined-set step's evaluations")
    output: str = Field("runs/search/act_searched.yaml", description="the shared ACT config (YAML); its file name "
                        "is used in the run folder, the path itself only with --update-shipped")
    report: str | None = Field(None, description="JSON of every candidate's scores (default: <output>.search.json)")
    heatmap: str | None = Field(None, description="per-head gain heatmap PNG (default: <output>.heatmap.png)")
    run_dir: str | None = Field(None, description="folder a search run writes its outputs to (default: "
                                "runs/<name>); --update-shipped writes to output/profiles_output/report/heatmap "
                                "instead")
    state_dir: str = Field("runs/search-state", description="resumable partial results (JSONL per settings hash)")
    rules: list[str] = Field(["act"], description="the calibration rules the search proposes sets of: 'act' "
                             "(always) and 'first_token' (gamma per head from the 'first_token' grid); each "
                             "rule's sets are accepted on validation by the same paired rule, per task")
    first_token: FirstTokenOptions = Field(default_factory=FirstTokenOptions)

    # ----------------------------------------------------------------- validators
    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, v: Any) -> Any:
        return engine_args(v, "the search (use the top-level 'model')", SearchConfigError)

    @field_validator("data_parallel", mode="before")
    @classmethod
    def _data_parallel(cls, v: Any) -> Any:
        from act_plugin.vllm.placement import replica_count

        return replica_count(v)

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, v: Any) -> Any:
        from act_plugin.tasks import get_task, parse_task_list

        names = parse_task_list(v, "of calibration tasks (e.g. [sst2, agnews])", SearchConfigError)
        for n in names:
            if n.startswith("lm_eval:"):
                raise SearchConfigError(f"task {n!r}: a search reads project tasks only (their training splits)")
            spec = get_task(n)
            if not spec.next_token:
                raise SearchConfigError(
                    f"task {n!r} has multi-token answers; a search scores single-token answers from the "
                    f"next-token log-probabilities of one prefill (use e.g. {n.removesuffix('_ll')!r})")
        return names

    @field_validator("split", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if not isinstance(v, str) or v.strip().lower() not in ("train", "training"):
            raise SearchConfigError(
                f"split {v!r}: a head search may only use TRAINING data (split: train); heads chosen on the "
                f"dev/test split would inflate the accuracy you then report on it")
        return "train"

    @field_validator("beta", "threshold", mode="before")
    @classmethod
    def _act_numbers(cls, v: Any, info) -> Any:
        ACTConfig.from_any({info.field_name: v})  # same checks and messages as an ACT config
        return float(v)

    @field_validator("candidates", mode="before")
    @classmethod
    def _candidates(cls, v: Any) -> Any:
        if v is None or v in ("all", "*"):
            return None
        try:
            heads = ACTConfig.from_any({"heads": v}).heads
        except ACTConfigError as e:
            raise SearchConfigError(f"candidates: {str(e).removeprefix('invalid ACT config: ')}") from None
        if not heads:
            raise SearchConfigError("candidates: the spec selects no heads (null means every head)")
        return {str(k): h for k, h in heads.items()}

    @field_validator("rules", mode="before")
    @classmethod
    def _rules(cls, v: Any) -> Any:
        return parse_rules(v)

    @model_validator(mode="after")
    def _rule_options(self) -> "SearchConfig":
        if "first_token" not in self.rules:
            if "first_token" in self.model_fields_set:
                raise SearchConfigError("first_token: a grid is given but 'rules' does not name first_token "
                                        "(rules: [act, first_token])")
            return self
        if self.method != "fast" or self.fast.verify != "hf":
            raise SearchConfigError("rules: first_token candidates are ranked and scored on the transformers path; "
                                    "it needs method 'fast' with fast.verify 'hf'")
        if self.validation_per_task == 0:
            raise SearchConfigError("rules: first_token sets are chosen against ACT's on the validation part; "
                                    "validation_per_task must be > 0")
        return self

    @model_validator(mode="after")
    def _paths(self) -> "SearchConfig":
        if not str(self.output).endswith((".yaml", ".yml")):
            raise SearchConfigError(f"output {self.output!r}: the ACT config is written as YAML (.yaml/.yml)")
        if self.profiles_output and not str(self.profiles_output).endswith((".yaml", ".yml")):
            raise SearchConfigError(f"profiles_output {self.profiles_output!r}: written as YAML (.yaml/.yml)")
        return self

    # ----------------------------------------------------------------- helpers
    @property
    def config_name(self) -> str:
        return self.name or Path(self.output).stem

    @property
    def report_path(self) -> Path:
        return Path(self.report) if self.report else _beside(Path(self.output), ".search.json")

    @property
    def profiles_path(self) -> Path:
        return Path(self.profiles_output) if self.profiles_output else _beside(Path(self.output), ".profiles.yaml")

    @property
    def heatmap_path(self) -> Path:
        return Path(self.heatmap) if self.heatmap else _beside(Path(self.output), ".heatmap.png")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.config_name

    def destinations(self, update_shipped: bool = False) -> OutputPaths:
        """Where a run writes: the run folder (default), or with ``update_shipped`` the
        configured paths (for the shipped search config: the files the checkout ships)."""
        named = OutputPaths(Path(self.output), self.profiles_path, self.report_path, self.heatmap_path)
        if update_shipped:
            return named
        names = [p.name for p in (named.output, named.profiles, named.report, named.heatmap)]
        if len(set(names)) < len(names):
            raise SearchConfigError(f"output, profiles_output, report and heatmap need distinct file names to share "
                                    f"the run folder {self.run_path}, got {names}")
        return OutputPaths(*(self.run_path / n for n in names))

    def candidate_heads(self, num_layers: int, num_heads: int) -> list[tuple[int, int]]:
        """Every candidate (layer, head), validated against the model's shape."""
        if self.candidates is None:
            return [(layer, h) for layer in range(num_layers) for h in range(num_heads)]
        cfg = ACTConfig.from_any({"heads": self.candidates})
        from act_plugin.config import ModelShape

        try:
            resolved = cfg.validate_for(ModelShape(num_layers=num_layers, num_heads=num_heads,
                                                   num_kv_heads=1, name=self.model))
        except ACTConfigError as e:
            raise SearchConfigError(f"candidates: {str(e).replace('ACT config ', '', 1)}") from None
        return [(layer, h) for layer, hs in sorted(resolved.items()) for h in hs]

    def check_layers(self, num_layers: int) -> list[int]:
        layers = self.fast.check_layers or []
        bad = [x for x in layers if x >= num_layers]
        if bad:
            raise SearchConfigError(f"fast.check_layers {bad}: {self.model} has layers 0..{num_layers - 1}")
        return list(layers)

    def to_dict(self) -> dict[str, Any]:
        # a search of ACT alone records its config exactly as before rules existed
        exclude = {"rules", "first_token"} if self.rules == ["act"] else None
        return self.model_dump(mode="json", exclude=exclude)


def _beside(p: Path, suffix: str) -> Path:
    return p.with_name(p.stem + suffix)


def load_search_config(source: str | Path | Mapping[str, Any], **overrides: Any) -> SearchConfig:
    """A :class:`SearchConfig` from a YAML/JSON file or a mapping. ``overrides`` replace keys
    (``None`` ignored; ``"fast.top_k"``-style dotted keys reach into ``fast``/``hf``)."""
    data, path = read_config_mapping(source, "search config", SearchConfigError)
    where = str(path) if path else "search config"
    for key, value in overrides.items():
        if value is None:
            continue
        if "." in key:
            outer, inner = key.split(".", 1)
            sub = dict(data.get(outer) or {})
            sub[inner] = value
            data[outer] = sub
        else:
            data[key] = value
    try:
        return SearchConfig.model_validate(data)
    except ACTConfigError as e:
        raise SearchConfigError(f"{where}: {e}") from None
    except ValidationError as e:
        raise SearchConfigError(f"{where}: {explain_validation(e, SearchConfig, 'search config')}") from None
