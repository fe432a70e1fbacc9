"""Host-time accounting of the calibration inside a worker, for benchmarks.

Off by default (one attribute test per calibrated layer). When switched on (in the worker,
e.g. through ``LLM.collective_rpc``: see ``benchmarks/engine_overhead.py``) it sums the
wall time of

* ``plan_decode`` / ``plan_prefill``: building the step plan in the wrapped metadata
  builder, once per step with calibrated rows (so its ``calls`` count those steps);
* ``decode`` / ``prefill``: :meth:`LayerCalibrator.apply` in every calibrated layer,
* ``decode_whole_layer`` / ``prefill_whole_layer``: :meth:`LayerCalibrator.whole_layer`, the
  fused kernel that computes a calibrated layer's whole attention in steps whose rows all run
  ACT (it replaces the native kernel there, so this is attention time, calibration included),
* ``decode_native_layer`` / ``prefill_native_layer``: the native kernel in the same layers (those
  a profile in force calibrates) where it runs: the baseline of the whole-layer times, taken
  from ACT-off requests on the same engine,

by the kind of step (decode-only steps, steps with prefill rows),

so a benchmark can state the calibration's share of step time directly instead of from the
difference of two noisy end-to-end timings. Host time: on CPU that is the work itself; on
CUDA it is launch time only (kernels run asynchronously).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CalibrationTimer:
    enabled: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {kind: {"seconds": self.seconds[kind], "calls": self.calls[kind]} for kind in self.seconds}


def per_kind(snapshot: dict[str, dict[str, float]], kind: str) -> tuple[float, int]:
    """(calibration seconds including plan building, calibrated steps) of one kind of step
    (``"decode"`` or ``"prefill"``) in a :meth:`CalibrationTimer.snapshot`."""
    seconds = sum(snapshot.get(k, {}).get("seconds", 0.0) for k in (kind, "plan_" + kind))
    return seconds, int(snapshot.get("plan_" + kind, {}).get("calls", 0))


timer = CalibrationTimer()


def set_profiling(enabled: bool) -> dict[str, dict[str, float]]:
    """Switch the accounting on or off; returns what was accumulated and starts afresh."""
    out = timer.snapshot()
    timer.reset()
    timer.enabled = bool(enabled)
    return out
