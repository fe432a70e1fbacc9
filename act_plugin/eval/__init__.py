"""A/B evaluation of attention calibration with lm-evaluation-harness.

* :mod:`act_plugin.tasks` -- the ACT paper suite over local data (``load_samples``), shared with search;
* :mod:`act_plugin.eval.config` -- the eval config (``EvalConfig``);
* :mod:`act_plugin.eval.runner` -- runs every arm through ``lm_eval.simple_evaluate``, piece by
  piece (arm, task), resumable; its steps: :mod:`~act_plugin.eval.run_state` (fingerprints,
  resuming), :mod:`~act_plugin.eval.engine_arms` (engine setting and read-back per arm),
  :mod:`~act_plugin.eval.harness` (driving lm-eval), :mod:`~act_plugin.eval.records`,
  :mod:`~act_plugin.eval.assemble` (typed results and statistics), :mod:`~act_plugin.eval.outputs`;
* :mod:`act_plugin.eval.model` -- the lm-eval model ``act-vllm`` (``ActVLLM``; imports vLLM and lm-eval);
* :mod:`act_plugin.eval.scoring` -- next-token scoring, one prefill per context (pure);
* :mod:`act_plugin.eval.prompt_spans` -- a ``spans`` arm's per-document ``act_spans``, shifted
  into the prompt lm-eval sends (pure);
* :mod:`act_plugin.stats` -- paired bootstrap CIs, McNemar's exact test, its power and the
  minimum detectable effect (shared with the search; ``act_plugin.eval.stats`` re-exports it);
* :mod:`act_plugin.eval.results` -- ``results.json`` as a typed model (``EvalResults``, schema v2);
* :mod:`act_plugin.eval.report` -- writes ``results.json``, ``report.md`` and per-sample files;
  :mod:`act_plugin.eval.chart` the chart;
* :mod:`act_plugin.eval.cli` -- ``act-plugin eval CONFIG.yaml``.

Importing this package is cheap (no vLLM, no lm-eval): the model is registered with lm-eval
by :func:`register_lm_eval_model`, lazily.
"""

from __future__ import annotations

__all__ = ["LM_EVAL_MODEL_NAME", "register_lm_eval_model"]

LM_EVAL_MODEL_NAME = "act-vllm"
_MODEL_TARGET = "act_plugin.eval.model:ActVLLM"


def register_lm_eval_model() -> None:
    """Register ``act-vllm`` with lm-eval without importing vLLM: lm-eval imports
    :mod:`act_plugin.eval.model` the first time the model is looked up. Idempotent."""
    try:
        from lm_eval.api.registry import model_registry
    except ImportError:  # lm-eval without lazy registration: import (and so register) the model now
        import act_plugin.eval.model  # noqa: F401

        return
    if LM_EVAL_MODEL_NAME not in model_registry:
        model_registry.register(LM_EVAL_MODEL_NAME, target=_MODEL_TARGET)
