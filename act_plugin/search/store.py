"""Resumable partial results: one JSONL file per settings hash.

Every finished unit of work appends one line and flushes it (a killed search loses at most
the unit in progress): ``{"kind": "grad", "batch": i, ...}`` for a batch of the ranking
pass, ``{"kind": "set", "backend": "hf"|"vllm", "heads": [[l, h], ...], "scores": {...}}``
for an exact score (the empty set is the baseline). A rerun with the same settings reads
the file back and skips what is there. The hash covers everything that changes a number
(model files, calibration prompts, beta, threshold, backend, batching), not what only
changes which numbers are computed (candidates, top-K, check layers), so e.g. raising
``top_k`` reuses every score already paid for.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["SearchStore", "settings_hash", "model_fingerprint"]


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def _set_key(backend: str, heads: Iterable) -> str:
    return backend + ":" + ";".join(f"{int(a)}.{int(b)}" for a, b in sorted((int(a), int(b)) for a, b in heads))


class SearchStore:
    """Append-only JSONL of finished work for one settings hash (``<dir>/<hash>.jsonl``)."""

    def __init__(self, directory: str | os.PathLike, key: str, settings: dict[str, Any], resume: bool = True):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.path = self.dir / f"{key}.jsonl"
        self.grads: dict[int, dict] = {}
        self.sets: dict[str, dict] = {}
        self.resumed = 0
        if self.path.exists() and not resume:
            self.path.unlink()
        if self.path.exists():
            self._load()
        else:
            self._append({"kind": "meta", "key": key, "settings": settings})

    def _load(self) -> None:
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption
                kind = rec.get("kind")
                if kind == "grad":
                    self.grads[int(rec["batch"])] = rec
                    self.resumed += 1
                elif kind == "set":
                    self.sets[_set_key(rec["backend"], rec["heads"])] = rec
                    self.resumed += 1

    def _append(self, rec: dict) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    # ------------------------------------------------------------------ ranking pass
    def add_grad(self, batch: int, rec: dict) -> None:
        rec = {"kind": "grad", "batch": int(batch), **rec}
        self.grads[int(batch)] = rec
        self._append(rec)

    # ------------------------------------------------------------------ exact scores
    def get_set(self, backend: str, heads: Iterable) -> dict | None:
        return self.sets.get(_set_key(backend, heads))

    def add_set(self, backend: str, heads: Iterable, scores: dict, seconds: float, cost: float) -> dict:
        heads = [[int(a), int(b)] for a, b in sorted((int(a), int(b)) for a, b in heads)]
        rec = {"kind": "set", "backend": backend, "heads": heads, "scores": scores, "seconds": seconds,
               "cost_fraction": cost}
        self.sets[_set_key(backend, heads)] = rec
        self._append(rec)
        return rec
