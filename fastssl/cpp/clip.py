"""Autograd and fake registrations for ``torch.ops.fastssl.clip_fwd / clip_bwd``
(kernel: ``csrc/cpu/clip.cpp``): both directions of the CLIP loss from one pass."""
from __future__ import annotations

import torch

from .. import _ext

_ext.available()  # runs the C++ registrations before the Python ones below


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


def clip_rows(image, text, scale, normalize: bool):
    """(image->text losses (B,), text->image losses (B,)), fp32; differentiable in image, text
    and scale (0-dim fp32 multiplier of the cosine logits)."""
    row, col, _rl, _cl = torch.ops.fastssl.clip_fwd(image, text, scale, normalize)
    return row, col
