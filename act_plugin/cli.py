"""``act-plugin`` command line: one subcommand per module, imported only when used.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily so that `act-plugin models`
# never pays for importing vLLM.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "models": ("act_plugin.models.cli", "list or pull the embedded models"),
    "eval": ("act_plugin.eval.cli", "A/B evaluation (baseline vs calibrated) with lm-eval"),
    "search": ("act_plugin.search.cli", "find which heads to calibrate from a calibration set"),
    "inspect": ("act_plugin.attention_maps", "show attention maps and detected sinks"),
    "ray-check": ("act_plugin.vllm.ray_nodes", "check that every Ray node can run act-plugin (vLLM on Ray)"),
}


# Import names of the packages of the [eval] extra (pyproject.toml): a lean install that runs
# a command needing them gets the extra's name, not a traceback.
EVAL_EXTRA_MODULES = ("lm_eval", "scipy", "matplotlib")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="act-plugin", description="Attention calibration (ACT) for vLLM")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        _maybe_add_arguments(p, module, name)
    return parser


def _maybe_add_arguments(p: argparse.ArgumentParser, module: str, name: str) -> None:
    # Only the chosen subcommand's module is imported (argv[1]); the others keep a
    # permissive parser so that `act-plugin --help` stays fast.
    if len(sys.argv) > 1 and sys.argv[1] == name:
        importlib.import_module(module).add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    from act_plugin.config import ACTConfigError

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        args = build_parser().parse_args(sys.argv[1:])
        return int(importlib.import_module(args._module).run(args) or 0)
    except ACTConfigError as e:
        print(f"act-plugin {command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in EVAL_EXTRA_MODULES:
            raise
        print(f"act-plugin {command}: error: {e.name} is not installed; this command needs the [eval] extra: "
              f"pip install 'act-plugin[eval]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
