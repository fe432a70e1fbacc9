"""docs/ACT_SPEC.md is the repository's copy of the shared specification."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_spec_copy_matches_the_shared_spec():
    copy = (REPO / "docs" / "ACT_SPEC.md").read_text()
    assert "## 1. What a sink is" in copy
    shared = REPO.parent / "shared" / "ACT_SPEC.md"
    if not shared.is_file():
        pytest.skip(f"{shared} not found: nothing to compare the copy with")
    assert copy.split("-->\n\n", 1)[1] == shared.read_text(), "re-copy ../shared/ACT_SPEC.md into docs/ACT_SPEC.md"
