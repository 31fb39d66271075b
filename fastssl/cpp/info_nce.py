"""Autograd and fake registrations for ``torch.ops.fastssl.info_nce_queue_fwd / _bwd``
(kernel: ``csrc/cpu/info_nce.cpp``): InfoNCE against a MoCo queue (no gradient to the queue).

The forward also returns ``pv`` (N, D), the softmax-weighted queue rows, so the backward needs
no pass over the queue (the queue is not even saved)."""
from __future__ import annotations

import torch

from .. import _ext

_ext.available()  # runs the C++ registrations before the Python ones below


@torch.library.register_fake("fastssl::info_nce_queue_fwd")
def _fwd_fake(query, key, queue, scale, normalize):
    n = query.shape[0]
    return (query.new_empty((n,), dtype=torch.float32),
            query.new_empty((n,), dtype=torch.float32),
            query.new_empty((n, query.shape[1]), dtype=torch.float32))


@torch.library.register_fake("fastssl::info_nce_queue_bwd")
def _bwd_fake(grad, query, key, scale, lse, pv, normalize, need_dk):
    dk = torch.empty_like(key) if need_dk else key.new_empty((0,))
    return torch.empty_like(query), dk, scale.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    query, key, queue, scale, normalize = inputs
    ctx.save_for_backward(query, key, scale, output[1], output[2])
    ctx.normalize = normalize


def _backward(ctx, grad_loss, _glse, _gpv):
    query, key, scale, lse, pv = ctx.saved_tensors
    need_dk = ctx.needs_input_grad[1]
    dq, dk, dscale = torch.ops.fastssl.info_nce_queue_bwd(grad_loss, query, key, scale, lse, pv,
                                                          ctx.normalize, need_dk)
    return (dq, dk if need_dk else None, None,
            dscale.to(scale.dtype) if ctx.needs_input_grad[3] else None, None)


torch.library.register_autograd("fastssl::info_nce_queue_fwd", _backward,
                                setup_context=_setup_context)


def info_nce_queue_rows(query, key, queue, scale, normalize: bool) -> torch.Tensor:
    """Per-query losses (N,) fp32 against [own key; queue]; differentiable in query, key and
    scale (0-dim fp32), never in the queue."""
    loss, _lse, _pv = torch.ops.fastssl.info_nce_queue_fwd(query, key, queue.detach(), scale,
                                                      normalize)
    return loss
