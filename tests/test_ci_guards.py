"""CI cannot pass with the shared data missing.

Without ``../shared/data`` the data-dependent tests used to skip and CI stayed green. Now
``.ci/run`` stops before installing anything, and the ``shared_data`` fixture fails instead of
skipping where ``ACT_REQUIRE_DATA`` is set (CI sets it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_fixture_probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run one test that takes ``shared_data`` through the project's conftest, in a fresh pytest."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import importlib.util
        _spec = importlib.util.spec_from_file_location("act_tests_conftest", {str(REPO / "tests" / "conftest.py")!r})
        _mod = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_mod)
        shared_data = _mod.shared_data
    """))
    (tmp_path / "test_probe.py").write_text("def test_probe(shared_data):\n    assert shared_data.is_dir()\n")
    full_env = {k: v for k, v in os.environ.items() if k not in ("ACT_REQUIRE_DATA", "ACT_DATA_DIR")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
        cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120,
    )


def test_missing_data_skips_on_a_developer_machine(tmp_path: Path) -> None:
    res = _run_fixture_probe(tmp_path, ACT_DATA_DIR=str(tmp_path / "no-such-data"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 skipped" in res.stdout and "shared benchmark data not found" in res.stdout


def test_missing_data_fails_where_required(tmp_path: Path) -> None:
    res = _run_fixture_probe(tmp_path, ACT_DATA_DIR=str(tmp_path / "no-such-data"), ACT_REQUIRE_DATA="1")
    assert res.returncode != 0, res.stdout + res.stderr
    assert "1 error" in res.stdout and "ACT_REQUIRE_DATA is set" in res.stdout  # a fixture failure is an error


def test_present_data_passes_where_required(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    res = _run_fixture_probe(tmp_path, ACT_DATA_DIR=str(data), ACT_REQUIRE_DATA="1")
    assert res.returncode == 0 and "1 passed" in res.stdout, res.stdout + res.stderr


def test_ci_script_stops_before_installing_without_data(tmp_path: Path) -> None:
    """``.ci/run`` with no data exits non-zero and never reaches ``make`` (a stub that records calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "make-calls"
    stub = bin_dir / "make"
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 0\n")
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "ACT_REQUIRE_DATA"}
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '')}", ACT_DATA_DIR=str(tmp_path / "no-such-data"))
    res = subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "shared data not found" in res.stderr
    assert not calls.exists(), f"make ran without the data: {calls.read_text()}"


def test_ci_script_requires_data_for_the_tests(tmp_path: Path) -> None:
    """With data present, ``.ci/run`` exports ACT_REQUIRE_DATA to every step (stub make records it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "env-seen"
    stub = bin_dir / "make"
    stub.write_text(f"#!/bin/sh\necho \"$1 ACT_REQUIRE_DATA=$ACT_REQUIRE_DATA\" >> {seen}\nexit 0\n")
    stub.chmod(0o755)
    data = tmp_path / "data"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ACT_REQUIRE_DATA"}
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '')}", ACT_DATA_DIR=str(data))
    res = subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = seen.read_text().split("\n")
    assert "test ACT_REQUIRE_DATA=1" in lines, lines
