"""The models cache: where built folders live, whether one is complete, and the build lock.

Cache: ``$ACT_PLUGIN_CACHE/models`` if ``ACT_PLUGIN_CACHE`` is set, else
``~/.cache/act-plugin/models``. A folder counts as built only when it has every required file
and its manifest (``act_plugin_model.json``) records the registry's source sha256 and
conversion recipe.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from act_plugin.models.registry import ModelSpec, get_spec, load_registry

MANIFEST_NAME = "act_plugin_model.json"
_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json")


class ModelInfo(BaseModel):
    """What :func:`list_models` reports for each embedded model."""

    name: str
    package: str
    version: str
    license: str
    description: str
    path: Path  # where the folder is (or would be) built
    pulled: bool


def default_cache_dir() -> Path:
    """``$ACT_PLUGIN_CACHE/models`` if set, else ``~/.cache/act-plugin/models``."""
    root = os.environ.get("ACT_PLUGIN_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    return Path.home() / ".cache" / "act-plugin" / "models"


def cache_root(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` (user-expanded), or :func:`default_cache_dir` when None."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Folder where the embedded model ``name`` is (or would be) built."""
    return cache_root(cache_dir) / name


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(path) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(path: Path, spec: ModelSpec) -> bool:
    """Whether ``path`` is a finished build of ``spec`` (all files, manifest matching the registry)."""
    if not path.is_dir():
        return False
    man = read_manifest(path)
    if man is None:
        return False
    if man.get("source_sha256") != spec.sha256 or man.get("recipe_sha256") != spec.recipe_hash():
        return False
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return False
    return all((path / f).is_file() for f in _REQUIRED_FILES)


def is_pulled(name: str, cache_dir: str | Path | None = None, registry: str | Path | None = None) -> bool:
    spec = get_spec(name, registry)
    return is_complete(model_dir(name, cache_dir), spec)


def list_models(cache_dir: str | Path | None = None, registry: str | Path | None = None) -> list[ModelInfo]:
    out = []
    for spec in load_registry(registry).values():
        path = model_dir(spec.name, cache_dir)
        out.append(
            ModelInfo(
                name=spec.name,
                package=spec.package,
                version=spec.version,
                license=spec.license,
                description=spec.description,
                path=path,
                pulled=is_complete(path, spec),
            )
        )
    return out


@contextlib.contextmanager
def build_lock(cache: Path, name: str) -> Iterator[None]:
    """Inter-process lock so that concurrent pulls of one model build it once."""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no locking
        yield
        return
    with open(cache / f".{name}.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
