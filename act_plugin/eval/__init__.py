"""A/B evaluation of attention calibration with lm-evaluation-harness.

* :mod:`act_plugin.eval.tasks` -- the ACT paper suite over local data (``load_samples``);
* :mod:`act_plugin.eval.config` -- the eval config (``EvalConfig``);
* :mod:`act_plugin.eval.runner` -- runs every arm through ``lm_eval.simple_evaluate``, piece by
  piece (arm, task), resumable;
* :mod:`act_plugin.eval.stats` -- paired bootstrap CIs and McNemar tests;
* :mod:`act_plugin.eval.results` -- ``results.json`` as a typed model (``EvalResults``, schema v2);
* :mod:`act_plugin.eval.report` -- writes ``results.json``, ``report.md``, the chart, per-sample files;
* :mod:`act_plugin.eval.cli` -- ``act-plugin eval CONFIG.yaml``.

Importing this package is cheap (no vLLM, no lm-eval).
"""
