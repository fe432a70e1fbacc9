"""Tokenizer checks: every next-token answer must be exactly one token after its prompt."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from act_plugin.config import ACTConfigError
from act_plugin.tasks.sample import Sample


def resolve_tokenizer(tokenizer: Any):
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    from act_plugin.models import ensure_model

    return AutoTokenizer.from_pretrained(ensure_model(str(tokenizer)))


_ID_CACHE: dict[tuple[int, str, tuple[str, ...]], tuple[int, ...]] = {}


def label_token_ids(tokenizer: Any, prompt: str, choices: Sequence[str]) -> tuple[int, ...]:
    """Token id of each answer in context (``prompt + choice``), checking that each answer
    adds exactly one token to the prompt's own tokens (lm-eval's context/continuation split)."""
    tok = resolve_tokenizer(tokenizer)
    base = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for c in choices:
        whole = tok(prompt + c, add_special_tokens=False)["input_ids"]
        if len(whole) != len(base) + 1 or whole[: len(base)] != base:
            pieces = tok(c, add_special_tokens=False)["input_ids"]
            raise ACTConfigError(
                f"answer {c!r} is not a single token after the prompt ({len(whole) - len(base)} tokens; alone: "
                f"{pieces}); next-token scoring needs single-token answers"
            )
        ids.append(whole[-1])
    return tuple(ids)


def with_token_ids(s: Sample, tok) -> Sample:
    # Every prompt of a task ends with the same template suffix, so the ids depend only on
    # the tokenizer, the last characters of the prompt and the choices; check each sample's
    # boundary cheaply and fully tokenize only a short tail.
    key = (id(tok), s.prompt[-32:], s.choices)
    ids = _ID_CACHE.get(key)
    if ids is None:
        ids = label_token_ids(tok, s.prompt, s.choices)
        _ID_CACHE[key] = ids
    return dataclasses.replace(s, choice_token_ids=ids)

