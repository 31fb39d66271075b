r"""``clip_loss``: the symmetric CLIP loss (Radford et al. 2021,
https://arxiv.org/abs/2103.00020).

.. math:: S = s\,\hat I \hat T^\top,\quad row_i = \operatorname{LSE}_j S_{ij} - S_{ii},\quad
          col_j = \operatorname{LSE}_i S_{ij} - S_{jj}

and the loss is (mean row + mean col) / 2 (taken in ``fastssl.functional``).

Ops (CPU kernel ``csrc/cpu/clip.cpp``, CUDA kernel below on the Triton contrastive engine):

* ``clip_fwd(image, text, scale, normalize) -> (row_loss, col_loss, row_lse, col_lse)``
* ``clip_bwd(grad_row, grad_col, image, text, scale, row_lse, col_lse, normalize)
  -> (dimage, dtext, dscale)``

Saved-tensor contract (both devices): image, text (raw), scale, and both natural-log LSEs
(B,) fp32. The backward forms P_ij = g_i (softmax_row_ij - [i = j]) + h_j (softmax_col_ij -
[i = j]) tile by tile -- the diagonal's -1s folded in fp32 before the down-cast -- and
dI = s P That, dT = s P^T Ihat; dscale = (1/s) sum_i ihat_i . dihat_i.

Cost (Triton): forward 2 matmul-equivalents of B^2 D (the column LSE is a second launch with the
roles swapped; the C++ kernel gets both from one pass), backward 4 (each direction recomputes
its tiles). The CPU kernel: 1 + 3.
"""
from __future__ import annotations

import torch

from . import _library, _rows
from . import contrastive_core as core

# Every engine kernel configuration this op launches, for `fastssl gpu-report`.
AOT_KERNELS = core.aot_entries("clip_loss")

_library.define("clip_fwd", "(Tensor image, Tensor text, Tensor scale, bool normalize)"
                " -> (Tensor row_loss, Tensor col_loss, Tensor row_lse, Tensor col_lse)")
_library.define("clip_bwd", "(Tensor grad_row, Tensor grad_col, Tensor image, Tensor text, "
                "Tensor scale, Tensor row_lse, Tensor col_lse, bool normalize)"
                " -> (Tensor dimage, Tensor dtext, Tensor dscale)")


@torch.library.register_fake("fastssl::clip_fwd")
def _fwd_fake(image, text, scale, normalize):
    b = image.shape[0]
    return tuple(image.new_empty((b,), dtype=torch.float32) for _ in range(4))


@torch.library.register_fake("fastssl::clip_bwd")
def _bwd_fake(grad_row, grad_col, image, text, scale, row_lse, col_lse, normalize):
    return (torch.empty_like(image), torch.empty_like(text),
            scale.new_empty((), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    image, text, scale, normalize = inputs
    ctx.save_for_backward(image, text, scale, output[2], output[3])
    ctx.normalize = normalize


def _backward(ctx, grad_row, grad_col, _g1, _g2):
    image, text, scale, row_lse, col_lse = ctx.saved_tensors
    if grad_row is None:
        grad_row = torch.zeros_like(row_lse)
    if grad_col is None:
        grad_col = torch.zeros_like(col_lse)
    di, dt, dscale = torch.ops.fastssl.clip_bwd(grad_row, grad_col, image, text, scale,
                                                row_lse, col_lse, ctx.normalize)
    return di, dt, (dscale.to(scale.dtype) if ctx.needs_input_grad[2] else None), None


torch.library.register_autograd("fastssl::clip_fwd", _backward, setup_context=_setup_context)
_library.no_double_backward("clip_bwd", "clip_loss")


# ---------------------------------------------------------------------------------------
# CUDA kernels (Triton)
# ---------------------------------------------------------------------------------------


def _diagonal(b: int, device) -> torch.Tensor:
    return torch.arange(b, device=device, dtype=torch.int64)


@_library.triton_kernel("clip_fwd")
def clip_fwd_triton(image, text, scale, normalize: bool):
    ist, ri, _ = _rows.scaled_rows(image, normalize)
    tst, rt, _ = _rows.scaled_rows(text, normalize)
    s = scale.reshape(()).to(torch.float32)
    diag = _diagonal(image.shape[0], image.device)
    # Each direction's LSE and its diagonal logit from the same tiles.
    row_lse, row_pos = core.row_lse(ist, tst, s, rq=ri, rc=rt, target=diag)
    col_lse, col_pos = core.row_lse(tst, ist, s, rq=rt, rc=ri, target=diag)
    return row_lse - row_pos, col_lse - col_pos, row_lse, col_lse


@_library.triton_kernel("clip_bwd")
def clip_bwd_triton(grad_row, grad_col, image, text, scale, row_lse, col_lse,
                    normalize: bool):
    ist, ri, inorm = _rows.scaled_rows(image, normalize)
    tst, rt, tnorm = _rows.scaled_rows(text, normalize)
    s = scale.reshape(()).to(torch.float32)
    diag = _diagonal(image.shape[0], image.device)
    g = grad_row.to(torch.float32).contiguous()
    h = grad_col.to(torch.float32).contiguous()
    # dIhat = s P That and dThat = s P^T Ihat, both terms of P (and their diagonal -1s) in
    # each launch.
    dih = s * core.softmax_grad(ist, tst, s, rq=ri, rc=rt, row=(g, row_lse, diag),
                                col=(h, col_lse, diag))
    dth = s * core.softmax_grad(tst, ist, s, rq=rt, rc=ri, row=(h, col_lse, diag),
                                col=(g, row_lse, diag))
    dscale = (ist.float() * ri[:, None] * dih).sum() / s
    di = _rows.normalize_backward(dih, image, inorm, normalize).to(image.dtype)
    dt = _rows.normalize_backward(dth, text, tnorm, normalize).to(text.dtype)
    return di, dt, dscale


def clip_rows(image, text, scale, normalize: bool):
    """(image->text losses (B,), text->image losses (B,)), fp32; differentiable in image, text
    and scale (0-dim fp32 multiplier of the cosine logits)."""
    row, col, _rl, _cl = torch.ops.fastssl.clip_fwd(image, text, scale, normalize)
    return row, col
