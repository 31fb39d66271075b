"""Loads the compiled extension ``fastssl._C`` once and remembers why, if it could not.

Importing ``fastssl._C`` runs the static op registrations of ``csrc/`` (``torch.ops.fastssl.*``).
Nothing else in fastssl imports ``_C`` directly: ask :func:`available` / :func:`has_op`, and
report :func:`why_unavailable` to users (``fastssl info`` does).
"""
from __future__ import annotations

import importlib
import os

import torch

_loaded: bool | None = None
_error: str | None = None


def _load() -> bool:
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    if os.environ.get("FASTSSL_DISABLE_EXT", "0") == "1":
        _loaded, _error = False, "disabled by FASTSSL_DISABLE_EXT=1"
        return False
    try:
        importlib.import_module("fastssl._C")
        _loaded = True
    except ImportError as exc:  # not built (FASTSSL_NO_EXT=1) or built against another torch
        _loaded = False
        hint = ("the C++ extension was not built (installed with FASTSSL_NO_EXT=1, or from "
                "source without building: run `pip install --no-build-isolation -e .`)"
                if "No module named" in str(exc) else
                "the C++ extension failed to load (often: built against another torch; "
                "rebuild with `pip install --no-build-isolation -e .`)")
        _error = f"{hint}: {type(exc).__name__}: {exc}"
    return _loaded


def available() -> bool:
    """True when ``fastssl._C`` loaded and its ops are registered."""
    return _load()


def why_unavailable() -> str | None:
    """The reason the extension is missing, or None when it loaded."""
    _load()
    return _error


def has_op(name: str) -> bool:
    """True when ``torch.ops.fastssl.<name>`` exists (the extension loaded and defines it)."""
    if not _load():
        return False
    try:
        getattr(torch.ops.fastssl, name)
        return True
    except (AttributeError, RuntimeError):
        return False


# Constant for a process (registrations happen at import): torch.compile folds the answer
# instead of tracing into the dispatcher query (a graph break).
@torch.compiler.assume_constant_result
def has_kernel(name: str, dispatch_key: str) -> bool:
    """True when ``torch.ops.fastssl.<name>`` has a kernel for ``dispatch_key`` (``"CPU"``,
    ``"CUDA"``): the CUDA C++ kernels exist only in builds with CUDA."""
    if not has_op(name):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastssl::{name}", dispatch_key)


def build_info() -> str | None:
    return torch.ops.fastssl.build_info() if _load() else None
