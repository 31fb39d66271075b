"""Autograd and fake registrations for ``torch.ops.fastssl.xent_fwd / xent_bwd``
(kernel: ``csrc/cpu/xent.cpp``): rows vs columns with one target column per row. It runs
``info_nce`` without a queue and every ``gather=True`` loss (local rows vs gathered columns)."""
from __future__ import annotations

import torch

from .. import _ext

_ext.available()  # runs the C++ registrations before the Python ones below


@torch.library.register_fake("fastssl::xent_fwd")
def _xent_fwd_fake(q, c, scale, target, self_idx, normalize, mask_target):
    m = q.shape[0]
    return q.new_empty((m,), dtype=torch.float32), q.new_empty((m,), dtype=torch.float32)


@torch.library.register_fake("fastssl::xent_bwd")
def _xent_bwd_fake(grad, q, c, scale, target, self_idx, lse, normalize, mask_target, need_dc):
    dc = torch.empty_like(c) if need_dc else c.new_empty((0,))
    return torch.empty_like(q), dc, scale.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, c, scale, target, self_idx, normalize, mask_target = inputs
    _loss, lse = output
    ctx.save_for_backward(q, c, scale, target, self_idx, lse)
    ctx.normalize, ctx.mask_target = normalize, mask_target


def _backward(ctx, grad_loss, _glse):
    q, c, scale, target, self_idx, lse = ctx.saved_tensors
    need_dc = ctx.needs_input_grad[1]
    dq, dc, dscale = torch.ops.fastssl.xent_bwd(grad_loss, q, c, scale, target, self_idx, lse,
                                                ctx.normalize, ctx.mask_target, need_dc)
    return (dq, dc if need_dc else None, dscale.to(scale.dtype) if ctx.needs_input_grad[2]
            else None, None, None, None, None)


torch.library.register_autograd("fastssl::xent_fwd", _backward, setup_context=_setup_context)


def xent_rows(q: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, target: torch.Tensor,
              self_idx: torch.Tensor, normalize: bool, mask_target: bool = False) -> torch.Tensor:
    """Per-row losses (M,) fp32: ``LSE_{j unmasked} S_ij - S_i,target[i]`` with
    ``S = scale * qhat chat^T``; ``self_idx[i]`` (-1: none) and, with ``mask_target``, the
    target are masked. Differentiable in q, c and scale (a 0-dim fp32 tensor)."""
    loss, _lse = torch.ops.fastssl.xent_fwd(q, c, scale, target, self_idx, normalize,
                                            mask_target)
    return loss
