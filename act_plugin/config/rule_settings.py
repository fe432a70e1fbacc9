"""The ``rule`` of a calibration profile and each rule's own settings.

A profile names one rule of :mod:`act_plugin.rules` (``rule``, default ``act``) and only
that rule's settings; another rule's key is refused by name::

    {"beta": 0.4, "threshold": 0.1, "heads": "2-27:0,4"}             # act (the default)
    {"rule": "first_token", "scale": 1.5, "heads": "2-27:*"}         # ZeroTuning
    {"rule": "first_token", "scale": {"2-9:*": 1.5, "10:0,3": 0.5}}  # gamma per layer/head
    {"rule": "spans", "alpha": 0.01, "heads": "8-15:*"}              # PASTA

``first_token``'s ``scale`` (gamma > 0) is a number, or a mapping from head specs in the
compact head grammar (``"LAYERS:HEADS"``, :mod:`act_plugin.config.heads`) to gamma. The
mapping's head specs must not overlap, and they *are* the profile's heads: ``heads`` may
then be left out (given, it must name exactly the same heads). The mapping is kept in a
canonical form, one key per layer and scale (``"5:0,3"``, ``"7:all"``), so that two
spellings of the same scales hash alike. ``spans``' ``alpha`` is in (0, 1], default 0.01.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final, Literal

from act_plugin.config.errors import ACTConfigError
from act_plugin.config.heads import ALL_HEADS, HeadSet, parse_heads

__all__ = ["DEFAULT_RULE", "RULE_SETTINGS", "RuleName", "check_rule_keys", "parse_alpha", "parse_scale",
           "scale_of", "settings_of"]

RuleName = Literal["act", "first_token", "spans"]
DEFAULT_RULE: Final = "act"
# rule -> the keys it reads (every rule also takes heads, name, source, model)
RULE_SETTINGS: Final[dict[str, tuple[str, ...]]] = {
    "act": ("beta", "threshold"),
    "first_token": ("scale",),
    "spans": ("alpha",),
}
DEFAULT_ALPHA: Final = 0.01


def check_rule_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A profile's raw mapping with its rule checked, other rules' keys refused by name, the
    rule's defaults filled in and a per-head ``scale`` canonicalised (``heads`` derived)."""
    rule = data.get("rule", DEFAULT_RULE)
    if not isinstance(rule, str) or rule.strip() not in RULE_SETTINGS:
        raise ACTConfigError(f"rule: unknown rule {rule!r} (rules: {', '.join(RULE_SETTINGS)})")
    rule = data["rule"] = rule.strip()
    own = RULE_SETTINGS[rule]
    for other, keys in RULE_SETTINGS.items():
        for key in keys:
            if key in data and key not in own:
                raise ACTConfigError(
                    f"'{key}' is a setting of rule '{other}', not of rule '{rule}' "
                    f"(rule '{rule}' takes: {', '.join(own)})"
                )
    if rule == "first_token":
        if data.get("scale") is None:
            raise ACTConfigError("rule 'first_token' needs 'scale' (gamma > 0: a number, or per head "
                                 "{'LAYERS:HEADS': gamma, ...})")
        if isinstance(data["scale"], Mapping):
            data["scale"], derived = _per_head_scale(data["scale"])
            _check_heads_match(data.get("heads"), derived)
            data["heads"] = derived
    elif rule == "spans" and data.get("alpha") is None:
        data["alpha"] = DEFAULT_ALPHA
    return data


def _gamma(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ACTConfigError(f"{where} must be a number > 0, got {v!r}")
    g = float(v)
    if not (math.isfinite(g) and g > 0):
        raise ACTConfigError(f"{where} must be a finite number > 0 (1 = no change), got {v!r}")
    return g


def _per_head_scale(spec: Mapping) -> tuple[dict[str, float], dict[int, HeadSet]]:
    """``{"2-9:*": 1.5, ...}`` -> canonical ``{"2:all": 1.5, ...}`` and the heads it names;
    overlapping specs are refused (which gamma would win is not obvious)."""
    if not spec:
        raise ACTConfigError("scale: the per-head mapping is empty")
    by_layer: dict[int, dict[int | str, float]] = {}  # layer -> head (or 'all') -> gamma
    for key, value in spec.items():
        gamma = _gamma(value, f"scale[{key!r}]")
        if not isinstance(key, str) or ":" not in key:
            raise ACTConfigError(f"scale: key {key!r} must be a head spec 'LAYERS:HEADS' like '2-9:*' or '10:0,3'")
        for layer, heads in parse_heads(key).items():
            prev = by_layer.setdefault(layer, {})
            named = [ALL_HEADS] if heads == ALL_HEADS else list(heads)
            if prev and (ALL_HEADS in prev or heads == ALL_HEADS or set(prev) & set(named)):
                raise ACTConfigError(f"scale: key {key!r} names heads of layer {layer} another key already names")
            prev.update({h: gamma for h in named})
    return _canonical(by_layer)


def _canonical(by_layer: dict[int, dict[int | str, float]]) -> tuple[dict[str, float], dict[int, HeadSet]]:
    """One key per layer and gamma (heads sorted), and the heads named, both sorted by layer."""
    canonical: dict[str, float] = {}
    heads: dict[int, HeadSet] = {}
    for layer in sorted(by_layer):
        gammas = by_layer[layer]
        if ALL_HEADS in gammas:
            canonical[f"{layer}:{ALL_HEADS}"] = gammas[ALL_HEADS]
            heads[layer] = ALL_HEADS
            continue
        named = sorted(h for h in gammas if isinstance(h, int))
        heads[layer] = named
        for gamma in sorted(set(gammas.values()), key=lambda g: min(h for h in named if gammas[h] == g)):
            canonical[f"{layer}:{','.join(str(h) for h in named if gammas[h] == gamma)}"] = gamma
    return canonical, heads


def _check_heads_match(heads: Any, derived: dict[int, HeadSet]) -> None:
    if heads is None:
        return
    if parse_heads(heads) != derived:
        raise ACTConfigError("heads: with a per-head 'scale' the scale's keys are the heads; leave 'heads' out "
                             "or name exactly the same heads")


def parse_scale(v: Any) -> float | dict[str, float] | None:
    """``scale`` after :func:`check_rule_keys`: None, a number, or the canonical mapping."""
    if v is None:
        return None
    if isinstance(v, Mapping):
        return {str(k): _gamma(g, f"scale[{k!r}]") for k, g in v.items()}
    return _gamma(v, "scale")


def parse_alpha(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ACTConfigError(f"alpha must be a number in (0, 1], got {v!r}")
    a = float(v)
    if not 0.0 < a <= 1.0:
        raise ACTConfigError(f"alpha must be in (0, 1] (the scale of the attention outside the spans; "
                             f"1 = no change), got {v!r}")
    return a


def scale_of(scale: float | dict[str, float] | None, layer: int, head: int) -> float:
    """gamma of global query ``head`` in ``layer`` (1.0 where a per-head mapping names none)."""
    if not isinstance(scale, dict):
        return 1.0 if scale is None else float(scale)
    for key, gamma in scale.items():
        lyr, heads = key.split(":", 1)
        if int(lyr) == layer and (heads == ALL_HEADS or head in map(int, heads.split(","))):
            return gamma
    return 1.0


def settings_of(rule: str, cfg: Any) -> dict[str, Any]:
    """The settings ``rule`` reads, from a config object."""
    return {key: getattr(cfg, key) for key in RULE_SETTINGS[rule]}
