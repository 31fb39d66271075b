"""Autograd and fake registrations for ``torch.ops.fastssl.ntxent_fwd / ntxent_bwd``
(kernels: ``csrc/cpu/ntxent.cpp``)."""
from __future__ import annotations

import torch

from .. import _ext

_ext.available()  # runs the C++ registrations before the Python ones below


@torch.library.register_fake("fastssl::ntxent_fwd")
def _ntxent_fwd_fake(z1, z2, temperature, normalize, decoupled):
    m, d = 2 * z1.shape[0], z1.shape[1]
    f32 = torch.float32
    return (z1.new_empty((m,)), z1.new_empty((m,), dtype=f32), z1.new_empty((m, d), dtype=f32),
            z1.new_empty((m,), dtype=f32))


@torch.library.register_fake("fastssl::ntxent_bwd")
def _ntxent_bwd_fake(grad_loss, zhat, norms, lse, temperature, normalize, decoupled, dtype):
    m, d = zhat.shape
    return (zhat.new_empty((m // 2, d), dtype=dtype), zhat.new_empty((m // 2, d), dtype=dtype),
            torch.empty_like(temperature))


def _setup_context(ctx, inputs, output):
    z1, _z2, temperature, normalize, decoupled = inputs
    _loss, lse, zhat, norms = output
    ctx.save_for_backward(zhat, norms, lse, temperature)
    ctx.normalize, ctx.decoupled, ctx.dtype = normalize, decoupled, z1.dtype


def _backward(ctx, grad_loss, _glse, _gzhat, _gnorms):
    zhat, norms, lse, temperature = ctx.saved_tensors
    dz1, dz2, dtemp = torch.ops.fastssl.ntxent_bwd(
        grad_loss, zhat, norms, lse, temperature, ctx.normalize, ctx.decoupled, ctx.dtype)
    return dz1, dz2, (dtemp if ctx.needs_input_grad[2] else None), None, None


torch.library.register_autograd("fastssl::ntxent_fwd", _backward, setup_context=_setup_context)


def nt_xent_rows(z1: torch.Tensor, z2: torch.Tensor, temperature: torch.Tensor, normalize: bool,
                 decoupled: bool) -> torch.Tensor:
    """Per-row NT-Xent losses (2N,) from the fused C++ kernel; differentiable in z1, z2 and
    temperature. ``temperature`` is a 0-dim tensor (any float dtype; the kernel reads fp32)."""
    t = temperature.to(device=z1.device, dtype=torch.float32)
    loss, _lse, _zhat, _norms = torch.ops.fastssl.ntxent_fwd(z1, z2, t, normalize, decoupled)
    return loss
