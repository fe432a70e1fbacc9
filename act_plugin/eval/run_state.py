"""An eval run's state in its output folder: fingerprints of the inputs and the finished pieces.

A run is fingerprinted by everything that changes a number (:func:`run_inputs`: model, engine,
tasks, few-shot settings, data folder, each arm's ACT hash, versions). Each finished
(arm, task) piece is recorded in ``run_state.json`` with a key of the inputs it depends on and
the hash of its samples file, so a rerun of the same command reuses intact pieces, re-runs
changed ones, and refuses a folder that holds another run (naming what differs).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from act_plugin.atomic_files import atomic_write_json
from act_plugin.config import ACTConfigError
from act_plugin.eval.config import EvalConfig, PerTaskArm

__all__ = ["STATE_FILE", "STATE_SCHEMA", "RAW_FILE", "FINAL_FILES", "RunState", "run_inputs"]

logger = logging.getLogger("act_plugin.eval")

STATE_FILE = "run_state.json"
STATE_SCHEMA = "act-plugin/eval-run-state"
RAW_FILE = "lm_eval_raw.json"
# Files a run writes once every piece is done; removed when a run (re)starts in a folder, so
# a partial run never shows a report of an earlier one.
FINAL_FILES = ("results.json", "report.md", "deltas.png", "config.yaml", RAW_FILE)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_inputs(cfg: EvalConfig, model_path: str, data_dir: Path, versions: dict[str, str]) -> dict[str, Any]:
    """Everything that changes a number of the run (not labels, output folder, statistics
    settings or ``comparisons``, which are recomputed from the per-sample files: adding a
    comparison to a finished run re-uses every piece)."""
    return {
        "model": model_path, "engine": dict(cfg.engine), "share_engine": cfg.share_engine,
        "tasks": list(cfg.tasks), "num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "seeds": cfg.run_seeds,
        "data_dir": str(data_dir), "next_token": cfg.next_token, "batch_size": cfg.batch_size,
        "arms": {a: _arm_inputs(cfg, a) for a in cfg.arms},
        "versions": {k: versions[k] for k in ("act_plugin", "lm_eval", "vllm", "torch")},
    }


def _arm_inputs(cfg: EvalConfig, arm: str) -> str | dict[str, str | None] | None:
    """An arm's ACT hash; for a per-task arm, each task's profile hash (None: no profile)."""
    act = cfg.arms[arm]
    if isinstance(act, PerTaskArm):
        return {t: (p.hash if (p := act.profile(t)) is not None else None) for t in cfg.tasks}
    return act.hash if act is not None else None


def _run_key_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs that name the run: a per-task arm's profile hashes are left out, so that
    editing one task's profile re-runs only that task's piece (its piece key changes)
    instead of refusing the folder as another run."""
    arms = {a: ("per-task" if isinstance(h, dict) else h) for a, h in inputs["arms"].items()}
    return {**inputs, "arms": arms}


def _runs(inputs: dict[str, Any], arm: str, task: str) -> bool:
    """Whether the run's inputs run (arm, task): not a per-task arm's task without a profile."""
    h = inputs["arms"][arm]
    return not isinstance(h, dict) or h.get(task) is not None


def _piece_id(arm: str, task: str) -> str:
    return f"{arm}/{task}"


