"""Exact evaluations of head sets, and the lifetimes of the backends that make them.

:class:`Evaluator` gives the exact per-prompt margins of a head set on one part (the search
part, or one task's validation part) and never computes one twice: every result goes
through the partial-results store (:mod:`act_plugin.search.store`), which also serves the
results of an interrupted run. The backends: the transformers model (loaded first: it ranks
every head with method ``fast``, and with ``verify: hf`` it also scores exactly, from cached
hidden states), or one running vLLM engine for the exact scores (the transformers model is
released first, so both never hold memory at once).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from act_plugin.search.scoring import CalibrationSet, per_sample
from act_plugin.search.split import SearchData
from act_plugin.search.store import SearchStore

if TYPE_CHECKING:
    from act_plugin.search.steps import Prepared, Ranking

__all__ = ["SEARCH", "val_part", "Evaluator", "Backends", "open_ranking_backend", "open_exact_backends",
           "close_backends"]

SEARCH = "search"  # the name of the search part in the store


def val_part(task: str) -> str:
    """The store's name of one task's validation part."""
    return f"val:{task}"


class Evaluator:
    """Exact per-prompt margins of a head set on one part, through the store (never twice)."""

    def __init__(self, store: SearchStore, data: SearchData):
        self.store = store
        self.data = data
        self.backends: dict[str, Any] = {}  # part -> its backend
        self.seconds: dict[str, float] = {}  # phase -> seconds spent computing (not served by the store)

    def calib(self, part: str) -> CalibrationSet:
        return self.data.search if part == SEARCH else self.data.validation[part.removeprefix("val:")]

    def margins(self, part: str, heads, phase: str) -> np.ndarray:
        be = self.backends[part]
        rec = self.store.get_set(be.name, part, heads)
        if rec is None:
            t = time.perf_counter()
            lp = be.evaluate(list(heads))
            sec = time.perf_counter() - t
            _, valid = self.calib(part).choice_matrix()
            _, m = per_sample(lp, self.calib(part).gold, valid)
            rec = self.store.add_set(be.name, part, heads, m.tolist(), sec, be.cost_fraction(list(heads)))
            self.seconds[phase] = self.seconds.get(phase, 0.0) + sec
        return np.asarray(rec["margins"], dtype=np.float64)

    def validation_correct(self, heads, phase: str, tasks: list[str] | None = None) -> dict[str, np.ndarray]:
        return {t: self.margins(val_part(t), heads, phase) > 0 for t in (tasks or list(self.data.validation))}

    def close(self) -> None:
        seen = set()
        for be in self.backends.values():
            if id(be) not in seen:
                seen.add(id(be))
                be.close()


@dataclass
class Backends:
    """The transformers backend of a run (None once released) and the torch threads it used."""

    hf: Any = None
    threads_used: dict[int, int] = field(default_factory=dict)

    def threads(self) -> dict[int, int]:
        return dict(self.hf.threads.used) if self.hf is not None else self.threads_used

    def release_hf(self) -> None:
        if self.hf is not None:
            self.threads_used = dict(self.hf.threads.used)
            self.hf.close()
            self.hf = None
            gc.collect()


def open_ranking_backend(prep: Prepared, ev: Evaluator, hf_model: Any = None) -> Backends:
    """The transformers backend over the search part, when the run ranks (``fast``) or scores
    exactly in transformers; it caches the candidate layers' inputs during the ranking pass
    when they fit in ``hf.cache_gib`` (that saves a baseline pass)."""
    cfg = prep.cfg
    if not (cfg.method == "fast" or prep.exact_backend == "hf"):
        return Backends()
    from act_plugin.search.hf_backend import HFSearchBackend

    t = time.perf_counter()
    keep_cache = cfg.hf.cache_hidden and prep.exact_backend == "hf"
    hf = HFSearchBackend(prep.model_path, prep.data.search, beta=cfg.beta, threshold=cfg.threshold,
                         batch_tokens=cfg.hf.batch_tokens, threads=cfg.hf.threads, cache_hidden=keep_cache,
                         model=hf_model)
    ev.seconds["load_hf"] = time.perf_counter() - t
    if keep_cache:
        per_layer = sum(b.tokens for b in hf.batches) * hf.inner.embed_tokens.embedding_dim * 4
        cand_layers = sorted({lyr for lyr, _ in prep.candidates} | set(prep.check_layers))
        if per_layer * len(cand_layers) <= cfg.hf.cache_gib * 2**30:
            hf.plan_cache(cand_layers)  # filled by the ranking pass itself: no extra baseline pass
    return Backends(hf)


def open_exact_backends(prep: Prepared, ev: Evaluator, backends: Backends, ranking: Ranking, llm: Any = None) -> None:
    """One backend per part for the exact scores: the transformers model (sharing its weights
    across parts) or one vLLM engine (``llm``: reuse a running one) after releasing it."""
    if prep.exact_backend == "hf":
        _open_hf_parts(prep, ev, backends, ranking)
    else:
        backends.release_hf()
        _open_vllm_parts(prep, ev, llm)


def _open_hf_parts(prep: Prepared, ev: Evaluator, backends: Backends, ranking: Ranking) -> None:
    from act_plugin.search.hf_backend import HFSearchBackend

    cfg, hf = prep.cfg, backends.hf
    assert hf is not None  # exact_backend "hf" always loads the transformers backend first
    ev.backends[SEARCH] = hf
    for task, c in prep.data.validation.items():
        ev.backends[val_part(task)] = HFSearchBackend(
            prep.model_path, c, beta=cfg.beta, threshold=cfg.threshold, batch_tokens=cfg.hf.batch_tokens,
            threads=cfg.hf.threads, cache_hidden=cfg.hf.cache_hidden, model=hf.model, self_check=False)
    top = sorted(prep.candidates, key=lambda h: (-ranking.estimates.get(h, 0.0), h))[: cfg.fast.top_k]
    layers = {lyr for lyr, _ in top} | set(prep.check_layers)
    for be in ev.backends.values():
        be.plan_cache(layers)


def _open_vllm_parts(prep: Prepared, ev: Evaluator, llm: Any) -> None:
    from act_plugin.search.vllm_backend import VLLMSearchBackend

    cfg, d = prep.cfg, prep.data
    t = time.perf_counter()
    first = VLLMSearchBackend(prep.model_path, d.search, beta=cfg.beta, threshold=cfg.threshold, engine=cfg.engine,
                              seed=cfg.seed, llm=llm,
                              max_prompt_tokens=max(len(p) for c in [d.search, *d.validation.values()]
                                                    for p in c.prompts))
    ev.seconds["engine_start"] = time.perf_counter() - t
    ev.backends[SEARCH] = first
    for task, c in d.validation.items():
        ev.backends[val_part(task)] = VLLMSearchBackend(prep.model_path, c, beta=cfg.beta, threshold=cfg.threshold,
                                                        llm=first.llm)


def close_backends(ev: Evaluator, backends: Backends) -> None:
    """Close every backend once (the transformers one may serve the search part too)."""
    hf = backends.hf
    if hf is not None:
        backends.threads_used = dict(hf.threads.used)
    ev.close()
    if hf is not None and ev.backends.get(SEARCH) is not hf:
        hf.close()
