"""The head-search config (``act-plugin search CONFIG.yaml``): validated, unknown keys rejected.

Example (``configs/search_smollm2.yaml``)::

    name: smollm2-135m-classification-searched
    model: smollm2-135m                # embedded model name or a model folder
    tasks: [sst2, sst5, mr, subj, agnews, trec, cb, dbpedia]
    split: train                       # the only split a search may use
    samples_per_task: 38               # calibration budget per task (~300 prompts in all)
    seed: 0
    beta: 0.4
    threshold: 0.1
    candidates: null                   # every (layer, head); or a compact spec "2-28:*"
    score: margin                      # or accuracy
    method: fast                       # or exact (the paper's brute force, in one vLLM engine)
    fast: {top_k: 16, verify: vllm, check_layers: null}
    output: configs/smollm2_searched.yaml

Paths (``output``, ``report``, ``heatmap``, ``state_dir``, ``data_dir``) are relative to the
current directory.
"""

from __future__ import annotations

from collections.abc import Mapping
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

__all__ = ["SearchConfig", "FastOptions", "HFOptions", "load_search_config", "SearchConfigError"]


class SearchConfigError(ACTConfigError):
    """A search config that cannot be used (the message names the key and the problem)."""


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
    data_dir: str | None = Field(None, description="offline data folder (default $ACT_DATA_DIR or ../shared/data)")
    tasks: list[str] = Field(..., description="calibration tasks (single-token answers) or suites")
    split: str = Field("train", description="must be 'train': never search heads on the split you report")
    samples_per_task: int = Field(38, ge=1, description="calibration prompts drawn per task (fewer if it has fewer)")
    seed: int = Field(0, description="seed of the calibration draw")
    beta: float = Field(0.4, description="ACT beta of every candidate")
    threshold: float = Field(0.1, description="ACT sink threshold tau")
    candidates: Any = Field(None, description="candidate heads, compact spec like ACTConfig heads; null = all")
    score: Literal["margin", "accuracy"] = Field(
        "margin", description="'margin': mean log-prob margin of the gold answer over the best wrong one; "
        "'accuracy': fraction correct (both macro-averaged over tasks)")
    method: Literal["fast", "exact"] = Field("fast", description="'fast' (first-order ranking + exact top-K) or "
                                             "'exact' (every candidate calibrated alone, the paper's procedure)")
    fast: FastOptions = Field(default_factory=FastOptions)
    hf: HFOptions = Field(default_factory=HFOptions)
    combine: bool = Field(True, description="combined-set step: greedily drop kept heads whose removal helps")
    combine_max_heads: int | None = Field(
        16, ge=1, description="the combined-set step starts from at most this many kept heads, the best by exact "
        "single-head gain (each removal pass costs one exact evaluation per head); null = every kept head")
    combine_max_evals: int | None = Field(None, ge=1, description="cap on the combined-set step's evaluations")
    output: str = Field("runs/search/act_searched.yaml", description="the ACT config written (YAML)")
    report: str | None = Field(None, description="JSON of every candidate's scores (default: <output>.search.json)")
    heatmap: str | None = Field(None, description="per-head gain heatmap PNG (default: <output>.heatmap.png)")
    state_dir: str = Field("runs/search-state", description="resumable partial results (JSONL per settings hash)")

    # ----------------------------------------------------------------- validators
    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, v: Any) -> Any:
        return engine_args(v, "the search (use the top-level 'model')", SearchConfigError)

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, v: Any) -> Any:
        from act_plugin.tasks import get_task, resolve_task_names

        if isinstance(v, str):
            v = [t for t in v.split(",") if t.strip()]
        if not isinstance(v, list) or not v:
            raise SearchConfigError("tasks must be a non-empty list of calibration tasks (e.g. [sst2, agnews])")
        names = resolve_task_names(v)
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

    @model_validator(mode="after")
    def _paths(self) -> "SearchConfig":
        if not str(self.output).endswith((".yaml", ".yml")):
            raise SearchConfigError(f"output {self.output!r}: the ACT config is written as YAML (.yaml/.yml)")
        return self

    # ----------------------------------------------------------------- helpers
    @property
    def config_name(self) -> str:
        return self.name or Path(self.output).stem

    @property
    def report_path(self) -> Path:
        return Path(self.report) if self.report else _beside(Path(self.output), ".search.json")

    @property
    def heatmap_path(self) -> Path:
        return Path(self.heatmap) if self.heatmap else _beside(Path(self.output), ".heatmap.png")

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
        return self.model_dump(mode="json")


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