class RunState:
    """The run's progress in ``run_state.json``: one entry per finished (arm, task) piece,
    written atomically after the piece's samples file, and ``complete`` once every output
    is written. A folder holding a different run (other inputs) is refused; one holding this
    run resumes: finished pieces whose samples file is intact are reused, the rest re-run."""

    def __init__(self, out: Path, inputs: dict[str, Any]):
        self.out = out
        self.path = out / STATE_FILE
        self.inputs = inputs
        self.key = _digest(_run_key_inputs(inputs))
        self.pieces: dict[str, dict[str, Any]] = {}
        self.engine_start_s: list[float] = []
        self.complete = False

    def piece_key(self, arm: str, task: str) -> str:
        """What the piece's numbers depend on: the run's settings and this arm's ACT config on
        this task (a per-task arm: that task's profile only)."""
        common = {k: v for k, v in self.inputs.items() if k not in ("arms", "tasks")}
        act_hash = self.inputs["arms"][arm]
        if isinstance(act_hash, dict):
            act_hash = act_hash.get(task)
        return _digest({**common, "arm": arm, "act_hash": act_hash, "task": task})

    @classmethod
    def open(cls, out: Path, inputs: dict[str, Any]) -> RunState:
        state = cls(out, inputs)
        # a new run marks its folder at once: a data-parallel run records no piece until its
        # replicas finish, and a rerun must find its saved shards in a folder of this run
        if not out.exists():
            out.mkdir(parents=True)
            state._save()
            return state
        if not out.is_dir():
            raise ACTConfigError(f"output dir {out} is a file; choose another --output-dir")
        entries = sorted(p.name for p in out.iterdir())
        if not entries:
            state._save()
            return state
        if STATE_FILE not in entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ACTConfigError(
                f"output dir {out} is not empty and holds no eval run ({shown}); choose an empty or new "
                f"--output-dir so that its files cannot be mistaken for this run's"
            )
        try:
            saved = json.loads(state.path.read_text())
            if saved.get("schema") != STATE_SCHEMA:
                raise ValueError(f"schema {saved.get('schema')!r}")
            old_inputs, old_key = saved["inputs"], saved["key"]
        except (ValueError, KeyError, TypeError) as e:
            raise ACTConfigError(
                f"{state.path}: unreadable run state ({e}); delete the folder or choose another --output-dir"
            ) from None
        if old_key != state.key:
            new, old = _run_key_inputs(inputs), _run_key_inputs(old_inputs)
            changed = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
            raise ACTConfigError(
                f"output dir {out} holds a different run (differs in: {', '.join(changed) or 'the inputs'}); "
                f"choose another --output-dir, or delete it to start over"
            )
        state.engine_start_s = list(saved.get("engine_start_s") or [])
        for pid, piece in (saved.get("pieces") or {}).items():
            samples = out / str(piece.get("samples", ""))
            arm, task = piece.get("arm"), piece.get("task")
            ours = arm in inputs["arms"] and task in inputs["tasks"] and pid == _piece_id(arm, task)
            if ours and not _runs(inputs, arm, task):
                logger.warning("eval: piece %s of the earlier session is dropped: arm %r has no profile for %s now "
                               "(the baseline's records stand for it)", pid, arm, task)
            elif (ours and piece.get("key") == state.piece_key(arm, task) and samples.is_file()
                    and _sha256(samples) == piece.get("samples_sha256")):
                state.pieces[pid] = piece
            else:
                logger.warning("eval: piece %s of the earlier session is incomplete or changed; running it again", pid)
        state._remove_stale()
        state._save()
        return state

    def _remove_stale(self) -> None:
        """Remove our kinds of files that no reused piece accounts for (samples of unfinished
        or changed pieces, final outputs of an earlier session, temporary files)."""
        keep = {p["samples"] for p in self.pieces.values()}
        for p in self.out.iterdir():
            ours = (p.name.startswith("samples_") and p.name.endswith(".jsonl")) or p.name in FINAL_FILES or (
                p.name.startswith(".") and p.name.endswith(".tmp"))
            if ours and p.name not in keep and p.is_file():
                p.unlink()

    def _save(self) -> None:
        atomic_write_json(self.path, {
            "schema": STATE_SCHEMA, "key": self.key, "inputs": self.inputs, "complete": self.complete,
            "engine_start_s": self.engine_start_s, "pieces": self.pieces,
        })

    def done(self, arm: str, task: str) -> bool:
        return _piece_id(arm, task) in self.pieces

    def record(self, piece: dict[str, Any]) -> None:
        piece["key"] = self.piece_key(piece["arm"], piece["task"])
        piece["samples_sha256"] = _sha256(self.out / piece["samples"])
        self.pieces[_piece_id(piece["arm"], piece["task"])] = piece
        self._save()

    def engine_started(self, seconds: float) -> None:
        self.engine_start_s.append(seconds)
        self._save()

    def mark_complete(self) -> None:
        self.complete = True
        self._save()
