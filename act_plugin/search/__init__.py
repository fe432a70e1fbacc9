"""Head search: which (layer, head) pairs to calibrate (``act-plugin search CONFIG.yaml``).

See :mod:`act_plugin.search.run` for the methods and ``docs/search_results.md`` for measured
results. The pieces:

* :mod:`~act_plugin.search.config` -- the validated search config;
* :mod:`~act_plugin.search.hf_backend` -- first-order ranking of every head (one backward
  per batch) and exact scores on the transformers path;
* :mod:`~act_plugin.search.vllm_backend` -- exact scores in one running vLLM engine;
* :mod:`~act_plugin.search.split` -- the seeded search / validation parts of each task's training data;
* :mod:`~act_plugin.search.overlap` -- texts the training documents share with any task's evaluated split
  (dropped from the parts);
* :mod:`~act_plugin.search.select` -- per-task paired acceptance of head sets on validation;
* :mod:`~act_plugin.search.rules_config`, :mod:`~act_plugin.search.first_token`,
  :mod:`~act_plugin.search.hf_first_token`, :mod:`~act_plugin.search.rules_compare` -- a search
  over rules (``rules: [act, first_token]``): the grid, first_token candidates and their
  selection, the rule on the transformers path, and ACT vs first_token per task;
* :mod:`~act_plugin.search.store` -- resumable partial results;
* :mod:`~act_plugin.search.steps` -- prepare, rank, verify, combine;
* :mod:`~act_plugin.search.evaluator` -- exact evaluations through the store, and the backends' lifetimes;
* :mod:`~act_plugin.search.replicas` / :mod:`~act_plugin.search.replica` -- ``data_parallel: N``: the
  exact scores made by N replica processes side by side;
* :mod:`~act_plugin.search.analysis` -- ranking agreement, which objective predicts validation;
* :mod:`~act_plugin.search.report` / :mod:`~act_plugin.search.summary` -- the JSON report and its Markdown;
* :mod:`~act_plugin.search.outputs` -- the files, in ``runs/<name>/`` unless ``--update-shipped``;
* :mod:`~act_plugin.search.run` -- :func:`run_search`, the steps in order.

Importing this package is cheap (no torch, transformers or vLLM until a search runs).
"""

from act_plugin.search.config import SearchConfig, SearchConfigError, load_search_config

__all__ = ["SearchConfig", "SearchConfigError", "load_search_config", "run_search"]


def __getattr__(name):
    if name == "run_search":
        from act_plugin.search.run import run_search

        return run_search
    raise AttributeError(name)
