"""Supervised contrastive loss on the GPU with Triton.

Kernels: ``fastssl/ops/contrastive_core.py`` with the diagonal masked. The positive term uses
per-class sums (``index_add_``) instead of an N x N mask: ``sum_{p in P(i)} S_ip =
alpha zhat_i . (L_{y_i} - zhat_i)``; its gradient likewise (O(N D)).
"""
from __future__ import annotations

import torch

from . import contrastive_core as core

AOT_KERNELS = core.aot_entries("supcon", mask_diag=True, has_col=False)


class SupConFunction(torch.autograd.Function):
    """(per-anchor losses (N,) fp32, 0 without positives; positives per anchor (N,))."""

    @staticmethod
    def forward(ctx, zh, labels, alpha_t):
        a = float(alpha_t)
        _, cls, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        npos = (counts[cls] - 1).float()
        valid = npos > 0
        zf = zh.float()
        lse = core.row_lse(zh, zh, a, mask_diag=True)
        sums = torch.zeros(counts.numel(), zh.shape[1], device=zh.device).index_add_(0, cls, zf)
        pos = a * (zf * (sums[cls] - zf)).sum(dim=1) / npos.clamp(min=1)
        lse = torch.where(valid, lse, torch.zeros_like(lse))  # N = 1: an empty row
        ctx.save_for_backward(zh, cls, npos, lse, sums)
        ctx.alpha = a
        ctx.mark_non_differentiable(npos)
        return torch.where(valid, lse - pos, torch.zeros_like(lse)), npos

    @staticmethod
    def backward(ctx, g, _gnpos):
        zh, cls, npos, lse, sums = ctx.saved_tensors
        a = ctx.alpha
        zf = zh.float()
        g = torch.where(npos > 0, g.float(), torch.zeros_like(lse)).contiguous()
        w = g / npos.clamp(min=1)
        # Row side (every logit once): softmax part minus the positive term.
        dq = core.softmax_grad(zh, zh, a, g, lse, mask_diag=True) - a * w[:, None] * (sums[cls] - zf)
        dalpha = (zf * dq).sum() / a if ctx.needs_input_grad[2] else None
        wsums = torch.zeros_like(sums).index_add_(0, cls, w[:, None] * zf)
        dc = core.softmax_grad(zh, zh, a, h=g, clse=lse, mask_diag=True)
        dc = dc - a * (wsums[cls] - w[:, None] * zf)
        return (dq + dc).to(zh.dtype), None, dalpha


def supcon_rows(zh, labels, alpha_t):
    return SupConFunction.apply(zh, labels, alpha_t)
