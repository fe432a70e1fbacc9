"""Attention heads named ``(layer, head)`` and the one helper that groups them by layer (the
``{layer: [heads]}`` form of ACT configs and of the per-layer work of every backend)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

__all__ = ["Head", "group_by_layer"]

Head = tuple[int, int]  # (0-based layer, 0-based query head)
_Item = TypeVar("_Item")


def group_by_layer(items: Iterable[tuple[int, _Item]]) -> dict[int, list[_Item]]:
    """``{layer: [item, ...]}`` from ``(layer, item)`` pairs (e.g. heads ``(layer, head)``),
    layers and items in the order first seen; sort the input for a canonical order."""
    grouped: dict[int, list[_Item]] = {}
    for layer, item in items:
        grouped.setdefault(int(layer), []).append(item)
    return grouped
