"""Atomic writes (act_plugin.atomic_files): whole file or old file, never a cut one; usual file modes."""

from __future__ import annotations

import json
import os
import stat

import pytest

from act_plugin.atomic_files import append_line_durable, atomic_write_json, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_gets_umask_mode_and_replaced_file_keeps_its_mode(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "a.yaml"
        atomic_write_text(target, "x: 1\n")
        assert _mode(target) == 0o644  # not mkstemp's 0600
        os.chmod(target, 0o640)
        atomic_write_text(target, "x: 2\n")
        assert _mode(target) == 0o640
        assert target.read_text() == "x: 2\n"
    finally:
        os.umask(old)


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"a": 1})

    class Boom:  # json.dumps fails before anything is written
        pass

    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": Boom()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_interrupted_replace_removes_temp_and_keeps_old(tmp_path, monkeypatch):
    target = tmp_path / "c.txt"
    atomic_write_text(target, "old")

    def fail(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]


def test_append_line_durable_refuses_multiline(tmp_path):
    log = tmp_path / "s.jsonl"
    append_line_durable(log, '{"i": 1}')
    append_line_durable(log, '{"i": 2}')
    assert log.read_text().splitlines() == ['{"i": 1}', '{"i": 2}']
    with pytest.raises(ValueError):
        append_line_durable(log, "a\nb")
