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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared benchmark data folder: ``$ACT_DATA_DIR`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("ACT_DATA_DIR")
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        where = "ACT_DATA_DIR" if env else "<repo>/../shared/data (set ACT_DATA_DIR to override)"
        pytest.skip(f"shared benchmark data not found at {path} ({where})")
    return path
