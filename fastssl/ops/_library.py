"""The op model: how every fused op of fastssl is registered with ``torch.library``.

One op = one set of ``fastssl::<name>`` schemas (forward, backward, ...), each defined **here in
Python** (so the package has its ops without a C++ compiler), with

* a **CPU kernel** in C++ (``csrc/cpu/<op>.cpp``: ``TORCH_LIBRARY_IMPL(fastssl, CPU, m)``; it
  exists when ``fastssl._C`` was built),
* a **CUDA kernel** in Triton (the op file's launcher, registered by :func:`triton_kernel`),
* **one** fake (meta) implementation and **one** autograd registration that serve both devices,
  and one saved-tensor contract (what the forward returns for the backward), stated in the op
  file's header.

The op files (``fastssl/ops/<op>.py``) call :func:`define` / :func:`triton_kernel` /
:func:`no_double_backward` at import; ``fastssl/ops/__init__.py`` imports every op file, so the
schemas exist as soon as ``fastssl`` is imported. The C++ library may load before or after:
the dispatcher accepts kernels for an op whose schema comes later, and checks the C++
signature against the schema when both are there.

Tests run the Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``: there,
:func:`fastssl._dispatch.triton_on_cpu` temporarily registers the same launchers for the CPU
key (:data:`TRITON_KERNELS` is the list it uses).
"""
from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "fastssl"

# op name -> the Triton launcher registered as its CUDA kernel.
TRITON_KERNELS: dict[str, Callable] = {}


def define(name: str, schema: str) -> None:
    """Defines ``fastssl::<name>`` with ``schema`` (the part after the name)."""
    torch.library.define(f"{NAMESPACE}::{name}", schema)


def triton_kernel(name: str) -> Callable:
    """Decorator: registers ``fn`` as the CUDA kernel of ``fastssl::<name>``."""
    def register(fn: Callable) -> Callable:
        torch.library.register_kernel(f"{NAMESPACE}::{name}", "cuda", fn)
        TRITON_KERNELS[name] = fn
        return fn
    return register


def no_double_backward(backward_op: str, public: str) -> None:
    """Makes differentiating ``fastssl::<backward_op>`` (a double backward through ``public``)
    raise instead of returning zeros (what an op without an autograd kernel silently gives)."""
    def _raise(ctx, *grads):
        raise RuntimeError(
            f"fastssl.{public}: double backward is not supported (the fused backward is not "
            "itself differentiable); use backend='reference' for gradient penalties or "
            "higher-order gradients")

    torch.library.register_autograd(f"{NAMESPACE}::{backward_op}", _raise,
                                    setup_context=lambda ctx, inputs, output: None)


def op(name: str):
    """``torch.ops.fastssl.<name>`` (the overload packet)."""
    return getattr(getattr(torch.ops, NAMESPACE), name)
