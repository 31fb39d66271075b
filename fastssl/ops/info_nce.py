"""InfoNCE (MoCo) on the GPU with Triton: with a queue (no gradient to it) or in-batch.

Kernels: ``fastssl/ops/contrastive_core.py`` (row LSE, softmax gradient); this file holds the
launch sequence and the ``autograd.Function``s. Inputs are L2-normalised rows (the public
function normalises under autograd); ``alpha`` = 1 / temperature is a 0-dim fp32 tensor whose
gradient is ``(1/alpha) sum_i qhat_i . dqhat_i``.
"""
from __future__ import annotations

import torch

from . import contrastive_core as core

AOT_KERNELS = core.aot_entries("info_nce", mask_diag=False, has_col=False)


class InfoNCEQueueFunction(torch.autograd.Function):
    """Per-query losses (N,) fp32 against [own key; queue]."""

    @staticmethod
    def forward(ctx, qh, kh, uh, alpha_t):
        alpha = float(alpha_t)
        # 1. LSE over the queue (split over row blocks; reads the queue once per row block).
        lse_u = core.row_lse(qh, uh, alpha)
        # 2. The positive logit joins the LSE (O(N D)).
        p = alpha * (qh.float() * kh.float()).sum(dim=1)
        lse = torch.logaddexp(lse_u, p)
        ctx.save_for_backward(qh, kh, uh, lse, p)
        ctx.alpha = alpha
        return lse - p

    @staticmethod
    def backward(ctx, g):
        qh, kh, uh, lse, p = ctx.saved_tensors
        a = ctx.alpha
        g = g.float().contiguous()
        dq = core.softmax_grad(qh, uh, a, g, lse)  # queue columns, no dU
        coef = a * g * (torch.exp(p - lse) - 1.0)  # the positive, its -1 folded in fp32
        dq = dq + coef[:, None] * kh.float()
        dk = coef[:, None] * qh.float() if ctx.needs_input_grad[1] else None
        dalpha = (qh.float() * dq).sum() / a if ctx.needs_input_grad[3] else None
        return dq.to(qh.dtype), (dk.to(kh.dtype) if dk is not None else None), None, dalpha


class InBatchFunction(torch.autograd.Function):
    """Per-row losses (M,) fp32: ``LSE_j S_ij - S_ii``, ``S = alpha qhat khat^T``."""

    @staticmethod
    def forward(ctx, qh, kh, alpha_t):
        alpha = float(alpha_t)
        lse = core.row_lse(qh, kh, alpha)
        pos = alpha * (qh.float() * kh.float()).sum(dim=1)
        ctx.save_for_backward(qh, kh, lse)
        ctx.alpha = alpha
        return lse - pos

    @staticmethod
    def backward(ctx, g):
        qh, kh, lse = ctx.saved_tensors
        a = ctx.alpha
        g = g.float().contiguous()
        dq = core.softmax_grad(qh, kh, a, g, lse) - a * g[:, None] * kh.float()
        dk = None
        if ctx.needs_input_grad[1]:  # columns: the same kernel with the roles swapped
            dk = core.softmax_grad(kh, qh, a, h=g, clse=lse) - a * g[:, None] * qh.float()
            dk = dk.to(kh.dtype)
        dalpha = (qh.float() * dq).sum() / a if ctx.needs_input_grad[2] else None
        return dq.to(qh.dtype), dk, dalpha


def info_nce_rows(qh, kh, uh, alpha_t) -> torch.Tensor:
    """(N,) fp32 losses; ``uh`` None: in-batch negatives."""
    if uh is None:
        return InBatchFunction.apply(qh, kh, alpha_t)
    return InfoNCEQueueFunction.apply(qh, kh, uh.detach(), alpha_t)
