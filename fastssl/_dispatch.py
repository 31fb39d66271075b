"""The one place that picks a backend for an op.

Every fused op is a set of ``torch.ops.fastssl`` ops (``fastssl/ops/_library.py``): the
dispatcher runs the C++ kernel on CPU tensors and the Triton kernel on CUDA tensors. What is
decided here is whether an op runs those kernels at all, or the pure-PyTorch reference, and
that a forced backend fits the tensors' device.

Backends:

* ``"triton"``   -- the op's Triton kernels (``fastssl/ops``): CUDA tensors, or CPU tensors under
  the Triton interpreter inside :func:`triton_on_cpu` (tests only: slow).
* ``"cpp"``      -- the op's C++ kernels (``fastssl._C``, ``csrc/cpu``): CPU tensors.
* ``"cuda"``     -- CUDA C++ kernels (``fastssl._C`` built with CUDA, ``csrc/cuda``): CUDA
  tensors, for the ops that have one (``cuda_op``: the EMA update and the MoCo enqueue).
* ``"reference"``-- pure PyTorch (``fastssl.reference``): the spec, any device.
* ``"auto"``     -- ``FASTSSL_BACKEND`` if set, else triton on CUDA, cpp on CPU. If the C++
  extension is missing, CPU ops run the reference after **one** warning that says why
  (on CUDA without Triton, the CUDA C++ kernel when the op has one);
  an explicitly requested backend that cannot run raises instead (never a silent fallback).
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from . import _ext

BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")


def triton_interpret() -> bool:
    """True when Triton runs in interpreter mode (kernels execute on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def triton_available() -> tuple[bool, str | None]:
    return _triton_available()


@functools.lru_cache(maxsize=None)
def _triton_available() -> tuple[bool, str | None]:
    try:
        import triton  # noqa: F401
        return True, None
    except Exception as exc:  # pragma: no cover - triton is a dependency
        return False, f"{type(exc).__name__}: {exc}"


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


_triton_on_cpu_depth = 0


@contextlib.contextmanager
def triton_on_cpu():
    """Runs the ops' Triton kernels on CPU tensors (under ``TRITON_INTERPRET=1``) inside the
    block, for tests: the launchers registered as CUDA kernels are registered for the CPU key
    too, overriding the C++ kernels until the block ends (the dispatcher then restores them).
    Put ``torch.compile`` and ``backward()`` inside the block as well: the compiled graph and
    the autograd backward call the ops when they run, not when they are built.

    Raises:
        RuntimeError: Triton is not in interpreter mode (set ``TRITON_INTERPRET=1`` before
            importing triton), or not installed.
    """
    global _triton_on_cpu_depth
    if not triton_interpret():
        raise RuntimeError("triton_on_cpu() needs the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before importing fastssl (tests only)")
    ok, why = triton_available()
    if not ok:
        raise RuntimeError(f"triton_on_cpu(): Triton is unavailable: {why}")
    from .ops import _library
    lib = None
    if _triton_on_cpu_depth == 0:
        lib = torch.library.Library(_library.NAMESPACE, "IMPL")
        with warnings.catch_warnings():  # "Overriding a previously registered kernel": on purpose
            warnings.simplefilter("ignore")
            for name, fn in _library.TRITON_KERNELS.items():
                lib.impl(name, fn, "CPU")
    _triton_on_cpu_depth += 1
    try:
        yield
    finally:
        _triton_on_cpu_depth -= 1
        if lib is not None:
            lib._destroy()


def triton_on_cpu_active() -> bool:
    return _triton_on_cpu_depth > 0


def _is_triton_op(name: str | None) -> bool:
    """Whether ``torch.ops.fastssl.<name>`` has a Triton kernel registered (for CUDA, and for
    CPU inside :func:`triton_on_cpu`), as opposed to a Triton launcher called directly."""
    from .ops import _library
    return name is not None and name in _library.TRITON_KERNELS


def resolve(backend: str, device: torch.device, *, op: str, cpp_op: str | None,
            has_triton: bool = True, cuda_op: str | None = None) -> str:
    """Returns the backend that will run ``op`` on ``device``.

    ``"cpp"`` and ``"triton"`` both mean: call the ``torch.ops.fastssl`` op, whose dispatcher
    then runs the kernel of the tensors' device (the callers do exactly that).

    Args:
        backend: what the caller asked for, one of :data:`BACKENDS`.
        device: the device of the op's tensors.
        op: the public op name, for messages.
        cpp_op: the ``torch.ops.fastssl`` name of its forward op (its CPU kernel is C++), or
            None if it has no C++ kernel.
        has_triton: whether the op has a Triton kernel.
        cuda_op: the ``torch.ops.fastssl`` name of its CUDA C++ kernel (``csrc/cuda``), if any.
    Raises:
        ValueError: unknown backend name (argument or ``FASTSSL_BACKEND``), or a backend that
            does not fit the device.
        RuntimeError: the requested backend is not available in this installation.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("FASTSSL_BACKEND", "auto") or "auto"
        if env not in BACKENDS:
            raise ValueError(f"FASTSSL_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto" and device.type == "meta":
        # Shapes only: the op's fake (meta) implementation serves (none: the reference).
        return "meta" if _is_triton_op(cpp_op) or cpp_op in ("ema_update_", "moco_enqueue_") \
            else "reference"
    if backend == "auto":
        if device.type == "cuda" and has_triton and triton_available()[0]:
            return "triton"
        if device.type == "cpu" and has_triton and triton_on_cpu_active():
            return "triton"
        if device.type == "cpu" and cpp_op is not None:
            if _ext.has_kernel(cpp_op, "CPU"):
                return "cpp"
            _warn_once(f"noext:{op}", f"fastssl.{op}: running the pure-PyTorch reference on "
                       f"CPU because {_ext.why_unavailable() or 'the C++ op is missing'}")
            return "reference"
        if device.type == "cuda" and cuda_op is not None and _ext.has_kernel(cuda_op, "CUDA"):
            return "cuda"
        if device.type == "cuda":
            _warn_once(f"notriton:{op}", f"fastssl.{op}: running the pure-PyTorch reference on "
                       f"CUDA: {triton_available()[1] or 'no Triton kernel for this op'}")
        return "reference"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpp' runs on CPU tensors, got {device.type} "
                             "tensors (use backend='triton' or 'auto' on CUDA)")
        if cpp_op is None:
            raise RuntimeError(f"{op}: there is no C++ kernel for this op")
        if triton_on_cpu_active() and _is_triton_op(cpp_op):
            raise RuntimeError(f"{op}: backend='cpp' inside fastssl._dispatch.triton_on_cpu(): "
                               "the CPU kernels run Triton there; call it outside the block")
        if not _ext.has_kernel(cpp_op, "CPU"):
            raise RuntimeError(f"{op}: backend='cpp' is unavailable: "
                               f"{_ext.why_unavailable() or f'op {cpp_op} has no CPU kernel'}")
        return "cpp"
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' runs on CUDA tensors, got {device.type} "
                             "tensors (use backend='cpp' or 'auto' on CPU)")
        if cuda_op is None:
            raise RuntimeError(f"{op}: there is no CUDA C++ kernel for this op")
        if not _ext.has_kernel(cuda_op, "CUDA"):
            raise RuntimeError(f"{op}: backend='cuda' is unavailable: "
                               f"{_ext.why_unavailable() or 'fastssl._C was built without CUDA'}")
        return "cuda"
    if backend == "triton":
        if not has_triton:
            raise RuntimeError(f"{op}: there is no Triton kernel for this op")
        ok, why = triton_available()
        if not ok:
            raise RuntimeError(f"{op}: backend='triton' is unavailable: {why}")
        if device.type == "cpu" and not triton_interpret():
            raise ValueError(f"{op}: backend='triton' with CPU tensors needs the Triton "
                             "interpreter: set TRITON_INTERPRET=1 before importing fastssl "
                             "(tests only; use backend='cpp' for speed on CPU)")
        if device.type == "cpu" and _is_triton_op(cpp_op) and not triton_on_cpu_active():
            raise ValueError(f"{op}: backend='triton' with CPU tensors runs the op's Triton "
                             "kernels only inside `with fastssl._dispatch.triton_on_cpu():` "
                             "(tests only; use backend='cpp' for speed on CPU)")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: backend='triton' needs CUDA tensors, got {device.type}")
        return "triton"
    return "reference"
