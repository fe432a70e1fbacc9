"""The search config's ``rules`` and ``first_token`` keys: which calibration rules a search
proposes sets of, and the grid of the ``first_token`` rule (ZeroTuning)::

    rules: [act, first_token]          # default [act]: the ACT head search alone, as before
    first_token:
      gammas: [0.5, 0.75, 1.5, 2.0]    # scale of the attention on the first token (1 = no change)
      layers: "2-27"                   # layers whose heads are candidates (null: the search's candidates)
      top_k: 16                        # single (layer, head, gamma) candidates scored exactly
      uniform: true                    # also one candidate per gamma: every candidate head at that gamma
      combine_max: 8                   # candidates the validated forward selection tries

``spans`` is not a search rule: its key set is the emphasised text of each request, which
the search's classification prompts do not mark.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from act_plugin.config import ACTConfigError, parse_index_spec

__all__ = ["SEARCH_RULES", "FirstTokenOptions", "parse_rules"]

SEARCH_RULES = ("act", "first_token")


class FirstTokenOptions(BaseModel):
    """The grid and budget of the ``first_token`` candidates (used when ``rules`` names it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gammas: list[float] = Field([0.5, 0.75, 1.5, 2.0], description="gamma grid (> 0, not 1): the scale of the "
                                "attention on the first token, the row renormalised")
    layers: Any = Field(None, description="layers whose candidate heads get first_token candidates, compact spec "
                        "like '2-27'; null = every layer of the search's candidates")
    top_k: int = Field(16, ge=0, description="single (layer, head, gamma) candidates scored exactly on the search "
                       "part, the best by their first-order estimate")
    uniform: bool = Field(True, description="also one candidate per gamma that scales every candidate head of "
                          "'layers' (ZeroTuning's main form), scored exactly")
    combine_max: int | None = Field(8, ge=1, description="candidates (best exact search-part gain first) the "
                                    "validated forward selection tries; null = every one that gains")

    @field_validator("gammas", mode="before")
    @classmethod
    def _gammas(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)) or not v:
            raise ACTConfigError(f"first_token.gammas must be a non-empty list of numbers > 0, got {v!r}")
        out: list[float] = []
        for g in v:
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0:
                raise ACTConfigError(f"first_token.gammas: {g!r} is not a finite number > 0")
            if float(g) == 1.0:
                raise ACTConfigError("first_token.gammas: 1 changes nothing (it is the baseline every candidate "
                                     "is compared with); leave it out")
            if float(g) in out:
                raise ACTConfigError(f"first_token.gammas: {g!r} is listed twice")
            out.append(float(g))
        return out

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        if v is None or v == "":
            return None
        parsed = parse_index_spec(v, "first_token.layers")
        return None if parsed == "all" else parsed

    def layer_filter(self, num_layers: int) -> list[int] | None:
        """The named layers, checked against the model (None: no filter)."""
        if self.layers is None:
            return None
        bad = [x for x in self.layers if x >= num_layers]
        if bad:
            raise ACTConfigError(f"first_token.layers {bad}: the model has layers 0..{num_layers - 1}")
        return list(self.layers)


def parse_rules(v: Any) -> list[str]:
    """``rules``: a list (or comma-separated string) of search rules, ``act`` among them."""
    if isinstance(v, str):
        v = [x.strip() for x in v.split(",") if x.strip()]
    if not isinstance(v, (list, tuple)) or not v:
        raise ACTConfigError(f"rules must be a non-empty list like [act, first_token], got {v!r}")
    out: list[str] = []
    for r in v:
        if r == "spans":
            raise ACTConfigError("rules: 'spans' cannot be searched: its key set is each request's emphasised "
                                 "text, which the search's prompts do not mark (evaluate it on a span-marked "
                                 "task such as boolq_spans instead)")
        if r not in SEARCH_RULES:
            raise ACTConfigError(f"rules: unknown rule {r!r} (a search proposes sets of: {', '.join(SEARCH_RULES)})")
        if r in out:
            raise ACTConfigError(f"rules: {r!r} is listed twice")
        out.append(r)
    if "act" not in out:
        raise ACTConfigError("rules must include 'act': the ACT head search is the reference every other rule's "
                             "sets are compared with")
    return out
