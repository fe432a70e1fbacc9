"""One (arm, task) piece as lm-eval scored it, on every document or on one data-parallel
replica's shard (:mod:`act_plugin.eval.harness` fills it; :mod:`act_plugin.eval.shards` merges
shards of it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ScoredPiece", "numeric_metrics"]


@dataclass
class ScoredPiece:
    """One (arm, task) scored on some documents (all of them, or one replica's shard)."""

    arm: str
    task: str
    records: list[dict]
    lm_eval: dict[str, dict]  # seed -> lm-eval's numeric results
    lm_eval_raw: dict[str, dict]  # seed -> lm-eval's results, sample counts, config, versions (JSON)
    engine: dict[str, Any]
    preemptions: int | None
    wall_time_s: float
    # seed -> per document (doc_id order): lm-eval's filter and metric items, for a data-parallel merge
    metric_items: dict[str, list[dict]] = field(default_factory=dict)


def numeric_metrics(metrics: dict) -> dict[str, float | None]:
    """lm-eval's numeric results (NaN and inf as None, for JSON)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else float(v)
    return out
