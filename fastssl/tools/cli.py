"""The ``fastssl`` command line: ``fastssl <command> ...`` (also ``python -m fastssl``).

Each command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them. Only the module of the command being run is
imported (``fastssl --help`` imports none of them), so ``fastssl info`` stays fast and works
even when another command's module is broken (a missing matplotlib, a Triton that fails to
import).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS = {
    "info": ("fastssl.tools.info", "what is available: C++ extension, Triton, CUDA (and why not)"),
    "bench": ("fastssl.tools.bench.cli", "fused vs reference vs torch.compile: time and peak memory"),
    "profile": ("fastssl.tools.profiling", "per-phase time and peak memory of an SSL training step"),
    "train": ("fastssl.tools.training", "SSL pre-training on embedded data + three linear probes"),
    "gpu-report": ("fastssl.tools.gpu_report", "compile Triton/CUDA kernels for sm_80/sm_90: regs, spills"),
    "augment-demo": ("fastssl.tools.augment_demo", "PNG grid of test images and their augmented views"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to every option's help, except where the default says nothing
    (None, or False for an on/off flag) or the help text already states it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _command_in(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not an option), or None."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: every command is listed, but only the one ``argv`` names gets
    its arguments (which imports its module); with ``argv=None`` all of them do (for tests and
    documentation tools that want the complete parser)."""
    wanted = set(COMMANDS) if argv is None else {_command_in(argv)}
    parser = argparse.ArgumentParser(
        prog="fastssl", description="Fused kernels for self-supervised contrastive training.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        if name in wanted:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
