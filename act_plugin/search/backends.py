"""The lifetimes of the backends that make the search's exact evaluations.

The transformers model is loaded first: it ranks every head with method ``fast``, and with
``verify: hf`` it also scores exactly, from cached hidden states. Otherwise one running vLLM
engine makes the exact scores; the transformers model is released before it starts, so the
two never hold memory at once. With ``data_parallel: N`` the exact scores are made by N replica
processes instead (:mod:`act_plugin.search.replicas`), each opening the backend one process
would open.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

from act_plugin.search.evaluator import SEARCH, Evaluator, val_part
from act_plugin.search.steps import Prepared, Ranking

__all__ = ["Backends", "open_ranking_backend", "open_exact_backends", "close_backends"]


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
    if prep.cfg.data_parallel > 1:
        _open_replica_parts(prep, ev, backends, ranking, llm)
    elif prep.exact_backend == "hf":
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


def _open_replica_parts(prep: Prepared, ev: Evaluator, backends: Backends, ranking: Ranking, llm: Any) -> None:
    """``data_parallel: N``: N replica processes make the exact scores (:mod:`act_plugin.search.replicas`);
    this process releases its transformers model first (each replica loads its own)."""
    from act_plugin.search.config import SearchConfigError
    from act_plugin.search.replicas import ReplicaPart, ReplicaPool
    from act_plugin.vllm.placement import replica_environments

    cfg = prep.cfg
    if llm is not None:
        raise SearchConfigError(f"data_parallel {cfg.data_parallel} starts its own scoring replicas; a running engine "
                                "(llm=) cannot be shared with them -- use data_parallel: 1 to reuse it")
    backends.release_hf()
    envs = replica_environments(cfg.data_parallel, cfg.engine if prep.exact_backend == "vllm" else {})
    spec = {"config": cfg.to_dict(), "key": prep.settings_key,
            # the transformers replicas cache the same layers' inputs as one process would
            "estimates": [[a, b, v] for (a, b), v in ranking.estimates.items()]}
    t = time.perf_counter()
    pool = ReplicaPool(spec, envs, prep.store.dir / f"{prep.settings_key}.replicas", prep.exact_backend)
    ev.seconds["replicas_start"] = time.perf_counter() - t
    ev.backends[SEARCH] = ReplicaPart(pool, SEARCH)
    for task in prep.data.validation:
        ev.backends[val_part(task)] = ReplicaPart(pool, val_part(task))


def close_backends(ev: Evaluator, backends: Backends) -> None:
    """Close every backend once (the transformers one may serve the search part too)."""
    hf = backends.hf
    if hf is not None:
        backends.threads_used = dict(hf.threads.used)
    ev.close()
    if hf is not None and ev.backends.get(SEARCH) is not hf:
        hf.close()
