"""Data-parallel shards of an (arm, task) piece: which documents replica k of N scores, its
shard file, and the merge of N shard files into the piece a single process would have written.

Document ``i`` of a task (among the first ``limit``) goes to shard ``i mod N``: interleaving
keeps the shards' prompt lengths alike. A replica scores its documents with lm-eval's own
selection (``simple_evaluate(samples={task: [doc ids]})``, which logs the true ``doc_id``). The
merge sorts the records by (seed, ``doc_id``), as one process writes them, and recomputes
lm-eval's aggregate metrics with lm-eval's own aggregation over the merged per-document items
in ``doc_id`` order: the same numbers from the same items in the same order.

Few-shot examples: lm-eval draws every document's examples from ONE random stream per task
(its sampler's ``rnd``, reseeded with the few-shot seed by each ``simple_evaluate``), one
``sampler.sample`` call per document, in document order, while it builds the requests -- and
with ``samples=`` it builds them for the selected documents only. A replica therefore replays
the draws of the documents before each of its own, in document order, and throws them away
(:func:`fewshot_in_document_order`): each document gets the examples one process gives it.

A shard file (``shards/<arm>__<task>.<k>-of-<N>.json``) is written atomically when the replica
finishes its part of the piece, with the piece's key: a rerun reuses it while the key and N
match.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from act_plugin.atomic_files import atomic_write_json
from act_plugin.eval.scored import ScoredPiece, numeric_metrics

__all__ = ["SHARDS_DIR", "shard_documents", "fewshot_in_document_order", "shard_path", "write_shard", "read_shard",
           "merge_shards"]

logger = logging.getLogger("act_plugin.eval")

SHARDS_DIR = "shards"
SHARD_SCHEMA = "act-plugin/eval-shard"
# where a replica ran, as its shard file records it
PLACEMENT_VARIABLES = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "CUDA_VISIBLE_DEVICES")


def shard_documents(task: Any, limit: int | float | None, shard: int, shards: int) -> list[int]:
    """The ``doc_id``s shard ``shard`` of ``shards`` scores: every ``shards``-th of the
    documents lm-eval would score with ``limit`` (its first ``limit``, or that fraction)."""
    from lm_eval.evaluator_utils import get_sample_size

    n = len(task.eval_docs)
    chosen = get_sample_size(task, limit)
    return list(range(shard, n if chosen is None else min(n, chosen), shards))


@contextmanager
def fewshot_in_document_order() -> Iterator[None]:
    """While a replica's ``simple_evaluate(samples=...)`` runs: each task's few-shot sampler
    first makes (and drops) the draws of the documents lm-eval skips, so its random stream is
    where one process scoring every document has it (see the module docs)."""
    from lm_eval.api.task import ConfigurableTask

    build = ConfigurableTask.build_all_requests
    own_attribute = "build_all_requests" in vars(ConfigurableTask)

    def build_all_requests(self: Any, *args: Any, samples: list[int] | None = None, **kwargs: Any) -> Any:
        sampler = getattr(self, "sampler", None)
        if not samples or sampler is None:
            return build(self, *args, samples=samples, **kwargs)
        own = sampler.sample
        ids = sorted(samples)  # lm-eval iterates the selected documents in document order
        state = {"call": 0, "next": 0}

        def sample(n: int, eval_doc: Any = None, df: Any = None, **kw: Any) -> Any:
            doc_id = ids[state["call"]] if state["call"] < len(ids) else state["next"]
            for skipped in range(state["next"], doc_id):
                own(n, eval_doc=None if eval_doc is None else self.eval_docs[skipped], df=df, **kw)
            state["call"] += 1
            state["next"] = doc_id + 1
            return own(n, eval_doc=eval_doc, df=df, **kw)

        sampler.sample = sample
        try:
            return build(self, *args, samples=samples, **kwargs)
        finally:
            del sampler.sample  # the class's method again

    ConfigurableTask.build_all_requests = build_all_requests
    try:
        yield
    finally:
        if own_attribute:
            ConfigurableTask.build_all_requests = build
        else:
            del ConfigurableTask.build_all_requests  # the inherited method again


def shard_path(out: Path, arm: str, task: str, shard: int, shards: int) -> Path:
    return out / SHARDS_DIR / f"{arm}__{task.replace(':', '-')}.{shard}-of-{shards}.json"


def write_shard(out: Path, key: str, shard: int, shards: int, scored: ScoredPiece) -> Path:
    """Save a replica's part of a piece (atomically), tagged with the piece's key."""
    payload = {"schema": SHARD_SCHEMA, "key": key, "shard": shard, "shards": shards,
               "arm": scored.arm, "task": scored.task, "records": scored.records,
               "lm_eval_raw": scored.lm_eval_raw, "metric_items": scored.metric_items,
               "engine": scored.engine, "preemptions": scored.preemptions, "wall_time_s": scored.wall_time_s,
               "placement": {k: os.environ[k] for k in PLACEMENT_VARIABLES if k in os.environ}}
    return atomic_write_json(shard_path(out, scored.arm, scored.task, shard, shards), payload)


def read_shard(out: Path, key: str, arm: str, task: str, shard: int, shards: int) -> dict | None:
    """A finished shard of this piece (same key and N), or None."""
    path = shard_path(out, arm, task, shard, shards)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("schema") != SHARD_SCHEMA or data.get("key") != key:
        logger.warning("eval: shard file %s is unreadable or of another run; running that shard again", path)
        return None
    return data


def merge_shards(shards: list[dict], lm_task: str, task: Any, seeds: list[int], limit: int | float | None,
                 bootstrap_iters: int) -> ScoredPiece:
    """The piece that one process scoring every document would have produced, from its shards
    (``task``: lm-eval's task object, whose aggregation functions recompute the metrics)."""
    first = shards[0]
    records = [r for seed in seeds for r in sorted((r for s in shards for r in s["records"] if r["seed"] == seed),
                                                   key=lambda r: r["doc_id"])]
    raw: dict[str, dict] = {}
    numeric: dict[str, dict] = {}
    for seed in map(str, seeds):
        parts = [s for s in shards if seed in s["lm_eval_raw"]]  # an empty shard scored nothing
        if not parts:
            continue
        items = sorted((i for s in parts for i in s["metric_items"][seed]), key=lambda i: i["doc_id"])
        raw[seed] = _merged_raw(parts[0]["lm_eval_raw"][seed], items, lm_task, task, limit, bootstrap_iters)
        numeric[seed] = numeric_metrics(raw[seed]["results"][lm_task])
    pre = [s["preemptions"] for s in shards]
    return ScoredPiece(
        arm=first["arm"], task=first["task"], records=records, lm_eval=numeric, lm_eval_raw=raw,
        engine=first["engine"], preemptions=sum(pre) if all(isinstance(p, int) for p in pre) else None,
        wall_time_s=max(s["wall_time_s"] for s in shards),  # the replicas ran side by side
    )


def _merged_raw(template: dict, items: list[dict], lm_task: str, task: Any, limit: int | float | None,
                bootstrap_iters: int) -> dict:
    """lm-eval's results for one seed over the merged documents: its aggregation of the
    per-document items (in ``doc_id`` order), its sample counts, and the run's limit."""
    # lm-eval's own aggregation (private name; the one simple_evaluate applies to each task)
    from lm_eval.evaluator_utils import _compute_task_aggregations

    raw_metrics: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for item in items:
        for metric, value in item["values"].items():
            raw_metrics[(metric, item["filter"])].append(value)
    agg, sample_len = _compute_task_aggregations(task, raw_metrics, bootstrap_iters)
    result = {**template["results"][lm_task], **agg, "sample_len": sample_len}
    counts = {**(template.get("n-samples") or {}).get(lm_task, {}), "effective": sample_len}
    # a replica passes its documents, not the limit, to simple_evaluate; the run's limit is what selected them
    config = {k: v for k, v in (template.get("config") or {}).items() if k != "samples"} | {"limit": limit}
    return json.loads(json.dumps({
        "results": {**template["results"], lm_task: result}, "n-samples": {lm_task: counts},
        "config": config, "versions": template.get("versions"),
    }, default=str))
