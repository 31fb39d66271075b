"""The ``fastssl`` command line: ``fastssl <command> ...`` (also ``python -m fastssl``).

Each command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them (imported lazily, so ``fastssl info`` stays
fast and works even when an optional part is broken).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS = {
    "info": ("fastssl.info", "what is available: C++ extension, Triton, CUDA (and why not)"),
    "bench": ("fastssl.bench.cli", "fused vs reference vs torch.compile: time and peak memory"),
    "profile": ("fastssl.profiling", "per-phase time and peak memory of an SSL training step"),
    "train": ("fastssl.training", "SSL pre-training on embedded data + three linear probes"),
    "gpu-report": ("fastssl.gpu_report", "compile Triton/CUDA kernels for sm_80/sm_90: regs, spills"),
    "augment-demo": ("fastssl.augment_demo", "PNG grid of test images and their augmented views"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastssl", description="Fused kernels for self-supervised contrastive training.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
