"""Symmetric CLIP loss on the GPU with Triton.

Kernels: ``fastssl/ops/contrastive_core.py``. Forward: the row LSE and (a second launch with
the roles swapped) the column LSE; backward: ``dI = s P That`` and ``dT = s P^T Ihat`` with
``P = g softmax_row + h softmax_col``, each one launch of the softmax-gradient kernel, then the
O(B D) diagonal term and the gradient of the scale ``(1/s) sum_i ihat_i . dihat_i``.
"""
from __future__ import annotations

import torch

from . import contrastive_core as core

AOT_KERNELS = core.aot_entries("clip", mask_diag=False, has_col=True)


class CLIPFunction(torch.autograd.Function):
    """(image->text losses (B,), text->image losses (B,)), fp32."""

    @staticmethod
    def forward(ctx, ih, th, scale_t):
        s = float(scale_t)
        rl = core.row_lse(ih, th, s)
        cl = core.row_lse(th, ih, s)
        diag = s * (ih.float() * th.float()).sum(dim=1)
        ctx.save_for_backward(ih, th, rl, cl)
        ctx.scale = s
        return rl - diag, cl - diag

    @staticmethod
    def backward(ctx, g, h):
        ih, th, rl, cl = ctx.saved_tensors
        s = ctx.scale
        g = torch.zeros_like(rl) if g is None else g.float().contiguous()
        h = torch.zeros_like(cl) if h is None else h.float().contiguous()
        gh = (g + h)[:, None]
        di = core.softmax_grad(ih, th, s, g, rl, h, cl) - s * gh * th.float()
        dt = core.softmax_grad(th, ih, s, h, cl, g, rl) - s * gh * ih.float()
        ds = (ih.float() * di).sum() / s if ctx.needs_input_grad[2] else None
        return di.to(ih.dtype), dt.to(th.dtype), ds


def clip_rows(ih, th, scale_t):
    return CLIPFunction.apply(ih, th, scale_t)
