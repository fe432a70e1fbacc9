"""Each decode row's arm on the device: the tables a CUDA graph's per-row decode kernel reads.

Its own module so that the kernels (:mod:`act_plugin.kernels.triton_decode`) and the package
face that binds them (:mod:`act_plugin.kernels`) both import it without importing each other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["RowArms"]


class RowArms(NamedTuple):
    """Per-row mode (CUDA graphs): each row's arm is read on the device from persistent
    tables, so one captured launch serves any batch of arms (``heads``/``beta``/``threshold``
    are then unused)."""

    row_arm: torch.Tensor  # int32 [>= G]: each row's arm slot, -1 for a row that runs no arm
    beta: torch.Tensor  # float32 [A]: each arm's beta
    tau: torch.Tensor  # float32 [A]: each arm's threshold
    head_flags: torch.Tensor  # [A, H] integers, unit head stride: the heads each arm calibrates in this layer
