"""Resumable partial results: one JSONL file per settings hash.

Every finished unit of work appends one line and syncs it (a killed search loses at most the
unit in progress): ``{"kind": "grad", "batch": i, ...}`` for a batch of the ranking pass,
``{"kind": "set", "backend": "hf"|"vllm", "part": "search"|"val:<task>", "heads": [[l, h], ...],
"margins": [...]}`` for an exact evaluation of a head set on one part (the empty set is the
baseline; per-prompt margins, so every objective and every paired test can be computed
from them). A search over rules adds ``"first_token": [[l, h, gamma], ...]`` to the sets
that scale the first token's attention, and ``{"kind": "ft_grad", ...}`` for a batch of
that rule's ranking pass. A rerun with the same settings reads the file back and skips what is there.

The hash covers everything that changes a stored number: the model files, the code version
of the maths (:func:`maths_version`), the prompts of every part (hence the data, the split
and its seed), the candidate set (the ranking records hold a value for candidates only),
beta, threshold, backend and batching. What only changes which numbers are computed (top-K,
check layers, objective, alpha) is left out, so e.g. raising ``top_k`` reuses every score
already paid for.

A line cut short by an interruption can only be the last one: it is dropped (and the file
rewritten without it, atomically) before anything is appended. Any other unreadable line is
an error naming the file and the line: rerun with ``--fresh`` to start over.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from act_plugin.atomic_files import append_line_durable, atomic_write_text
from act_plugin.search.config import SearchConfigError

__all__ = ["SearchStore", "SearchStoreError", "settings_hash", "model_fingerprint", "maths_version", "head_rows",
           "first_token_rows"]

_MATHS_FILES = ("core.py", "search/scoring.py", "search/hf_backend.py")


class SearchStoreError(SearchConfigError):
    """A partial-results file that cannot be read back."""


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def maths_version() -> str:
    """Hash of the sources that compute a stored number (ACT maths, scores, the HF search path):
    editing them invalidates earlier partial results instead of mixing old and new numbers."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in _MATHS_FILES:
        f = root / rel
        h.update(rel.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"missing"))
    return h.hexdigest()[:16]


def model_fingerprint(path: str | os.PathLike) -> str:
    """Hash of a model folder's config and weight files (names, sizes, mtimes)."""
    p = Path(path)
    h = hashlib.sha256()
    cfg = p / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def head_rows(heads: Iterable) -> list[list[int]]:
    """``[[layer, head], ...]`` sorted: a head set as the store keys and records it."""
    return [[a, b] for a, b in sorted((int(a), int(b)) for a, b in heads)]


def first_token_rows(scales: Mapping | Iterable | None) -> list[list]:
    """``[[layer, head, gamma], ...]`` sorted, from ``{(layer, head): gamma}`` or triples."""
    items = scales.items() if isinstance(scales, Mapping) else ((x[:2], x[2]) for x in (scales or []))
    return [[a, b, g] for (a, b), g in sorted(((int(h[0]), int(h[1])), float(g)) for h, g in items)]


def _set_key(backend: str, part: str, heads: Iterable, first_token: Mapping | Iterable | None = None) -> str:
    key = f"{backend}|{part}|" + ";".join(f"{a}.{b}" for a, b in head_rows(heads))
    ft = first_token_rows(first_token)
    return key + ("|ft:" + ";".join(f"{a}.{b}={g!r}" for a, b, g in ft) if ft else "")


class SearchStore:
    """Append-only JSONL of finished work for one settings hash (``<dir>/<hash>.jsonl``)."""

    def __init__(self, directory: str | os.PathLike, key: str, settings: dict[str, Any], resume: bool = True):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.path = self.dir / f"{key}.jsonl"
        self.grads: dict[int, dict] = {}
        self.ft_grads: dict[int, dict] = {}  # batch -> first_token ranking record
        self.sets: dict[str, dict] = {}
        self.resumed = 0
        if self.path.exists() and not resume:
            self.path.unlink()
        if self.path.exists():
            self._load()
        else:
            self._append({"kind": "meta", "key": key, "settings": settings})

    def _error(self, lineno: int, what: str) -> SearchStoreError:
        return SearchStoreError(f"partial search results {self.path}, line {lineno}: {what}; the file is damaged "
                                f"-- rerun with --fresh to start the search over (or delete the file)")

    def _load(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        # the last element is "" when the file ends with a newline; anything else there is
        # a line cut short by an interruption
        complete, tail = lines[:-1], lines[-1]
        if tail.strip():
            atomic_write_text(self.path, "".join(x + "\n" for x in complete))
        for i, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise self._error(i, f"not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise self._error(i, "not a JSON object")
            kind = rec.get("kind")
            try:
                if kind == "grad":
                    rec["grad"], rec["lp"]  # noqa: B018 - presence check
                    self.grads[int(rec["batch"])] = rec
                    self.resumed += 1
                elif kind == "ft_grad":
                    rec["grad"]  # noqa: B018 - presence check
                    self.ft_grads[int(rec["batch"])] = rec
                    self.resumed += 1
                elif kind == "set":
                    if not isinstance(rec["margins"], list):
                        raise TypeError("margins is not a list")
                    self.sets[_set_key(rec["backend"], rec["part"], rec["heads"], rec.get("first_token"))] = rec
                    self.resumed += 1
                elif kind == "meta":
                    if rec.get("key") != self.key:
                        raise ValueError(f"it belongs to settings {rec.get('key')!r}, not {self.key!r}")
                else:
                    raise ValueError(f"unknown record kind {kind!r}")
            except (KeyError, TypeError, ValueError) as e:
                what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                raise self._error(i, f"a {kind!r} record that cannot be used ({what})") from None

    def _append(self, rec: dict) -> None:
        append_line_durable(self.path, json.dumps(rec))

    # ------------------------------------------------------------------ ranking pass
    def add_grad(self, batch: int, rec: dict) -> None:
        rec = {"kind": "grad", "batch": int(batch), **rec}
        self.grads[int(batch)] = rec
        self._append(rec)

    def add_ft_grad(self, batch: int, rec: dict) -> None:
        rec = {"kind": "ft_grad", "batch": int(batch), **rec}
        self.ft_grads[int(batch)] = rec
        self._append(rec)

    # ------------------------------------------------------------------ exact scores
    def get_set(self, backend: str, part: str, heads: Iterable, first_token: Mapping | None = None) -> dict | None:
        return self.sets.get(_set_key(backend, part, heads, first_token))

    def add_set(self, backend: str, part: str, heads: Iterable, margins: list[float], seconds: float,
                cost: float, first_token: Mapping | None = None) -> dict:
        rec = {"kind": "set", "backend": backend, "part": part, "heads": head_rows(heads),
               "margins": [float(x) for x in margins], "seconds": seconds, "cost_fraction": cost}
        if first_token:
            rec["first_token"] = first_token_rows(first_token)
        self.sets[_set_key(backend, part, heads, first_token)] = rec
        self._append(rec)
        return rec
