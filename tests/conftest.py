"""Shared pytest fixtures.

Keep this file to fixtures used by several test modules; module-specific helpers belong in
their test module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Folder of the embedded SmolLM2-135M model (float32 HF folder), built once per machine
    in the default cache (``$ACT_PLUGIN_CACHE/models`` or ``~/.cache/act-plugin/models``)."""
    from act_plugin.models import ensure_model

    return ensure_model("smollm2-135m")


# Set (to anything but "" or "0") where the data must be there: CI sets it, so a missing
# ../shared/data fails the data-dependent tests instead of skipping them into a green run.
REQUIRE_DATA_ENV = "ACT_REQUIRE_DATA"


def data_required() -> bool:
    return os.environ.get(REQUIRE_DATA_ENV, "").strip() not in ("", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared benchmark data folder: ``$ACT_DATA_DIR`` if set, else ``<repo>/../shared/data``.

    Missing: the test is skipped on a developer's machine, but fails where
    ``ACT_REQUIRE_DATA`` is set (CI)."""
    env = os.environ.get("ACT_DATA_DIR")
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        where = "ACT_DATA_DIR" if env else "<repo>/../shared/data (set ACT_DATA_DIR to override)"
        message = f"shared benchmark data not found at {path} ({where})"
        if data_required():
            pytest.fail(f"{message}; {REQUIRE_DATA_ENV} is set, so the data-dependent tests may not skip")
        pytest.skip(message)
    return path
