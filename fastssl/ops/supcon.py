r"""``supcon``: the supervised contrastive loss, :math:`\mathcal L^{sup}_{out}` (Khosla et al.
2020, https://arxiv.org/abs/2004.11362).

.. math:: S = s\,\hat Z \hat Z^\top \text{ (diagonal masked)},\quad
          \ell_i = \operatorname{LSE}_{j \ne i} S_{ij} - \frac{1}{|P(i)|}\sum_{p \in P(i)} S_{ip}

with P(i) the other rows of anchor i's label; anchors without a positive get loss 0 and npos 0
(``fastssl.functional`` averages over the others).

Ops (CPU kernel ``csrc/cpu/supcon.cpp``, CUDA kernel below on the Triton contrastive engine):

* ``supcon_fwd(features, labels, scale, normalize) -> (loss, lse, npos)``
* ``supcon_bwd(grad, features, labels, scale, lse, normalize) -> (dfeatures, dscale)``

Saved-tensor contract (both devices): features (raw), labels, scale and ``lse`` (N,) fp32, the
natural-log LSE over j != i, set to 0 for anchors without a positive (so it is always finite;
their rows carry no gradient: the backward masks them, never multiplying by exp(S - lse)).

The positive term never needs an N x N mask: with class sums L_c = sum_{y_p = c} zhat_p,
sum_{p in P(i)} zhat_i . zhat_p = zhat_i . L_{y_i} - |zhat_i|^2. The Triton path forms the class
sums and this difference in fp64 (O(N D)), so the cancellation at tau = 0.01 costs no accuracy;
its gradient is an O(N D) epilogue as well (class sums of w_i zhat_i, w_i = g_i / |P(i)|).

Cost (Triton): forward 1 matmul-equivalent of N^2 D; backward 2 (one recompute; the row and the
column softmax terms of the symmetric S in one launch).
"""
from __future__ import annotations

import torch

from . import _library, _rows
from . import contrastive_core as core

# Every engine kernel configuration this op launches, for `fastssl gpu-report`.
AOT_KERNELS = core.aot_entries("supcon")

_library.define("supcon_fwd", "(Tensor features, Tensor labels, Tensor scale, bool normalize)"
                " -> (Tensor loss, Tensor lse, Tensor npos)")
_library.define("supcon_bwd", "(Tensor grad, Tensor features, Tensor labels, Tensor scale, "
                "Tensor lse, bool normalize) -> (Tensor dfeatures, Tensor dscale)")


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
_library.no_double_backward("supcon_bwd", "supcon")


# ---------------------------------------------------------------------------------------
# CUDA kernels (Triton)
# ---------------------------------------------------------------------------------------


def _classes(labels: torch.Tensor):
    """(dense class id per row, positives per row as fp32)."""
    _, cls, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return cls, (counts[cls] - 1).to(torch.float32), counts.numel()


def _class_sums(x: torch.Tensor, cls: torch.Tensor, num_classes: int) -> torch.Tensor:
    return x.new_zeros((num_classes, x.shape[1])).index_add_(0, cls, x)


@_library.triton_kernel("supcon_fwd")
def supcon_fwd_triton(features, labels, scale, normalize: bool):
    zs, r, _ = _rows.scaled_rows(features, normalize)
    s = scale.reshape(()).to(torch.float32)
    cls, npos, nclass = _classes(labels)
    valid = npos > 0
    lse, _ = core.row_lse(zs, zs, s, rq=r, rc=r, mask_diag=True)
    # Positive term in fp64: zhat_i . L_y - |zhat_i|^2 cancels to ~|P(i)| cos at tau = 0.01.
    z64 = zs.double() * r.double()[:, None]
    pos = (z64 * (_class_sums(z64, cls, nclass)[cls] - z64)).sum(dim=1)
    pos = (s.double() * pos / npos.clamp(min=1).double()).float()
    lse = torch.where(valid, lse, torch.zeros_like(lse))
    loss = torch.where(valid, lse - pos, torch.zeros_like(lse))
    return loss, lse, npos


@_library.triton_kernel("supcon_bwd")
def supcon_bwd_triton(grad, features, labels, scale, lse, normalize: bool):
    zs, r, norm = _rows.scaled_rows(features, normalize)
    s = scale.reshape(()).to(torch.float32)
    cls, npos, nclass = _classes(labels)
    valid = npos > 0
    g = torch.where(valid, grad.to(torch.float32), torch.zeros_like(lse)).contiguous()
    # Anchors without a positive: excluded, so their softmax term must vanish; an infinite
    # lse makes exp(S - lse) exactly 0 (the saved lse of 0 would overflow at tau = 0.01).
    lse_eff = torch.where(valid, lse, torch.full_like(lse, float("inf"))).contiguous()
    w = g / npos.clamp(min=1)
    zf = zs.float() * r[:, None]
    # Row and column softmax terms of the symmetric S in one launch:
    # sum_j (g_i softmax_ij + g_j softmax_ji) zhat_j.
    soft = core.softmax_grad(zs, zs, s, rq=r, rc=r, row=(g, lse_eff, None),
                             col=(g, lse_eff, None), mask_diag=True)
    # Positive terms: row side w_i (L_y - zhat_i), column side W_y - w_i zhat_i.
    sums = _class_sums(zf, cls, nclass)[cls]
    wsums = _class_sums(w[:, None] * zf, cls, nclass)[cls]
    positive = w[:, None] * (sums - zf) + (wsums - w[:, None] * zf)
    dzh = s * (soft - positive)
    # Both halves hold every logit once, so dL/ds = (1 / 2s) sum_i zhat_i . dzhat_i.
    dscale = (zf * dzh).sum() / (2 * s)
    dz = _rows.normalize_backward(dzh, features, norm, normalize).to(features.dtype)
    return dz, dscale


def supcon_rows(features, labels, scale, normalize: bool):
    """(per-anchor losses (N,) fp32, 0 for anchors without positives; positives per anchor
    (N,) fp32)."""
    loss, _lse, npos = torch.ops.fastssl.supcon_fwd(features, labels, scale, normalize)
    return loss, npos
