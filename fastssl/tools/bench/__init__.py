"""The benchmark harness shared by ``fastssl bench`` and ``benchmarks/`` (pytest-benchmark).

Each op describes itself in ``fastssl/tools/bench/op_<name>.py`` with a module-level
``BENCHES: list[OpBench]`` (see :mod:`fastssl.tools.bench.spec`); :func:`discover` finds them, so
adding an op's benchmark touches no shared file.
"""
from __future__ import annotations

import importlib
import pkgutil

from .spec import OpBench


def discover() -> dict[str, OpBench]:
    """All benchmark specs, by name (``fastssl/tools/bench/op_*.py``)."""
    found: dict[str, OpBench] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("op_"):
            mod = importlib.import_module(f"{__name__}.{info.name}")
            for spec in getattr(mod, "BENCHES", []):
                found[spec.name] = spec
    return found


__all__ = ["OpBench", "discover"]
