"""Torch thread count for the transformers search path on a shared machine."""

from __future__ import annotations

import time

import torch

__all__ = ["ThreadGovernor"]


class ThreadGovernor:
    """Torch threads for a shared machine: ``"auto"`` uses every core nobody else is using.

    OpenMP threads that share a core with another busy process spin at barriers, so on a
    2-core machine with one foreign busy process two threads run 2-3x SLOWER than one
    (measured). ``auto`` measures the CPU time other processes used since the last check
    (``/proc/stat`` minus this process) and sets ``cores - round(others)`` threads (at
    least 1) before each batch. Thread counts change float summation order (log-probs
    differ by ~1e-5), so results are bitwise reproducible only for a fixed ``threads``.
    """

    def __init__(self, threads: int | str | None):
        import os

        self.fixed = int(threads) if isinstance(threads, int) or (isinstance(threads, str) and threads.isdigit()) \
            else None
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.used: dict[int, int] = {}
        self._last = self._sample()
        if self.fixed:
            torch.set_num_threads(self.fixed)
        elif threads is None:
            self.fixed = torch.get_num_threads()

    @staticmethod
    def _sample():
        import os

        try:
            with open("/proc/stat") as fh:
                f = [int(x) for x in fh.readline().split()[1:]]
            busy = sum(f) - f[3] - (f[4] if len(f) > 4 else 0)
            with open("/proc/self/stat") as fh:
                st = fh.read().rsplit(")", 1)[1].split()
            mine = int(st[11]) + int(st[12])
            return time.monotonic(), busy, mine, os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def update(self) -> int:
        if self.fixed:
            n = self.fixed
        else:
            now = self._sample()
            n = torch.get_num_threads()
            if now is not None and self._last is not None and now[0] - self._last[0] > 0.2:
                others = ((now[1] - self._last[1]) - (now[2] - self._last[2])) / now[3] / (now[0] - self._last[0])
                n = max(1, min(self.cores, self.cores - int(round(max(0.0, others)))))
                self._last = now
            elif self._last is None:
                self._last = now
            if n != torch.get_num_threads():
                torch.set_num_threads(n)
        self.used[n] = self.used.get(n, 0) + 1
        return n
