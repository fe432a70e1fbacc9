"""Where the benchmark data is (data folder resolution) and the rows of a task split
(official splits, or the seeded carve-out of files without one)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from act_plugin.config import ACTConfigError
from act_plugin.tasks.readers import TaskDataError
from act_plugin.tasks.registry import CARVE_SEED, TaskSpec, canonical_split, get_task

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_DATA_DIR = "ACT_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The data folder and how it was chosen: the argument, ``$ACT_DATA_DIR``, else
    ``../shared/data`` relative to the current directory or to the repository."""
    if data_dir not in (None, ""):
        return Path(data_dir).expanduser().resolve(), "data_dir setting"
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser().resolve(), f"${ENV_DATA_DIR}"
    candidates = [Path.cwd() / ".." / "shared" / "data", REPO_ROOT / ".." / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve(), "default ../shared/data"
    return candidates[0].resolve(), "default ../shared/data"


def data_file(spec: TaskSpec, split: str, data_dir: str | os.PathLike | None) -> Path:
    root, how = resolve_data_dir(data_dir)
    split = canonical_split(split)
    rel = spec.files.get(split) or spec.files.get("all")
    if rel is None:
        raise ACTConfigError(f"task {spec.name} has no '{split}' split (it has {sorted(spec.files)})")
    path = root / rel
    if not path.is_file():
        raise TaskDataError(
            f"task {spec.name} ({spec.title}): data file not found: {path} -- expected {spec.describe_split(split)} "
            f"under the data folder {root} (chosen by: {how}). Point `data_dir` in the eval config or "
            f"${ENV_DATA_DIR} at the folder holding the offline benchmark data (see ../shared/data/README.md)."
        )
    return path


def check_data(tasks: Iterable[str], data_dir: str | os.PathLike | None = None, splits: Sequence[str] = ("test",),
               ) -> None:
    """Raise :class:`TaskDataError` for the first project task whose data files are missing."""
    for name in tasks:
        if name.startswith("lm_eval:"):
            continue
        spec = get_task(name)
        for split in splits:
            data_file(spec, split, data_dir)
        if spec.name == "dbpedia":
            meta = data_file(spec, "test", data_dir).parent / "dbpedia_meta.txt"
            if not meta.is_file():
                raise TaskDataError(f"task dbpedia: label file not found: {meta} (expected beside dbpedia_val.csv)")


@lru_cache(maxsize=64)
def _rows_cached(path: str, mtime: float, reader: Callable) -> tuple[dict, ...]:
    return tuple(reader(Path(path)))


def raw_rows(spec: TaskSpec, split: str, data_dir) -> list[tuple[int, dict]]:
    """(row index in the file, raw row) for a split, in file order."""
    split = canonical_split(split)
    path = data_file(spec, split, data_dir)
    try:
        rows = _rows_cached(str(path), path.stat().st_mtime, spec.reader)
    except TaskDataError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise TaskDataError(f"task {spec.name}: cannot read {path}: {type(e).__name__}: {e}") from None
    indexed = list(enumerate(rows))
    if split in spec.files:  # official split (or "all" of a carved file)
        return indexed
    if spec.train_fraction is None:
        raise ACTConfigError(f"task {spec.name} has no '{split}' split")
    order = list(range(len(indexed)))
    random.Random(f"{CARVE_SEED}:{spec.files['all']}").shuffle(order)
    n_train = round(spec.train_fraction * len(order))
    keep = set(order[:n_train] if split == "train" else order[n_train:])
    return [indexed[i] for i in sorted(keep)]

