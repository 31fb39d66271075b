"""Autograd and fake registrations for ``torch.ops.fastssl.supcon_fwd / supcon_bwd``
(kernel: ``csrc/cpu/supcon.cpp``)."""
from __future__ import annotations

import torch

from .. import _ext

_ext.available()  # runs the C++ registrations before the Python ones below


@torch.library.register_fake("fastssl::supcon_fwd")
def _fwd_fake(features, labels, scale, normalize):
    n = features.shape[0]
    return tuple(features.new_empty((n,), dtype=torch.float32) for _ in range(3))


@torch.library.register_fake("fastssl::supcon_bwd")
def _bwd_fake(grad, features, labels, scale, lse, normalize):
    return torch.empty_like(features), scale.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    features, labels, scale, normalize = inputs
    ctx.save_for_backward(features, labels, scale, output[1])
    ctx.normalize = normalize


def _backward(ctx, grad_loss, _glse, _gnpos):
    features, labels, scale, lse = ctx.saved_tensors
    dz, dscale = torch.ops.fastssl.supcon_bwd(grad_loss, features, labels, scale, lse,
                                              ctx.normalize)
    return dz, None, (dscale.to(scale.dtype) if ctx.needs_input_grad[2] else None), None


torch.library.register_autograd("fastssl::supcon_fwd", _backward, setup_context=_setup_context)


def supcon_rows(features, labels, scale, normalize: bool):
    """(per-anchor losses (N,) fp32, 0 for anchors without positives; positives per anchor
    (N,) fp32)."""
    loss, _lse, npos = torch.ops.fastssl.supcon_fwd(features, labels, scale, normalize)
    return loss, npos
