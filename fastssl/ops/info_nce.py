r"""``info_nce`` against a MoCo queue: the positive is the query's own key, the negatives the
queue, which never receives a gradient (He et al. 2020, https://arxiv.org/abs/1911.05722).

.. math:: \ell_i = \log\Big(e^{p_i} + \sum_{j<K} e^{S_{ij}}\Big) - p_i, \quad
          p_i = s\,\hat q_i\cdot\hat k_i,\quad S = s\,\hat Q \hat U^\top

(In-batch InfoNCE, without a queue, is the ``xent`` op: ``fastssl/ops/xent.py``.)

Ops (CPU kernel ``csrc/cpu/info_nce.cpp``, CUDA kernel below on the Triton contrastive engine):

* ``info_nce_queue_fwd(query, key, queue, scale, normalize) -> (loss, lse, pv)``
* ``info_nce_queue_bwd(grad, query, key, scale, lse, pv, normalize, need_dk)
  -> (dquery, dkey, dscale)``

Saved-tensor contract (both devices): query, key (raw), scale, ``lse`` (N,) fp32 -- the
natural-log LSE of the full logits [p_i, S_i,:] -- and ``pv`` (N, D) fp32 = sum_j
softmax_ij uhat_j, the softmax-weighted queue rows (normalised by the full lse). The queue is
not saved: since it gets no gradient, the backward is O(N D),
``dqhat_i = s g_i (pv_i + (softmax_i(p_i) - 1) khat_i)``, with no pass over the queue.

Cost (Triton, N queries vs K entries): forward 2 matmul-equivalents of N K D (the LSE pass and
the P U pass, each split over the queue so N = 256 vs K = 65,536 fills a GPU), backward O(N D).
"""
from __future__ import annotations

import torch

from . import _library, _rows
from . import contrastive_core as core

# Every engine kernel configuration this op launches, for `fastssl gpu-report`.
AOT_KERNELS = core.aot_entries("info_nce")

_library.define("info_nce_queue_fwd", "(Tensor query, Tensor key, Tensor queue, Tensor scale, "
                "bool normalize) -> (Tensor loss, Tensor lse, Tensor pv)")
_library.define("info_nce_queue_bwd", "(Tensor grad, Tensor query, Tensor key, Tensor scale, "
                "Tensor lse, Tensor pv, bool normalize, bool need_dk)"
                " -> (Tensor dquery, Tensor dkey, Tensor dscale)")


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
_library.no_double_backward("info_nce_queue_bwd", "info_nce")


# ---------------------------------------------------------------------------------------
# CUDA kernels (Triton)
# ---------------------------------------------------------------------------------------


def _positive(qs, rq, ks, rk, s: torch.Tensor) -> torch.Tensor:
    # The tiles' arithmetic: the dot of the exact operands in fp32, then the row factors.
    return s * (qs.float() * ks.float()).sum(dim=1) * rq * rk


@_library.triton_kernel("info_nce_queue_fwd")
def info_nce_queue_fwd_triton(query, key, queue, scale, normalize: bool):
    qs, rq, _ = _rows.scaled_rows(query, normalize)
    ks, rk, _ = _rows.scaled_rows(key, normalize)
    us, ru, _ = _rows.scaled_rows(queue, normalize)
    s = scale.reshape(()).to(torch.float32)
    # 1. LSE over the queue (rows x column splits: the queue is split across the SMs).
    lse_u, _ = core.row_lse(qs, us, s, rq=rq, rc=ru)
    # 2. The positive joins the LSE; loss = softplus(lse_u - p) exactly (no lse - p cancellation).
    p = _positive(qs, rq, ks, rk, s)
    lse = torch.logaddexp(lse_u, p)
    loss = torch.nn.functional.softplus(lse_u - p)
    # 3. pv = sum_j exp(S_ij - lse_i) uhat_j: the second pass, which spares the backward one.
    ones = torch.ones_like(lse)
    pv = core.softmax_grad(qs, us, s, rq=rq, rc=ru, row=(ones, lse, None))
    return loss, lse, pv


@_library.triton_kernel("info_nce_queue_bwd")
def info_nce_queue_bwd_triton(grad, query, key, scale, lse, pv, normalize: bool,
                              need_dk: bool):
    qs, rq, qn = _rows.scaled_rows(query, normalize)
    ks, rk, kn = _rows.scaled_rows(key, normalize)
    qhat, khat = qs.float() * rq[:, None], ks.float() * rk[:, None]
    s = scale.reshape(()).to(torch.float32)
    gs = s * grad.to(torch.float32)
    p = _positive(qs, rq, ks, rk, s)
    # The positive's coefficient, its -1 folded in fp32: g s (softmax_i(p_i) - 1).
    coef = gs * torch.expm1(p - lse)
    dqh = gs[:, None] * pv + coef[:, None] * khat
    dscale = (qhat * dqh).sum() / s
    dq = _rows.normalize_backward(dqh, query, qn, normalize).to(query.dtype)
    if need_dk:
        dk = _rows.normalize_backward(coef[:, None] * qhat, key, kn,
                                      normalize).to(key.dtype)
    else:
        dk = key.new_empty((0,))
    return dq, dk, dscale


def info_nce_queue_rows(query, key, queue, scale, normalize: bool) -> torch.Tensor:
    """Per-query losses (N,) fp32 against [own key; queue]; differentiable in query, key and
    scale (0-dim fp32), never in the queue."""
    loss, _lse, _pv = torch.ops.fastssl.info_nce_queue_fwd(query, key, queue.detach(), scale,
                                                           normalize)
    return loss
