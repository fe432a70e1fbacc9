"""Paired statistics of A/B accuracy comparisons, one home for eval and search.

* :mod:`act_plugin.stats.mcnemar` -- McNemar's exact test, its exact power, the minimum
  detectable effect and the words the reports use for them;
* :mod:`act_plugin.stats.paired` -- paired bootstrap CIs and the per-task comparison
  (:func:`compare`) of two arms' per-document correctness.

Needs numpy and scipy (the ``[eval]`` extra); the serving path never imports it.
"""

from __future__ import annotations

from act_plugin.stats.mcnemar import (
    MDE_ALPHA,
    MDE_POWER,
    PLANNING_DISCORDANCE,
    McNemar,
    Resolution,
    critical_counts,
    describe_mde,
    exact_power,
    mcnemar,
    mcnemar_p,
    min_discordant_pairs,
    minimum_detectable_effect,
    resolution,
)
from act_plugin.stats.paired import Comparison, compare, macro_bootstrap_ci, paired_bootstrap_ci

__all__ = ["MDE_ALPHA", "MDE_POWER", "PLANNING_DISCORDANCE", "McNemar", "Resolution", "Comparison", "mcnemar",
           "mcnemar_p", "min_discordant_pairs", "critical_counts", "exact_power", "minimum_detectable_effect",
           "resolution", "describe_mde", "compare", "paired_bootstrap_ci", "macro_bootstrap_ci"]
