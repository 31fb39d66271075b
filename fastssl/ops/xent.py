r"""``xent``: cross-entropy of rows Q against columns C with one target column per row -- the
engine of every "local rows vs (gathered) columns" loss.

.. math:: \ell_i = \operatorname{LSE}_{j \notin \text{mask}(i)} S_{ij} - S_{i,t(i)},
          \qquad S = s\, \hat Q \hat C^\top

masked columns: ``self_idx[i]`` (-1: none) and, with ``mask_target``, t(i) itself (DCL).
It runs ``info_nce`` without a queue (rows = queries, columns = keys, t(i) = i) and every
``gather=True`` loss: ``nt_xent`` (rows = local [z1; z2], columns = [z1; z2] of all ranks, self
and target as global column indices), ``clip_loss`` (each direction), in-batch ``info_nce``.

Ops (one schema each; CPU kernel ``csrc/cpu/xent.cpp``, CUDA kernel below on the Triton
contrastive engine ``fastssl/ops/contrastive_core.py``):

* ``xent_fwd(q, c, scale, target, self_idx, normalize, mask_target) -> (loss, lse)``
* ``xent_bwd(grad, q, c, scale, target, self_idx, lse, normalize, mask_target, need_dc)
  -> (dq, dc, dscale)``

Saved-tensor contract (both devices): the inputs q, c (raw), scale, target, self_idx and
``lse`` (M,) fp32, the natural-log LSE over the unmasked columns. Each backward re-normalises
the rows (O((M + NC) D)) instead of saving normalised copies.

Cost (Triton): forward 1 matmul-equivalent (2 M NC D FLOPs), backward 3 (recompute for dQ,
recompute + P^T Q for dC); the positive logit S_i,t(i) is read from the forward's own tiles and
the -1 of the target is folded into P in fp32 before the tensor-core down-cast.
"""
from __future__ import annotations

import torch

from . import _library, _rows
from . import contrastive_core as core

# Its engine kernels are info_nce's (targets, self index, decoupled mask): listed in
# fastssl/ops/info_nce.py's AOT_KERNELS, not twice.

_library.define("xent_fwd", "(Tensor q, Tensor c, Tensor scale, Tensor target, Tensor self_idx, "
                "bool normalize, bool mask_target) -> (Tensor loss, Tensor lse)")
_library.define("xent_bwd", "(Tensor grad, Tensor q, Tensor c, Tensor scale, Tensor target, "
                "Tensor self_idx, Tensor lse, bool normalize, bool mask_target, bool need_dc)"
                " -> (Tensor dq, Tensor dc, Tensor dscale)")


@torch.library.register_fake("fastssl::xent_fwd")
def _fwd_fake(q, c, scale, target, self_idx, normalize, mask_target):
    m = q.shape[0]
    return q.new_empty((m,), dtype=torch.float32), q.new_empty((m,), dtype=torch.float32)


@torch.library.register_fake("fastssl::xent_bwd")
def _bwd_fake(grad, q, c, scale, target, self_idx, lse, normalize, mask_target, need_dc):
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
    return (dq, dc if need_dc else None,
            dscale.to(scale.dtype) if ctx.needs_input_grad[2] else None,
            None, None, None, None)


torch.library.register_autograd("fastssl::xent_fwd", _backward, setup_context=_setup_context)
_library.no_double_backward("xent_bwd", "info_nce / gather=True losses")


# ---------------------------------------------------------------------------------------
# CUDA kernels (Triton)
# ---------------------------------------------------------------------------------------


@_library.triton_kernel("xent_fwd")
def xent_fwd_triton(q, c, scale, target, self_idx, normalize: bool, mask_target: bool):
    qs, rq, _ = _rows.scaled_rows(q, normalize)
    cs, rc, _ = _rows.scaled_rows(c, normalize)
    s = scale.reshape(()).to(torch.float32)
    # 1. Row LSE over the unmasked columns and the target logit from the same tiles.
    lse, pos = core.row_lse(qs, cs, s, rq=rq, rc=rc, target=target, self_idx=self_idx,
                            mask_target=mask_target)
    return lse - pos, lse


@_library.triton_kernel("xent_bwd")
def xent_bwd_triton(grad, q, c, scale, target, self_idx, lse, normalize: bool,
                    mask_target: bool, need_dc: bool):
    qs, rq, qn = _rows.scaled_rows(q, normalize)
    cs, rc, cn = _rows.scaled_rows(c, normalize)
    s = scale.reshape(()).to(torch.float32)
    g = grad.to(torch.float32).contiguous()
    # 2. dQhat = s sum_j g_i (softmax_ij - [j = t(i)]) chat_j: one recompute of the tiles.
    dqh = s * core.softmax_grad(qs, cs, s, rq=rq, rc=rc, row=(g, lse, target),
                                self_idx=self_idx, mask_target=mask_target)
    # dL/ds = sum_ij dS_ij S_ij / s = (1/s) sum_i qhat_i . dqhat_i
    dscale = (qs.float() * rq[:, None] * dqh).sum() / s
    dq = _rows.normalize_backward(dqh, q, qn, normalize).to(q.dtype)
    if need_dc:
        # 3. dChat = s P^T Qhat: the same kernel with the roles swapped (no atomics).
        dch = s * core.softmax_grad(cs, qs, s, rq=rc, rc=rq, col=(g, lse, target),
                                    col_self_idx=self_idx, mask_target=mask_target)
        dc = _rows.normalize_backward(dch, c, cn, normalize).to(c.dtype)
    else:
        dc = c.new_empty((0,))
    return dq, dc, dscale


def xent_rows(q: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, target: torch.Tensor,
              self_idx: torch.Tensor, normalize: bool, mask_target: bool = False) -> torch.Tensor:
    """Per-row losses (M,) fp32: ``LSE_{j unmasked} S_ij - S_i,target[i]`` with
    ``S = scale * qhat chat^T``; ``self_idx[i]`` (-1: none) and, with ``mask_target``, the
    target are masked. Differentiable in q, c and scale (a 0-dim fp32 tensor)."""
    loss, _lse = torch.ops.fastssl.xent_fwd(q, c, scale, target, self_idx, normalize,
                                            mask_target)
    return loss
