"""GGUF -> Hugging Face folder: config, dequantized weights and tokenizer, each checked.

Weights are stored in the registry's ``dtype`` (float32 for the embedded model: the CPU tests
compare numerics between transformers and vLLM, and a 135M model in float32 is only ~540 MB).
The GGUF is quantized (Q4_1/Q8_0), so the float weights are exactly the dequantized values,
not the original upstream checkpoint.

Tokenizer: the GGUF metadata says whether a ``<bos>`` is prepended
(``tokenizer.ggml.add_bos_token``); a registry entry can force it with
``"tokenizer": {"add_bos_token": true|false}`` (``null`` = follow the GGUF metadata). For
SmolLM2-135M the GGUF says ``false`` (as upstream: no BOS is added; the chat template starts
every turn with ``<|im_start|>``, which is also the tokenizer's ``bos_token``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from act_plugin.models.gguf_source import gguf_flag
from act_plugin.models.registry import ModelError, ModelSpec

# Loader kwargs that transformers echoes into tokenizer_config.json; not properties of the model.
_TOKENIZER_LOADER_KEYS = ("is_local", "local_files_only", "gguf_file", "name_or_path", "_commit_hash")


def build_folder(spec: ModelSpec, gguf_path: Path, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Convert ``gguf_path`` into an HF folder at ``out`` (which exists and is empty).

    Returns the facts the manifest records (library versions, the tokenizer's special-token
    behaviour, whether it has a chat template)."""
    import torch
    import transformers

    dtype = getattr(torch, spec.dtype)
    log("reading config")
    config = _converted_config(spec, gguf_path, dtype)
    log("dequantizing weights")
    model = _dequantized_model(spec, config, gguf_path, dtype)
    log(f"writing {spec.dtype} safetensors")
    model.save_pretrained(str(out))
    del model
    log("converting tokenizer")
    tok, effective = _write_tokenizer(spec, gguf_path, config, out)
    template = getattr(tok, "chat_template", None)
    _check_saved_tokenizer(spec, out, tok, effective, template)
    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "add_bos_token": effective["bos"],
        "add_eos_token": effective["eos"],
        "has_chat_template": bool(template),
    }


def _converted_config(spec: ModelSpec, gguf_path: Path, dtype: Any) -> Any:
    """The model config from the GGUF with the registry's overrides, checked against ``expect_config``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
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
    return config


def _dequantized_model(spec: ModelSpec, config: Any, gguf_path: Path, dtype: Any) -> Any:
    """The model built from ``config`` holding the GGUF's dequantized tensors (all finite)."""
    import inspect

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

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
    return model


def _adds_special(tok: Any, which: str) -> bool:
    token_id = getattr(tok, f"{which}_token_id", None)
    if token_id is None:
        return False
    ids = tok("a")["input_ids"]
    return bool(ids) and (ids[0] if which == "bos" else ids[-1]) == token_id


def _write_tokenizer(spec: ModelSpec, gguf_path: Path, config: Any, out: Path) -> tuple[Any, dict[str, bool]]:
    """Save the GGUF's tokenizer to ``out`` with the registry's (or the GGUF's) BOS/EOS
    behaviour; returns it and whether it adds each of ``bos``/``eos``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    effective: dict[str, bool] = {}
    for which in ("bos", "eos"):
        want = getattr(spec.tokenizer, f"add_{which}_token")
        if want is None:
            want = gguf_flag(gguf_path, f"tokenizer.ggml.add_{which}_token")
        if want is not None and _adds_special(tok, which) != want:
            setattr(tok, f"add_{which}_token", want)
        effective[which] = _adds_special(tok, which)
        if want is not None and effective[which] != want:
            raise ModelError(f"{spec.name}: could not make the tokenizer add_{which}_token={want}")
    max_len = getattr(config, "max_position_embeddings", None)
    if isinstance(max_len, int) and max_len > 0:
        tok.model_max_length = max_len
    tok.save_pretrained(str(out))
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    for key in _TOKENIZER_LOADER_KEYS:
        tc.pop(key, None)
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tok, effective


def _check_saved_tokenizer(spec: ModelSpec, out: Path, tok: Any, effective: dict[str, bool],
                           template: str | None) -> None:
    """Round trip: what was written must load back with the same behaviour."""
    from transformers import AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for which in ("bos", "eos"):
        if _adds_special(tok2, which) != effective[which]:
            raise ModelError(f"{spec.name}: saved tokenizer lost add_{which}_token={effective[which]}")
    if template and getattr(tok2, "chat_template", None) != template:
        raise ModelError(f"{spec.name}: saved tokenizer lost its chat template")
    if tok2("Hello world")["input_ids"] != tok("Hello world")["input_ids"]:
        raise ModelError(f"{spec.name}: saved tokenizer encodes differently from the GGUF tokenizer")
