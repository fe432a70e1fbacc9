"""The head grammar: which layers and query heads an ACT config names.

Compact head specs (for hand-written configs and command lines)::

    heads: {2: [0, 3], "5": "all", "10-12": [1, "4-6"]}
    heads: "2-28:*"                 # all heads of layers 2..28
    heads: "2-27:0,3;30:1-2"         # ';' separates layer groups
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, Literal

from act_plugin.config.errors import ACTConfigError

__all__ = ["ALL_HEADS", "MAX_INDEX", "parse_index_spec", "parse_heads"]

ALL_HEADS: Final = "all"
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")
# Largest layer or head index a config may name. Checked before a range is expanded, so a
# typo like "0-1000000000:*" is an error instead of a billion-element set; no model has
# anywhere near this many layers or query heads.
MAX_INDEX = 1023

HeadSet = list[int] | Literal["all"]


def parse_index_spec(spec: Any, what: str) -> HeadSet:
    """``3``, ``"3"``, ``"2-5"``, ``"1,4-6"``, ``[1, "4-6"]``, ``"*"``/``"all"`` -> sorted ints or 'all'."""
    if isinstance(spec, bool):
        raise ACTConfigError(f"{what}: expected an index, a range like '2-5' or 'all', got {spec!r}")
    if isinstance(spec, int):
        items: list[Any] = [spec]
    elif isinstance(spec, str):
        if _is_all(spec):
            return ALL_HEADS
        items = [s for s in spec.split(",") if s.strip()]
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        raise ACTConfigError(f"{what}: expected an index, a list or a range like '2-5', got {spec!r}")
    out: set[int] = set()
    for item in items:
        if isinstance(item, str) and _is_all(item):
            return ALL_HEADS
        out.update(_indices_of_item(item, what))
    return sorted(out)


def _is_all(text: str) -> bool:
    return text.strip().lower() in ("*", "all")


def _indices_of_item(item: Any, what: str) -> range:
    """One list item: an index or a range (never 'all': the caller handles it)."""
    if isinstance(item, bool):
        raise ACTConfigError(f"{what}: {item!r} is not an index")
    if isinstance(item, int):
        if item < 0:
            raise ACTConfigError(f"{what}: negative index {item}")
        _check_bound(item, item, what)
        return range(item, item + 1)
    m = _RANGE.match(item) if isinstance(item, str) else None
    if m is None:
        raise ACTConfigError(f"{what}: cannot read {item!r} (use 3, '2-5', '1,4-6' or 'all')")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if hi < lo:
        raise ACTConfigError(f"{what}: range {item!r} runs backwards")
    _check_bound(lo, hi, what)  # before expanding the range
    return range(lo, hi + 1)


def _check_bound(lo: int, hi: int, what: str) -> None:
    if hi > MAX_INDEX:
        shown = str(lo) if lo == hi else f"{lo}-{hi}"
        raise ACTConfigError(f"{what}: index {shown} is out of range (indices are 0..{MAX_INDEX}; "
                             f"a model's layers and heads are counted from 0)")


def parse_heads(value: Any) -> dict[int, HeadSet]:
    """An ACT config's ``heads`` in any accepted form -> layer -> sorted heads or 'all'."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = _split_compact(value)
    if not isinstance(value, Mapping):
        raise ACTConfigError(
            f"heads: expected a mapping layer -> heads or a string like '2-28:*', got {type(value).__name__}"
        )
    heads: dict[int, set[int] | Literal["all"]] = {}
    for layer_spec, head_spec in value.items():
        layers, parsed = _layer_group(layer_spec, head_spec)
        for layer in layers:
            prev = heads.get(layer)
            if parsed == ALL_HEADS or prev == ALL_HEADS:
                heads[layer] = ALL_HEADS
            else:
                heads[layer] = (prev or set()) | set(parsed)
    return {layer: (h if h == ALL_HEADS else sorted(h)) for layer, h in sorted(heads.items())}


def _split_compact(value: str) -> dict[str, str]:
    """``"2-27:0,3;30:1-2"`` -> ``{"2-27": "0,3", "30": "1-2"}``."""
    if not value.strip():
        raise ACTConfigError("heads: empty string (leave 'heads' out for no heads, or write e.g. '2-28:*')")
    groups: dict[str, str] = {}
    for part in value.split(";"):
        if not part.strip():
            continue
        if ":" not in part:
            raise ACTConfigError(f"heads: {part.strip()!r} needs the form 'LAYERS:HEADS', e.g. '2-28:*'")
        layer_part, head_part = part.split(":", 1)
        groups[layer_part] = head_part
    return groups


def _layer_group(layer_spec: Any, head_spec: Any) -> tuple[list[int], HeadSet]:
    """One ``layers: heads`` entry, checked: explicit layers, and at least one head."""
    layers = parse_index_spec(layer_spec, f"heads: layer key {layer_spec!r}")
    if layers == ALL_HEADS:
        raise ACTConfigError("heads: layer keys must be explicit indices or ranges, not 'all'")
    parsed = parse_index_spec(head_spec, f"heads of layer {layer_spec!r}")
    if not layers:
        raise ACTConfigError(f"heads: layer key {layer_spec!r} names no layer")
    if parsed != ALL_HEADS and not parsed:
        # '2-28:' or {5: []} would silently calibrate nothing on those layers
        raise ACTConfigError(
            f"heads of layer {str(layer_spec).strip()!r} is empty: name the heads (e.g. '0,3' or '*') "
            f"or leave the layer out"
        )
    return layers, parsed
