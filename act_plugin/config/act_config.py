"""Validated calibration configuration shared by every part of the project.

An :class:`ACTConfig` says *which rule* calibrates (``rule``, default ``act``; the rules are
:mod:`act_plugin.rules`), *how* (the rule's own settings: ``beta``/``threshold`` for ``act``,
``scale`` for ``first_token``, ``alpha`` for ``spans``; :mod:`act_plugin.config.rule_settings`)
and *where* (``heads``: decoder layer index -> global query-head indices, 0-based; grammar in
:mod:`act_plugin.config.heads`). It loads from YAML/JSON/dicts, dumps back, hashes stably,
and is checked against a concrete model with :meth:`ACTConfig.validate_for` before anything
runs. An ``act`` profile dumps and hashes exactly as before rules existed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from act_plugin.config.errors import ACTConfigError, explain_validation
from act_plugin.config.files import load_text, looks_like_path, parse_act_file
from act_plugin.config.heads import ALL_HEADS, parse_heads
from act_plugin.config.rule_settings import (
    DEFAULT_RULE,
    RuleName,
    check_rule_keys,
    parse_alpha,
    parse_scale,
    scale_of,
    settings_of,
)
from act_plugin.config.shape import model_shape

__all__ = ["ACTConfig"]


class ACTConfig(BaseModel):
    """How and where to calibrate attention (``docs/ACT_SPEC.md``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: RuleName = Field(DEFAULT_RULE, description="the calibration rule: act, first_token or spans")
    beta: float = Field(0.4, description="scale of the attention on hidden sinks, in [0, 1]")
    threshold: float = Field(0.1, description="sink threshold tau on mean received attention, in (0, 1)")
    heads: dict[int, list[int] | Literal["all"]] = Field(
        default_factory=dict, description="layer -> global query-head indices ('all' for every head)"
    )
    scale: float | dict[str, float] | None = Field(
        None, description="first_token: gamma > 0, a number or {'LAYERS:HEADS': gamma, ...}")
    alpha: float | None = Field(None, description="spans: scale of the attention outside the spans, in (0, 1]")
    name: str | None = Field(None, description="a short label for reports")
    source: str | None = Field(None, description="where this head set comes from (attribution)")
    model: str | None = Field(None, description="the model the head set was found for (informational)")

    @model_validator(mode="before")
    @classmethod
    def _rule_settings(cls, data: Any) -> Any:
        """Refuse another rule's settings (naming the key), fill in the rule's defaults, and
        derive ``heads`` from a per-head ``scale``."""
        if not isinstance(data, Mapping):
            return data
        return check_rule_keys(dict(data))

    @field_validator("scale", mode="before")
    @classmethod
    def _scale(cls, v: Any) -> Any:
        return parse_scale(v)

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, v: Any) -> Any:
        return parse_alpha(v)

    @field_validator("beta", mode="before")
    @classmethod
    def _beta(cls, v: Any) -> float:
        v = _number(v, "beta")
        if not 0.0 <= v <= 1.0:
            raise ACTConfigError(f"beta must be in [0, 1] (1 = no change, 0 = sinks removed), got {v}")
        return v

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, v: Any) -> float:
        v = _number(v, "threshold")
        if not 0.0 < v < 1.0:
            raise ACTConfigError(f"threshold must be in (0, 1) (mean attention a key receives), got {v}")
        return v

    @field_validator("heads", mode="before")
    @classmethod
    def _heads(cls, v: Any) -> dict:
        return parse_heads(v)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_any(cls, obj: Any) -> ACTConfig:
        """An ACTConfig from an ACTConfig, a dict, a JSON/YAML string or a file path."""
        if isinstance(obj, ACTConfig):
            return obj
        if isinstance(obj, Path) or (isinstance(obj, str) and looks_like_path(obj)):
            return cls.from_file(obj)
        if isinstance(obj, str):
            obj = load_text(obj, "ACT config")
        if not isinstance(obj, Mapping):
            raise ACTConfigError(f"an ACT config must be a mapping, got {type(obj).__name__}")
        try:
            return cls.model_validate(dict(obj))
        except ValidationError as e:
            raise ACTConfigError(explain_validation(e, cls, "ACT config")) from None

    @classmethod
    def from_file(cls, path: str | Path) -> ACTConfig:
        return parse_act_file(path, cls.from_any)

    def to_dict(self) -> dict[str, Any]:
        """Only what the rule reads: an ``act`` profile dumps without ``rule`` (as before
        rules existed), another rule without ``beta``/``threshold``."""
        d = self.model_dump(exclude_none=True)
        if self.rule == DEFAULT_RULE:
            d.pop("rule")
        else:
            d.pop("beta")
            d.pop("threshold")
        d["heads"] = {str(k): v for k, v in self.heads.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write as JSON (``.json``) or YAML, atomically: a crash never leaves a cut file
        (a truncated head list would still parse, as a different head set)."""
        from act_plugin.atomic_files import atomic_write_text

        p = Path(path)
        return atomic_write_text(p, self.to_json() if p.suffix == ".json" else self.to_yaml())

    # ----------------------------------------------------------------- properties
    @property
    def hash(self) -> str:
        """Stable content hash of what changes results: the rule's settings and the heads.
        An ``act`` profile hashes (beta, threshold, heads) exactly as before rules existed;
        any other rule also hashes its name."""
        heads = {str(k): v for k, v in self.heads.items()}
        if self.rule == DEFAULT_RULE:
            body: dict[str, Any] = {"beta": self.beta, "threshold": self.threshold, "heads": heads}
        else:
            body = {"rule": self.rule, **self.settings, "heads": heads}
        payload = json.dumps(body, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def settings(self) -> dict[str, Any]:
        """The rule's own settings (``{"beta", "threshold"}``, ``{"scale"}`` or ``{"alpha"}``)."""
        return settings_of(self.rule, self)

    @property
    def is_identity(self) -> bool:
        """True when this config cannot change any output."""
        return self.identity_reason() is not None

    def identity_reason(self) -> str | None:
        """Why this config cannot change any output (None: it can), for messages."""
        if self.rule == "act" and self.beta == 1.0:
            return "beta is 1 (no change)"
        if self.rule == "first_token" and all(g == 1.0 for g in self._scale_values()):
            return "scale is 1 (no change)"
        if self.rule == "spans" and self.alpha == 1.0:
            return "alpha is 1 (no change)"
        return None if self.heads else "it names no heads"

    def _scale_values(self) -> list[float]:
        s = self.scale
        return list(s.values()) if isinstance(s, dict) else [1.0 if s is None else float(s)]

    def head_scales(self, layer: int, heads: tuple[int, ...] | list[int]) -> list[float]:
        """``first_token``: gamma of each of ``heads`` (global query heads) in ``layer``."""
        return [scale_of(self.scale, layer, h) for h in heads]

    def resolve(self, num_layers: int, num_heads: int) -> dict[int, tuple[int, ...]]:
        """Concrete layer -> heads mapping ('all' expanded); call after :meth:`validate_for`."""
        return {
            layer: tuple(range(num_heads)) if h == ALL_HEADS else tuple(h)
            for layer, h in self.heads.items()
            if layer < num_layers
        }

    def num_heads_selected(self, num_heads: int) -> int:
        return sum(num_heads if h == ALL_HEADS else len(h) for h in self.heads.values())

    def validate_for(self, model_config: Any) -> dict[int, tuple[int, ...]]:
        """Reject layers/heads the model does not have; return the resolved head map."""
        shape = model_shape(model_config)
        for layer, heads in self.heads.items():
            if layer >= shape.num_layers:
                raise ACTConfigError(
                    f"ACT config{self._label()} names layer {layer}, but {shape.describe()}"
                )
            if heads != ALL_HEADS:
                bad = [h for h in heads if h >= shape.num_heads]
                if bad:
                    raise ACTConfigError(
                        f"ACT config{self._label()} names head(s) {bad} of layer {layer}, but {shape.describe()}"
                    )
        return self.resolve(shape.num_layers, shape.num_heads)

    def with_(self, **changes: Any) -> ACTConfig:
        """A validated copy with some fields changed."""
        return ACTConfig.from_any({**self.to_dict(), **changes})

    def _label(self) -> str:
        return f" '{self.name}'" if self.name else ""


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ACTConfigError(f"{what} must be a number, got {v!r}")
    try:
        return float(v)
    except ValueError:
        raise ACTConfigError(f"{what} must be a number, got {v!r}") from None
