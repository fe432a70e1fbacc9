"""One data-parallel replica: ``python -m act_plugin.eval.replica SPEC.json``.

Started by :func:`act_plugin.eval.data_parallel.run_pieces_parallel` with its placement in the
environment (cores or GPUs), it runs its pieces on its shard of the documents with one engine
(as the single-process run does: one engine for every arm, or one per arm) and saves each
shard atomically as it finishes, tagged with the piece's key.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from act_plugin.atomic_files import atomic_write_json
from act_plugin.eval.config import load_eval_config
from act_plugin.eval.harness import score_pieces
from act_plugin.eval.scored import ScoredPiece
from act_plugin.eval.shards import SHARDS_DIR, write_shard

__all__ = ["run_replica", "main"]


def run_replica(spec: dict[str, Any]) -> None:
    """Score this replica's pieces (``spec["todo"]``) on its shard and save each shard."""
    cfg = load_eval_config(spec["config"])
    out, k, n = Path(spec["out"]), int(spec["shard"]), int(spec["shards"])
    starts: list[float] = []
    starts_file = out / SHARDS_DIR / f"replica-{k}-of-{n}.starts.json"

    def engine_started(seconds: float) -> None:
        starts.append(seconds)
        atomic_write_json(starts_file, starts)

    def finished(scored: ScoredPiece) -> None:
        write_shard(out, spec["keys"][f"{scored.arm}/{scored.task}"], k, n, scored)

    score_pieces(cfg, spec["todo"], spec["model_path"], Path(spec["data_dir"]), spec["lm_tasks"], spec["seeds"],
                 spec["verbose"], spec["progress"] and k == 0, on_engine_start=engine_started, on_piece=finished,
                 shard=(k, n))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m act_plugin.eval.replica SPEC.json", file=sys.stderr)
        return 2
    run_replica(json.loads(Path(args[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
