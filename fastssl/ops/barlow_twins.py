r"""``barlow_twins``: the Barlow Twins loss (Zbontar et al. 2021, https://arxiv.org/abs/2103.03230)
without the D x D cross-correlation matrix. The math, both paths (Gram when N < 5 D / 3, tiled
C otherwise) and their cost model are in ``ops/redundancy.py``.

Ops (CPU kernel ``csrc/cpu/barlow_twins.cpp``, CUDA kernel below):

* ``barlow_twins_fwd(z1, z2, lambda_, standardize, path) -> (loss, stats, grams, gram_diags)``
* ``barlow_twins_bwd(grad, z1, z2, stats, grams, gram_diags, lambda_, standardize, path)
  -> (dz1, dz2)``

Saved-tensor contract (both devices): z1, z2 (raw), ``stats`` (5, D) fp32 = [mu1, r1, mu2, r2,
c] (batch means, reciprocal unbiased stds -- mu = 0, r = 1 without standardisation -- and the
diagonal c_d = C_dd), and on the Gram path the fp32 Grams A A^T, B B^T packed as one pair
(``ops/redundancy.py``: ``grams`` (N, N), ``gram_diags`` (2, N)); ``(0, 0)`` tensors on the
tiled path, which recomputes its tiles of C. ``loss`` is a 0-dim fp32 tensor.
A feature that is constant over the batch has std 0: as in lightly's BarlowTwinsLoss (no eps)
the loss is NaN then.
"""
from __future__ import annotations

import torch

from . import _library
from . import redundancy as engine

# The engine's kernel configurations this op launches, for `fastssl gpu-report`.
AOT_KERNELS = engine.aot_entries("barlow_twins")

_library.define("barlow_twins_fwd", "(Tensor z1, Tensor z2, float lambda_, bool standardize, "
                "int path) -> (Tensor loss, Tensor stats, Tensor grams, Tensor gram_diags)")
_library.define("barlow_twins_bwd", "(Tensor grad, Tensor z1, Tensor z2, Tensor stats, "
                "Tensor grams, Tensor gram_diags, float lambda_, bool standardize, int path) "
                "-> (Tensor dz1, Tensor dz2)")


@torch.library.register_fake("fastssl::barlow_twins_fwd")
def _fwd_fake(z1, z2, lambda_, standardize, path):
    n, d = z1.shape
    g, two = (n, 2) if path == engine.PATH_GRAM else (0, 0)
    f32 = dict(dtype=torch.float32)
    return (z1.new_empty((), **f32), z1.new_empty((5, d), **f32), z1.new_empty((g, g), **f32),
            z1.new_empty((two, g), **f32))


@torch.library.register_fake("fastssl::barlow_twins_bwd")
def _bwd_fake(grad, z1, z2, stats, grams, gram_diags, lambda_, standardize, path):
    return torch.empty_like(z1), torch.empty_like(z2)


def _setup_context(ctx, inputs, output):
    z1, z2, lambda_, standardize, path = inputs
    _loss, stats, grams, gram_diags = output
    ctx.save_for_backward(z1, z2, stats, grams, gram_diags)
    # Only the loss is differentiable; without this autograd would hand the backward zero
    # gradients for stats and both N x N Grams (32 MB at N = 2048).
    ctx.mark_non_differentiable(stats, grams, gram_diags)
    ctx.set_materialize_grads(False)
    ctx.lambda_, ctx.standardize, ctx.path = lambda_, standardize, path


def _backward(ctx, grad_loss, _gstats, _gg1, _gg2):
    z1, z2, stats, grams, gram_diags = ctx.saved_tensors
    dz1, dz2 = torch.ops.fastssl.barlow_twins_bwd(grad_loss, z1, z2, stats, grams, gram_diags,
                                                  ctx.lambda_, ctx.standardize, ctx.path)
    return dz1, dz2, None, None, None


torch.library.register_autograd("fastssl::barlow_twins_fwd", _backward,
                                setup_context=_setup_context)
_library.no_double_backward("barlow_twins_bwd", "barlow_twins")


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambda_: float,
                      standardize: bool) -> torch.Tensor:
    """The loss, a 0-dim fp32 tensor, on the path the cost model picks."""
    path = engine.choose_path(z1.shape[0], z1.shape[1])
    return torch.ops.fastssl.barlow_twins_fwd(z1, z2, lambda_, standardize, path)[0]


# ---------------------------------------------------------------------------------------
# CUDA kernels (Triton, on the engine of ops/redundancy.py)
# ---------------------------------------------------------------------------------------


@_library.triton_kernel("barlow_twins_fwd")
def barlow_twins_fwd_triton(z1, z2, lambda_: float, standardize: bool, path: int):
    z1, z2 = z1.contiguous(), z2.contiguous()
    n = z1.shape[0]
    mu1, r1 = engine.column_stats(z1, standardize)
    mu2, r2 = engine.column_stats(z2, standardize)
    c = (((z1.float() - mu1) * r1) * ((z2.float() - mu2) * r2)).sum(dim=0) / n
    if path == engine.PATH_GRAM:
        full1, full2 = engine.gram(z1, mu1, r1), engine.gram(z2, mu2, r2)
        off = (full1.double() * full2.double()).sum()
        g1, g2 = engine.pack_grams(full1, full2)
    else:
        # Two tensors: outputs of an op must not alias each other.
        g1, g2 = (z1.new_empty((0, 0), dtype=torch.float32) for _ in range(2))
        off = engine.tiles_sq(z1, mu1, r1, z2, mu2, r2).double()
    c64 = c.double()
    loss = ((1 - c64) ** 2).sum() + lambda_ * (off / (n * n) - (c64 ** 2).sum())
    return loss.float(), torch.stack([mu1, r1, mu2, r2, c]), g1, g2


@_library.triton_kernel("barlow_twins_bwd")
def barlow_twins_bwd_triton(grad, z1, z2, stats, g1, g2, lambda_: float, standardize: bool,
                            path: int):
    z1, z2 = z1.contiguous(), z2.contiguous()
    n = z1.shape[0]
    mu1, r1, mu2, r2, c = stats.unbind(0)
    go = grad.float().reshape(1)
    gd = go * (-2 * (1 - c) - 2 * lambda_ * c) / n  # dL/dC_dd beyond 2 lambda C_dd, over N
    scale = go * (2 * lambda_ / (n * n))
    if path == engine.PATH_GRAM:
        g1, g2 = engine.unpack_grams(g1, g2)
        da = engine.gram_times(g2, z1, mu1, r1, z2, mu2, r2, gd, scale)
        db = engine.gram_times(g1, z2, mu2, r2, z1, mu1, r1, gd, scale)
    else:
        da = engine.tiles_bwd(z1, mu1, r1, z2, mu2, r2, gd, scale)
        db = engine.tiles_bwd(z2, mu2, r2, z1, mu1, r1, gd, scale)
    if standardize:
        da = engine.standardize_backward(da, (z1.float() - mu1) * r1, r1, n)
        db = engine.standardize_backward(db, (z2.float() - mu2) * r2, r2, n)
    return da.to(z1.dtype), db.to(z2.dtype)
