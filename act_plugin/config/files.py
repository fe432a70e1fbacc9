"""Reading config files -- ACT, engine, eval and search configs share one loader -- and the
pieces of the eval and search configs that are read the same way (the ``engine`` mapping)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from act_plugin.config.errors import ACTConfigError

__all__ = ["load_config_file", "parse_act_file", "read_config_mapping", "engine_args", "looks_like_path",
           "load_text"]


def _is_file(p: str | Path) -> bool:
    """``Path.is_file`` that answers False for names the OS cannot even look up (too long,
    NUL bytes): a config given as text must never fail with an OSError."""
    try:
        return Path(p).is_file()
    except (OSError, ValueError):
        return False


def looks_like_path(s: str) -> bool:
    """Whether a config given as a string names a file (else it is YAML/JSON text)."""
    s = s.strip()
    return "\n" not in s and not s.startswith(("{", "[")) and (s.endswith((".yaml", ".yml", ".json")) or _is_file(s))


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def load_text(text: str, where: str, error: type[ACTConfigError] = ACTConfigError) -> Any:
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
    return load_text(p.read_text(), str(p), error), p


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
