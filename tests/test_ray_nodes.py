"""``act-plugin ray-check``: nodes without act-plugin (or with another version) are named; with
ray installed, a local Ray instance's node is found able to run it."""

from __future__ import annotations

import pytest

from act_plugin.vllm.ray_nodes import node_report, problems


def _report(**kw):
    base = {"host": "gpu-2", "python": "/opt/venv/bin/python", "node_ip": "10.0.0.2", "act_plugin": "0.1.0",
            "vllm": "0.32.0", "entry_point": True}
    return {**base, **kw}


def test_each_kind_of_bad_node_is_named():
    here = {"act_plugin": "0.1.0", "vllm": "0.32.0"}
    assert problems([_report()], here) == []
    missing, old, no_entry, other_vllm = problems(
        [_report(act_plugin=None, node_ip="10.0.0.3"), _report(act_plugin="0.0.9"), _report(entry_point=False),
         _report(vllm="0.33.1")], here)
    assert missing.startswith("node 10.0.0.3 (gpu-2, /opt/venv/bin/python): act-plugin is not installed")
    assert "act-plugin 0.0.9, but this process has 0.1.0" in old
    assert "entry point 'act' is missing" in no_entry
    assert "vLLM 0.33.1, but this process has 0.32.0" in other_vllm


def test_this_environment_has_the_entry_point():
    """The report reads the installed metadata vLLM reads (an editable install counts)."""
    here = node_report()
    assert here["act_plugin"] is not None and here["entry_point"] is True


@pytest.mark.ray
@pytest.mark.slow
def test_local_ray_node_can_run_act_plugin():
    ray = pytest.importorskip("ray")
    from act_plugin.vllm.ray_nodes import cluster_reports

    try:
        reports = cluster_reports(address="local")
    finally:
        ray.shutdown()
    assert len(reports) == 1 and reports[0]["node_ip"]
    assert problems(reports, node_report()) == []
