"""``act-lm-eval`` / ``python -m act_plugin.lmeval``: lm-eval's command line with the
``act-vllm`` model (:class:`act_plugin.eval.model.ActVLLM`) registered.

lm-eval 0.4.13 does not discover models through entry points, hence this wrapper, e.g.
``python -m act_plugin.lmeval --model act-vllm --model_args
pretrained=smollm2-135m,act=configs/act.yaml,act_profile=default --tasks act_sst2
--include_path evals/tasks``.
"""

from __future__ import annotations

import sys

__all__ = ["cli_main"]


def cli_main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with ``act-vllm`` registered."""
    from act_plugin.eval import register_lm_eval_model

    register_lm_eval_model()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    cli_main()
