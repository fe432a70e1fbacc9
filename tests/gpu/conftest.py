"""GPU suite: runs only where CUDA and a CUDA build of vLLM are present (`make test-gpu`).

Everywhere else every test here is skipped at collection, so `make test` stays CPU-only.
"""

from __future__ import annotations

import pytest


def _why_not() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except ImportError:
        return "vLLM is not installed"
    if not current_platform.is_cuda():
        return f"vLLM is not a CUDA build (platform {current_platform.device_name})"
    return None


def pytest_collection_modifyitems(config, items):
    why = _why_not()
    if why is None:
        return
    skip = pytest.mark.skip(reason=f"GPU suite: {why}")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
