"""Validated ACT configuration shared by every part of the project.

An :class:`ACTConfig` says *how* to calibrate (``beta``, ``threshold``) and *where*
(``heads``: decoder layer index -> global query-head indices, 0-based). It loads from
YAML/JSON/dicts, dumps back, hashes stably, and is checked against a concrete model with
:meth:`ACTConfig.validate_for` before anything runs.

Compact head specs (for hand-written configs and command lines)::

    heads: {2: [0, 3], "5": "all", "10-12": [1, "4-6"]}
    heads: "2-28:*"                 # all heads of layers 2..28
    heads: "2-27:0,3;30:1-2"         # ';' separates layer groups
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["ACTConfig", "ACTEngineConfig", "ACTConfigError", "ModelShape", "model_shape", "parse_index_spec",
           "ALL_HEADS",
           "MAX_INDEX", "SINGLE_PROFILE", "RESERVED_PROFILE_NAMES"]

ALL_HEADS: Final = "all"
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")
# Largest layer or head index a config may name. Checked before a range is expanded, so a
# typo like "0-1000000000:*" is an error instead of a billion-element set; no model has
# anywhere near this many layers or query heads.
MAX_INDEX = 1023


class ACTConfigError(ValueError):
    """A configuration that cannot be used, with a message naming the problem."""


def parse_index_spec(spec: Any, what: str) -> list[int] | Literal["all"]:
    """``3``, ``"3"``, ``"2-5"``, ``"1,4-6"``, ``[1, "4-6"]``, ``"*"``/``"all"`` -> sorted ints or 'all'."""
    if isinstance(spec, bool):
        raise ACTConfigError(f"{what}: expected an index, a range like '2-5' or 'all', got {spec!r}")
    if isinstance(spec, int):
        items: list[Any] = [spec]
    elif isinstance(spec, str):
        if spec.strip().lower() in ("*", "all"):
            return ALL_HEADS
        items = [s for s in spec.split(",") if s.strip()]
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        raise ACTConfigError(f"{what}: expected an index, a list or a range like '2-5', got {spec!r}")
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise ACTConfigError(f"{what}: {item!r} is not an index")
        if isinstance(item, int):
            if item < 0:
                raise ACTConfigError(f"{what}: negative index {item}")
            _check_bound(item, item, what)
            out.add(item)
            continue
        if isinstance(item, str):
            if item.strip().lower() in ("*", "all"):
                return ALL_HEADS
            m = _RANGE.match(item)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
                if hi < lo:
                    raise ACTConfigError(f"{what}: range {item!r} runs backwards")
                _check_bound(lo, hi, what)  # before expanding the range
                out.update(range(lo, hi + 1))
                continue
        raise ACTConfigError(f"{what}: cannot read {item!r} (use 3, '2-5', '1,4-6' or 'all')")
    return sorted(out)


def _check_bound(lo: int, hi: int, what: str) -> None:
    if hi > MAX_INDEX:
        shown = str(lo) if lo == hi else f"{lo}-{hi}"
        raise ACTConfigError(f"{what}: index {shown} is out of range (indices are 0..{MAX_INDEX}; "
                             f"a model's layers and heads are counted from 0)")


def _parse_heads(value: Any) -> dict[int, list[int] | Literal["all"]]:
    if value is None:
        return {}
    if isinstance(value, str):
        if not value.strip():
            raise ACTConfigError("heads: empty string (leave 'heads' out for no heads, or write e.g. '2-28:*')")
        groups: dict[str, str] = {}
        for part in value.split(";"):
            if not part.strip():
                continue
            if ":" not in part:
                raise ACTConfigError(f"heads: {part.strip()!r} needs the form 'LAYERS:HEADS', e.g. '2-28:*'")
            layer_part, head_part = part.split(":", 1)
            groups[layer_part] = head_part
        value = groups
    if not isinstance(value, Mapping):
        raise ACTConfigError(
            f"heads: expected a mapping layer -> heads or a string like '2-28:*', got {type(value).__name__}"
        )
    heads: dict[int, set[int] | Literal["all"]] = {}
    for layer_spec, head_spec in value.items():
        layers = parse_index_spec(layer_spec, f"heads: layer key {layer_spec!r}")
        if layers == ALL_HEADS:
            raise ACTConfigError("heads: layer keys must be explicit indices or ranges, not 'all'")
        parsed = parse_index_spec(head_spec, f"heads of layer {layer_spec!r}")
        if not layers:
            raise ACTConfigError(f"heads: layer key {layer_spec!r} names no layer")
        if parsed != ALL_HEADS and not parsed:
            # '2-28:' or {5: []} would silently calibrate nothing on those layers
            raise ACTConfigError(
                f"heads of layer {str(layer_spec).strip()!r} is empty: name the heads (e.g. '0,3' or '*') "
                f"or leave the layer out"
            )
        for layer in layers:
            prev = heads.get(layer)
            if parsed == ALL_HEADS or prev == ALL_HEADS:
                heads[layer] = ALL_HEADS
            else:
                heads[layer] = (prev or set()) | set(parsed)
    return {layer: (h if h == ALL_HEADS else sorted(h)) for layer, h in sorted(heads.items())}


class ModelShape(BaseModel):
    """What :meth:`ACTConfig.validate_for` needs to know of a model."""

    model_config = ConfigDict(frozen=True)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    name: str = "model"

    def describe(self) -> str:
        return (
            f"{self.name} has {self.num_layers} layers (0..{self.num_layers - 1}) with "
            f"{self.num_heads} query heads each (0..{self.num_heads - 1}), {self.num_kv_heads} KV heads"
        )


def model_shape(model_config: Any) -> ModelShape:
    """Shape of a transformers ``PretrainedConfig``, a vLLM ``ModelConfig`` or a dict."""
    if isinstance(model_config, ModelShape):
        return model_config
    hf = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None) or model_config
    if hasattr(hf, "get_text_config"):
        hf = hf.get_text_config()
    get = hf.get if isinstance(hf, Mapping) else lambda key, default=None: getattr(hf, key, default)
    layers = get("num_hidden_layers") or get("n_layer") or get("num_layers")
    heads = get("num_attention_heads") or get("n_head")
    if not layers or not heads:
        raise ACTConfigError(f"cannot read num_hidden_layers / num_attention_heads from {type(hf).__name__}")
    kv = get("num_key_value_heads") or heads
    name = get("_name_or_path") or getattr(model_config, "model", None) or "model"
    return ModelShape(num_layers=int(layers), num_heads=int(heads), num_kv_heads=int(kv), name=str(name) or "model")


class ACTConfig(BaseModel):
    """How and where to calibrate attention (``docs/ACT_SPEC.md``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    beta: float = Field(0.4, description="scale of the attention on hidden sinks, in [0, 1]")
    threshold: float = Field(0.1, description="sink threshold tau on mean received attention, in (0, 1)")
    heads: dict[int, list[int] | Literal["all"]] = Field(
        default_factory=dict, description="layer -> global query-head indices ('all' for every head)"
    )
    name: str | None = Field(None, description="a short label for reports")
    source: str | None = Field(None, description="where this head set comes from (attribution)")
    model: str | None = Field(None, description="the model the head set was found for (informational)")

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
        return _parse_heads(v)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_any(cls, obj: Any) -> ACTConfig:
        """An ACTConfig from an ACTConfig, a dict, a JSON/YAML string or a file path."""
        if isinstance(obj, ACTConfig):
            return obj
        if isinstance(obj, Path) or (isinstance(obj, str) and _looks_like_path(obj)):
            return cls.from_file(obj)
        if isinstance(obj, str):
            obj = _load_text(obj, "ACT config")
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
        d = self.model_dump(exclude_none=True)
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
        from act_plugin.io import atomic_write_text

        p = Path(path)
        return atomic_write_text(p, self.to_json() if p.suffix == ".json" else self.to_yaml())

    # ----------------------------------------------------------------- properties
    @property
    def hash(self) -> str:
        """Stable content hash of what changes results (beta, threshold, heads)."""
        payload = json.dumps(
            {"beta": self.beta, "threshold": self.threshold, "heads": {str(k): v for k, v in self.heads.items()}},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def is_identity(self) -> bool:
        """True when this config cannot change any output."""
        return self.beta == 1.0 or not self.heads

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
        return ACTConfig.from_any({**self.model_dump(), **changes})

    def _label(self) -> str:
        return f" '{self.name}'" if self.name else ""


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ACTConfigError(f"{what} must be a number, got {v!r}")
    try:
        return float(v)
    except ValueError:
        raise ACTConfigError(f"{what} must be a number, got {v!r}") from None


def _is_file(p: str | Path) -> bool:
    """``Path.is_file`` that answers False for names the OS cannot even look up (too long,
    NUL bytes): a config given as text must never fail with an OSError."""
    try:
        return Path(p).is_file()
    except (OSError, ValueError):
        return False


def _looks_like_path(s: str) -> bool:
    s = s.strip()
    return "\n" not in s and not s.startswith(("{", "[")) and (s.endswith((".yaml", ".yml", ".json")) or _is_file(s))


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _load_text(text: str, where: str, error: type[ACTConfigError] = ACTConfigError) -> Any:
    import yaml  # YAML is a superset of JSON

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML/JSON: {e}") from None


def load_config_file(path: str | Path, kind: str, error: type[ACTConfigError] = ACTConfigError) -> tuple[Any, Path]:
    """The parsed YAML/JSON content of a config file and its path: the one place config files
    are read. Raises ``error`` naming the file when it is missing or does not parse."""
    p = Path(path)
    if not _is_file(p):
        raise error(f"{kind} file not found: {_short(str(p))}")
    return _load_text(p.read_text(), str(p), error), p


_Parsed = TypeVar("_Parsed")


def parse_act_file(path: str | Path, parse: Callable[[Any], _Parsed]) -> _Parsed:
    """An ACT (engine) config file through ``parse``; a file holding only ``act: ...`` is
    unwrapped, and errors are prefixed with the file's path."""
    data, p = load_config_file(path, "ACT config")
    if isinstance(data, Mapping) and set(data) == {"act"}:
        data = data["act"]
    try:
        return parse(data)
    except ACTConfigError as e:
        raise ACTConfigError(f"{p}: {e}") from None


def _model_at(model: type[BaseModel], path: tuple) -> type[BaseModel]:
    """The (nested) pydantic model that owns the keys at ``path`` (e.g. ``("fast",)``)."""
    for part in path:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        model = ann
    return model


def explain_validation(e: ValidationError, model: type[BaseModel], kind: str) -> str:
    """One readable message for a config's validation errors: unknown keys with the keys
    allowed where they stand, missing keys, and our validators' own messages."""
    msgs = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            allowed = _model_at(model, tuple(err["loc"][:-1])).model_fields
            msgs.append(f"unknown key '{loc}' (allowed: {', '.join(allowed)})")
        elif err["type"] == "missing":
            msgs.append(f"missing required key '{loc}'")
        else:
            msgs.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return f"invalid {kind}: " + "; ".join(msgs)


def engine_args(v: Any, owner: str, error: type[ACTConfigError] = ACTConfigError) -> dict[str, Any]:
    """A config's ``engine`` mapping (vLLM engine arguments; ``None`` = none). ``model`` and
    ``additional_config`` are refused: ``owner`` (e.g. "the search (use the top-level
    'model')") sets them."""
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise error(f"engine must be a mapping of vLLM engine arguments, got {type(v).__name__}")
    for key in ("model", "additional_config"):
        if key in v:
            raise error(f"engine.{key} is set by {owner}")
    return dict(v)


def read_config_mapping(
    source: str | Path | Mapping[str, Any], kind: str, error: type[ACTConfigError] = ACTConfigError
) -> tuple[dict[str, Any], Path | None]:
    """The mapping of a config given as a mapping or a YAML/JSON file, and the file's path
    (``None`` for a mapping). Raises ``error`` naming the file when it is missing or is not
    a mapping."""
    if isinstance(source, Mapping):
        return dict(source), None
    data, p = load_config_file(source, kind, error)
    if not isinstance(data, Mapping):
        raise error(f"{p}: the {kind} must be a mapping, got {type(data).__name__}")
    return dict(data), p


# ---------------------------------------------------------------------------- engine level
# Per-request values of ``SamplingParams.extra_args["act"]`` (``vllm_xargs`` on the OpenAI
# server): off, the engine's default profile, or a named profile the engine holds.
REQUEST_OFF = (False, "off", "none", "baseline")
REQUEST_DEFAULT = (True, "on", "default")
# A profile named like a request keyword could never be selected ("act": "on" means the
# default profile, not a profile called "on"), so such names are refused.
RESERVED_PROFILE_NAMES = frozenset(
    {str(v).lower() for v in REQUEST_OFF + REQUEST_DEFAULT if isinstance(v, str)} | {"true", "false"}
)
# The profile a single ACT config becomes when given as an engine config.
SINGLE_PROFILE = "act"


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
    if name.strip().lower() in RESERVED_PROFILE_NAMES:
        raise ACTConfigError(
            f"profile name {name!r} is reserved: in a request it means "
            f"{'ACT off' if name.strip().lower() in ('off', 'none', 'baseline', 'false') else 'the default profile'}"
            f", so this profile could never be selected; rename it "
            f"(reserved: {', '.join(sorted(RESERVED_PROFILE_NAMES))})"
        )
    return name


class ACTEngineConfig(BaseModel):
    """What an engine holds: named ACT profiles and the one requests get by default.

    Accepted forms (``additional_config={"act": X}``, ``ACT_CONFIG=file``):

    * a single ACT config (``{"beta": 0.4, "heads": {...}}``): one profile, ``act``
      (:data:`SINGLE_PROFILE`), which is also the default;
    * ``{"profiles": {"cls": {...}, "mc": "path.yaml"}, "default": "cls"}``; ``default``
      may be ``null``: requests are then uncalibrated unless they name a profile.

    Profile names must not be request keywords (:data:`RESERVED_PROFILE_NAMES`).
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
        if isinstance(obj, ACTEngineConfig):
            return obj
        if isinstance(obj, ACTConfig):
            return cls(profiles={SINGLE_PROFILE: obj}, default=SINGLE_PROFILE)
        if isinstance(obj, Path) or (isinstance(obj, str) and _looks_like_path(obj)):
            return parse_act_file(obj, cls.from_any)
        if isinstance(obj, str):
            obj = _load_text(obj, "ACT engine config")
        if obj is None:
            return cls()
        if not isinstance(obj, Mapping):
            raise ACTConfigError(f"the 'act' engine config must be a mapping, got {type(obj).__name__}")
        if "profiles" not in obj:
            return cls.from_any(ACTConfig.from_any(obj))
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
        if value is None:
            return self.default
        if isinstance(value, str):
            key = value.strip()
            if key.lower() in REQUEST_OFF:
                return None
            if key.lower() in REQUEST_DEFAULT:
                return self.default
            if key in self.profiles:
                return key
            raise ACTConfigError(
                f"unknown ACT profile {value!r} in the request (engine has {sorted(self.profiles)}; "
                f"or use 'off' / 'default')"
            )
        if value is False:
            return None
        if value is True:
            return self.default
        raise ACTConfigError(
            f"request value for 'act' must be a profile name, 'off', 'default', true or false; got {value!r}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"profiles": {n: p.to_dict() for n, p in self.profiles.items()}, "default": self.default}
