"""Atomic file writes for every file a user relies on (configs, search and eval outputs).

A crash, a Ctrl-C or a full disk in the middle of a write must never leave a truncated file
that still parses (a cut YAML head set is a *different* head set). Each write goes to a
temporary file in the same folder, is flushed and fsynced, then renamed over the target:
``os.replace`` is atomic on POSIX, so readers see the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "append_line_durable"]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 less the
        # umask), or the existing file's mode when it is replaced.
        os.fchmod(fd, _target_mode(p))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(p.parent)
    return p


def _target_mode(p: Path) -> int:
    try:
        return p.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj: Any, **dump_kwargs: Any) -> Path:
    dump_kwargs.setdefault("indent", 1)
    return atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def append_line_durable(path: str | Path, line: str) -> None:
    """Append one line (a JSONL record) and fsync it. A crash can only lose or cut the
    *last* line; readers of such logs must treat a cut last line as absent."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if "\n" in line:
        raise ValueError("append_line_durable writes exactly one line")
    with p.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
