"""``run_search``: calibration set -> candidate scores -> combined set -> ACT config + report.

Methods (``docs/ACT_SPEC.md`` section 3):

* ``exact`` -- the paper's procedure: every candidate head calibrated alone and scored on
  the calibration set in one running vLLM engine (runtime reconfiguration between
  candidates, all prompts of a candidate in one ``generate`` call); heads that beat the
  uncalibrated score are kept.
* ``fast`` (default) -- one first-order pass ranks every head at once (gates on each head's
  calibrated output, one backward per batch: :mod:`act_plugin.search.hf_backend`), then the
  top-K candidates (and, optionally, every head of a few ``check_layers`` as a brute-force
  check of the ranking) are scored exactly -- in vLLM or in transformers from cached hidden
  states (``fast.verify``); heads that beat the baseline are kept.

Both end with the combined-set step (:mod:`act_plugin.search.combine`). All exact scores
and ranking batches are appended to a JSONL keyed by a hash of the settings
(:mod:`act_plugin.search.store`), so an interrupted search resumes where it stopped and a
rerun gives the same result.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from act_plugin.config import ACTConfig, model_shape
from act_plugin.heads import group_by_layer
from act_plugin.search.combine import CombineResult, combine_heads
from act_plugin.search.config import SearchConfig, SearchConfigError
from act_plugin.search.scoring import CalibrationSet, Scores, score_logprobs
from act_plugin.search.store import SearchStore, model_fingerprint, settings_hash

__all__ = ["run_search", "SearchResult", "build_calibration_set", "ranking_agreement"]

logger = logging.getLogger("act_plugin.search")
Head = tuple[int, int]


@dataclass
class SearchResult:
    config: ACTConfig
    report: dict[str, Any]
    output: Path
    report_path: Path
    heatmap_path: Path


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[act-plugin search] {msg}", file=sys.stderr, flush=True)


def build_calibration_set(cfg: SearchConfig, tokenizer: Any) -> tuple[CalibrationSet, dict[str, int]]:
    """Training-split prompts of every task, ``samples_per_task`` each (seeded draw)."""
    from act_plugin.tasks import load_samples

    prompts, choices, gold, tasks = [], [], [], []
    counts: dict[str, int] = {}
    for task in cfg.tasks:
        samples = load_samples(task, "train", cfg.data_dir, limit=cfg.samples_per_task, seed=cfg.seed,
                               tokenizer=tokenizer)
        if not samples:
            raise SearchConfigError(f"task {task}: its training split is empty")
        for s in samples:
            ids = tokenizer(s.prompt, add_special_tokens=True)["input_ids"]
            prompts.append(list(ids))
            choices.append(tuple(int(x) for x in s.choice_token_ids))
            gold.append(int(s.gold))
            tasks.append(s.task)
        counts[task] = len(samples)
    return CalibrationSet(prompts, choices, gold, tasks), counts


def ranking_agreement(estimate: dict[Head, float], exact: dict[Head, float], ks=(1, 3, 5, 9)) -> dict[str, Any]:
    """Spearman correlation and top-k overlap between estimated and exact gains."""
    from scipy.stats import spearmanr

    common = sorted(set(estimate) & set(exact))
    if len(common) < 3:
        return {"n": len(common)}
    e = np.array([estimate[h] for h in common])
    x = np.array([exact[h] for h in common])
    rho = spearmanr(e, x).statistic
    order_e = [common[i] for i in np.lexsort((np.arange(len(common)), -e))]
    order_x = [common[i] for i in np.lexsort((np.arange(len(common)), -x))]
    overlap = {str(k): len(set(order_e[:k]) & set(order_x[:k])) / k for k in ks if k <= len(common)}
    sign = float(np.mean(np.sign(e) == np.sign(x)))
    return {"n": len(common), "spearman": float(rho), "topk_overlap": overlap, "sign_agreement": sign}


class _Timer:
    def __init__(self):
        self.t = {}

    def add(self, key: str, seconds: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + seconds


def run_search(
    cfg: SearchConfig,
    *,
    progress: bool = True,
    resume: bool = True,
    quiet: bool = False,
    on_candidate: Callable[[Head, dict], None] | None = None,
    hf_model: Any = None,
    llm: Any = None,
    write: bool = True,
) -> SearchResult:
    """Run the search of ``cfg`` and write the ACT config, the JSON report and the heatmap.

    ``on_candidate(head, record)`` is called after each exact candidate score (raise from
    it to interrupt; a rerun resumes). ``hf_model`` / ``llm`` reuse a loaded transformers
    model / a running ACT-enabled vLLM engine (tests)."""
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from act_plugin.models import ensure_model

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    timer = _Timer()
    started = _dt.datetime.now(_dt.UTC)
    model_path = ensure_model(cfg.model)
    shape = model_shape(AutoConfig.from_pretrained(model_path))
    L, H = shape.num_layers, shape.num_heads
    candidates = cfg.candidate_heads(L, H)
    check_layers = cfg.check_layers(L) if cfg.method == "fast" else []
    tok = AutoTokenizer.from_pretrained(model_path)
    calib, counts = build_calibration_set(cfg, tok)
    exact_backend = "vllm" if cfg.method == "exact" else cfg.fast.verify
    need_hf = cfg.method == "fast"

    prompts_digest = hashlib.sha256(json.dumps([calib.prompts, calib.choice_ids, calib.gold]).encode()).hexdigest()
    settings = {
        "model": model_fingerprint(model_path), "prompts": prompts_digest[:16], "beta": cfg.beta,
        "threshold": cfg.threshold, "exact_backend": exact_backend,
        "hf": {"batch_tokens": cfg.hf.batch_tokens} if need_hf or exact_backend == "hf" else None,
        "engine": cfg.engine if exact_backend == "vllm" else None,
    }
    key = settings_hash(settings)
    store = SearchStore(cfg.state_dir, key, settings, resume=resume)
    _log(f"model {cfg.model} ({L} layers x {H} heads), {len(candidates)} candidates, {len(calib)} calibration "
         f"prompts from the training splits of {', '.join(f'{t} ({n})' for t, n in counts.items())}; method "
         f"{cfg.method}, score {cfg.score}; partial results: {store.path}"
         + (f" (resuming: {store.resumed} records)" if store.resumed else ""), quiet)

    hf = None
    vl = None
    threads_used: dict[int, int] = {}
    estimates: dict[Head, float] = {}
    est_matrix = np.full((L, H), np.nan)
    ranking_s = None
    try:
        # ------------------------------------------------------------ ranking (fast)
        if need_hf:
            from act_plugin.search.hf_backend import HFSearchBackend

            t = time.perf_counter()
            hf = HFSearchBackend(model_path, calib, beta=cfg.beta, threshold=cfg.threshold,
                                 batch_tokens=cfg.hf.batch_tokens, threads=cfg.hf.threads,
                                 cache_hidden=cfg.hf.cache_hidden and exact_backend == "hf", model=hf_model)
            timer.add("load_hf", time.perf_counter() - t)
            if exact_backend == "hf" and cfg.hf.cache_hidden:
                per_layer = sum(b.tokens for b in hf.batches) * hf.inner.embed_tokens.embedding_dim * 4
                cand_layers = sorted({lyr for lyr, _ in candidates} | set(check_layers))
                if per_layer * len(cand_layers) <= cfg.hf.cache_gib * 2**30:
                    hf.plan_cache(cand_layers)  # filled by the ranking pass itself: no extra baseline pass
            t = time.perf_counter()
            with tqdm(total=len(calib), desc="ranking: first-order pass (1 backward/batch)", unit="prompt",
                      disable=not progress, dynamic_ncols=True) as bar:
                grad, _ = hf.gradients(candidates, done=dict(store.grads), on_batch=store.add_grad,
                                       progress=bar.update)
            ranking_s = time.perf_counter() - t
            timer.add("ranking", ranking_s)
            est_matrix = grad
            estimates = {(lyr, h): float(grad[lyr, h]) for lyr, h in candidates}
            _log(f"ranking pass: {ranking_s:.1f}s for {len(candidates)} heads", quiet)

        # ------------------------------------------------------------ which heads get exact scores
        if cfg.method == "exact":
            verify = list(candidates)
            reasons = {h: "exact" for h in verify}
        else:
            ranked = sorted(candidates, key=lambda h: (-estimates[h], h))
            verify = ranked[: cfg.fast.top_k]
            reasons = {h: "top_k" for h in verify}
            for h in candidates:
                if h[0] in check_layers and h not in reasons:
                    verify.append(h)
                    reasons[h] = "check"
                elif h[0] in check_layers:
                    reasons[h] = "top_k+check"

        if exact_backend == "hf":
            backend = hf
            backend.plan_cache({lyr for lyr, _ in verify})
        else:
            if hf is not None:
                threads_used = dict(hf.threads.used)
                hf.close()
                hf = None
                gc.collect()
            from act_plugin.search.vllm_backend import VLLMSearchBackend

            t = time.perf_counter()
            vl = VLLMSearchBackend(model_path, calib, beta=cfg.beta, threshold=cfg.threshold, engine=cfg.engine,
                                   seed=cfg.seed, llm=llm)
            timer.add("engine_start", time.perf_counter() - t)
            backend = vl

        def exact_scores(heads, phase: str) -> dict:
            rec = store.get_set(backend.name, heads)
            if rec is None:
                t = time.perf_counter()
                lp = backend.evaluate(heads)
                sec = time.perf_counter() - t
                rec = store.add_set(backend.name, heads, score_logprobs(lp, calib).to_dict(), sec,
                                    backend.cost_fraction(heads))
                timer.add(phase, sec)
            return rec

        t = time.perf_counter()
        base_rec = exact_scores([], "baseline")
        base = Scores.from_dict(base_rec["scores"])
        base_score = base.get(cfg.score)
        _log(f"baseline ({backend.name}): accuracy {base.accuracy:.4f}, margin {base.margin:.4f}", quiet)

        exact: dict[Head, dict] = {}
        with tqdm(total=len(verify), desc=f"exact scores ({backend.name})", unit="head", disable=not progress,
                  dynamic_ncols=True) as bar:
            for h in verify:
                rec = exact_scores([h], "verify" if reasons[h] != "check" else "check")
                exact[h] = rec
                s = Scores.from_dict(rec["scores"]).get(cfg.score)
                bar.set_postfix_str(f"L{h[0]}H{h[1]} {cfg.score} {s - base_score:+.4f}")
                bar.update(1)
                if on_candidate:
                    on_candidate(h, rec)
        exact_score = {h: Scores.from_dict(r["scores"]).get(cfg.score) for h, r in exact.items()}
        kept = sorted(h for h, s in exact_score.items() if s > base_score)
        _log(f"{len(kept)} of {len(exact)} exactly scored heads beat the baseline alone", quiet)

        # ------------------------------------------------------------ combined set
        if cfg.combine and kept:
            with tqdm(desc="combined-set step", unit="set", disable=not progress, dynamic_ncols=True) as bar:
                def evaluate(s: frozenset) -> float:
                    rec = exact_scores(sorted(s), "combine")
                    bar.update(1)
                    return Scores.from_dict(rec["scores"]).get(cfg.score)

                if cfg.combine_max_heads and len(kept) > cfg.combine_max_heads:
                    _log(f"combined-set step starts from the best {cfg.combine_max_heads} of the {len(kept)} kept "
                         "heads (combine_max_heads)", quiet)
                comb = combine_heads(kept, evaluate, base_score, singles=exact_score,
                                     max_heads=cfg.combine_max_heads, max_evals=cfg.combine_max_evals)
        elif kept:  # combined-set step off: the paper's rule alone (every kept head)
            comb = CombineResult(heads=kept, score=float("nan"), baseline=base_score, start=kept, start_score=None,
                                 note="combined-set step off: every kept head is returned, whatever the set scores")
        else:
            comb = CombineResult(heads=[], score=base_score, baseline=base_score, start=[], start_score=None,
                                 note="no head beats the baseline alone: the empty set is returned")
        selected = [tuple(h) for h in comb.heads]
        sel_rec = exact_scores(selected, "combine") if selected else base_rec
        sel = Scores.from_dict(sel_rec["scores"])
    finally:
        if vl is not None:
            vl.close()
        if hf is not None:
            threads_used = dict(hf.threads.used)
            hf.close()

    total_s = time.perf_counter() - t0
    # ---------------------------------------------------------------- report
    heads_map: dict[int, list[int]] = group_by_layer((lyr, h) for lyr, h in selected)
    date = started.strftime("%Y-%m-%d")
    source = (f"act-plugin search {date}: method {cfg.method}"
              + (f" (first-order ranking, top {cfg.fast.top_k} verified in {exact_backend})"
                 if cfg.method == "fast" else " (every candidate alone, vLLM)")
              + f", score {cfg.score}, model {cfg.model}, tasks {','.join(cfg.tasks)} (train splits), "
              f"{len(calib)} prompts (<= {cfg.samples_per_task} per task, seed {cfg.seed}); calibration "
              f"{cfg.score} {base_score:.4f} -> {sel.get(cfg.score):.4f}")
    act_cfg = ACTConfig(beta=cfg.beta, threshold=cfg.threshold, heads=heads_map, name=cfg.config_name,
                        source=source, model=cfg.model)
    act_cfg.validate_for(shape)

    check_est = {h: estimates[h] for h in exact if reasons[h] in ("check", "top_k+check") and h in estimates}
    delta_margin = {h: Scores.from_dict(r["scores"]).margin - base.margin for h, r in exact.items()}
    delta_score = {h: s - base_score for h, s in exact_score.items()}
    check = None
    if check_layers:
        check = {
            "layers": check_layers,
            "vs_exact_margin": ranking_agreement(check_est, {h: delta_margin[h] for h in check_est}),
            "vs_exact_score": ranking_agreement(check_est, {h: delta_score[h] for h in check_est}),
        }
    verified_agreement = (ranking_agreement({h: estimates[h] for h in exact if h in estimates}, delta_margin)
                          if estimates else None)

    exact_evals = [r for r in store.sets.values() if r["backend"] == backend.name and r.get("heads")]
    full_pass = [r["seconds"] / max(r.get("cost_fraction", 1.0), 1e-9) for r in exact_evals
                 if len(r["heads"]) == 1 and r.get("seconds")]
    per_full = float(np.median(full_pass)) if full_pass else None
    cand_rows = []
    for lyr, h in candidates:
        row: dict[str, Any] = {"layer": lyr, "head": h}
        if estimates:
            row["estimate_delta_margin"] = estimates[(lyr, h)]
            row["rank"] = None
        if (lyr, h) in exact:
            r = exact[(lyr, h)]
            row["exact"] = {**r["scores"], "delta_score": delta_score[(lyr, h)],
                            "delta_margin": delta_margin[(lyr, h)], "seconds": r.get("seconds"),
                            "why": reasons[(lyr, h)]}
            row["kept"] = (lyr, h) in kept
        cand_rows.append(row)
    if estimates:
        ranked = sorted(candidates, key=lambda h: (-estimates[h], h))
        rank = {h: i + 1 for i, h in enumerate(ranked)}
        for row in cand_rows:
            row["rank"] = rank[(row["layer"], row["head"])]

    report = {
        "name": act_cfg.name, "date": started.isoformat(timespec="seconds"), "model": cfg.model,
        "model_path": model_path, "shape": {"layers": L, "heads": H, "kv_heads": shape.num_kv_heads},
        "method": cfg.method, "score": cfg.score, "beta": cfg.beta, "threshold": cfg.threshold,
        "exact_backend": backend.name, "top_k": cfg.fast.top_k if cfg.method == "fast" else None,
        "tasks": counts, "prompts": len(calib), "prompt_tokens": int(sum(len(p) for p in calib.prompts)),
        "seed": cfg.seed, "settings_hash": key, "state_file": str(store.path),
        "baseline": base.to_dict(),
        "kept": [list(h) for h in kept],
        "combine": comb.to_dict(),
        "selected": {"heads": {str(k): v for k, v in heads_map.items()}, "count": len(selected),
                     "scores": sel.to_dict(), "delta_score": sel.get(cfg.score) - base_score,
                     "note": comb.note},
        "ranking_check": check,
        "ranking_vs_verified": verified_agreement,
        "candidates": cand_rows,
        "timing": {
            "total_s": total_s, **{f"{k}_s": v for k, v in timer.t.items()},
            "exact_evaluations": len(exact_evals),
            "full_pass_s_median": per_full,
            "brute_force_extrapolated_s": per_full * len(candidates) if per_full else None,
            "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
            "cpu_count": os.cpu_count(), "torch_threads": _torch_threads(),
            "hf_threads_used": {str(k): v for k, v in sorted(threads_used.items())}, "machine": platform.machine(),
            "resumed_records": store.resumed,
        },
        "config": cfg.to_dict(),
    }
    out = Path(cfg.output)
    report_path, heatmap_path = cfg.report_path, cfg.heatmap_path
    if write:
        out.parent.mkdir(parents=True, exist_ok=True)
        header = (f"# ACT head set found by `act-plugin search` ({date}) for {cfg.model}.\n"
                  f"# {len(selected)} heads; calibration {cfg.score} {base_score:.4f} -> {sel.get(cfg.score):.4f} "
                  f"on {len(calib)} training-split prompts ({', '.join(counts)}).\n"
                  f"# Full report: {report_path}\n")
        out.write_text(header + act_cfg.to_yaml())
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=1) + "\n")
        from act_plugin.search.summary import report_markdown

        report_path.with_suffix(".md").write_text(report_markdown(report))
        from act_plugin.search.plot import gain_heatmap

        exact_m = np.full((L, H), np.nan)
        for h, d in delta_score.items():
            exact_m[h] = d
        gain_heatmap(heatmap_path, est_matrix if estimates else None, exact_m, kept, selected,
                     f"{cfg.model}: per-head gain of calibrating one head ({len(calib)} train prompts)", cfg.score)
        _log(f"wrote {out}, {report_path} (+ .md), {heatmap_path}", quiet)
    _log(f"{len(selected)} heads selected; {cfg.score} {base_score:.4f} -> {sel.get(cfg.score):.4f}; "
         f"{total_s:.1f}s", quiet)
    return SearchResult(config=act_cfg, report=report, output=out, report_path=report_path,
                        heatmap_path=heatmap_path)


def _torch_threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except Exception:  # pragma: no cover
        return None
