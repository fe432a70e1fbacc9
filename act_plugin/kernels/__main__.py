"""``python -m act_plugin.kernels build``: compile the fused CPU kernel into torch's
extension cache now (``make install`` runs it) instead of on first use."""

from __future__ import annotations

import sys
import time

from act_plugin.kernels import cpu


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["build"]:
        print("usage: python -m act_plugin.kernels build", file=sys.stderr)
        return 2
    t = time.perf_counter()
    try:
        cpu.build(verbose=False)
    except Exception as exc:  # noqa: BLE001 -- report and let the caller decide
        print(f"act-plugin: the fused CPU kernel did not build ({type(exc).__name__}: {exc}); "
              "ACT will use the slower torch reference", file=sys.stderr)
        return 1
    print(f"act-plugin: fused CPU kernel {cpu.extension_name()} ready ({time.perf_counter() - t:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
