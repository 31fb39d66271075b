r"""``vicreg``: the VICReg loss (Bardes et al. 2022, https://arxiv.org/abs/2105.04906) without
the D x D covariance matrices. The math, both paths (Gram when N < 5 D / 3, tiled covariance
otherwise) and their cost model are in ``ops/redundancy.py``.

Ops (CPU kernel ``csrc/cpu/vicreg.cpp``, CUDA kernel below):

* ``vicreg_fwd(z1, z2, sim, var, cov, eps, path) -> (loss, stats, grams, gram_diags)``
* ``vicreg_bwd(grad, z1, z2, stats, grams, gram_diags, sim, var, cov, eps, path) -> (dz1, dz2)``

Saved-tensor contract (both devices): z1, z2 (raw), ``stats`` (4, D) fp32 = [mu1, v1, mu2, v2]
(batch means and unbiased variances), and on the Gram path the fp32 Grams X1 X1^T, X2 X2^T of
the centred views packed as one pair (``ops/redundancy.py``: ``grams`` (N, N), ``gram_diags``
(2, N)); ``(0, 0)`` tensors on the tiled path, which recomputes its tiles of the covariance. ``loss`` is a 0-dim fp32 tensor.
"""
from __future__ import annotations

import torch

from . import _library
from . import redundancy as engine

# The engine's kernel configurations this op launches, for `fastssl gpu-report`.
AOT_KERNELS = engine.aot_entries("vicreg")

_library.define("vicreg_fwd", "(Tensor z1, Tensor z2, float sim, float var, float cov, "
                "float eps, int path) -> (Tensor loss, Tensor stats, Tensor grams, "
                "Tensor gram_diags)")
_library.define("vicreg_bwd", "(Tensor grad, Tensor z1, Tensor z2, Tensor stats, "
                "Tensor grams, Tensor gram_diags, float sim, float var, float cov, float eps, "
                "int path) -> (Tensor dz1, Tensor dz2)")


@torch.library.register_fake("fastssl::vicreg_fwd")
def _fwd_fake(z1, z2, sim, var, cov, eps, path):
    n, d = z1.shape
    g, two = (n, 2) if path == engine.PATH_GRAM else (0, 0)
    f32 = dict(dtype=torch.float32)
    return (z1.new_empty((), **f32), z1.new_empty((4, d), **f32), z1.new_empty((g, g), **f32),
            z1.new_empty((two, g), **f32))


@torch.library.register_fake("fastssl::vicreg_bwd")
def _bwd_fake(grad, z1, z2, stats, grams, gram_diags, sim, var, cov, eps, path):
    return torch.empty_like(z1), torch.empty_like(z2)


def _setup_context(ctx, inputs, output):
    z1, z2, sim, var, cov, eps, path = inputs
    _loss, stats, grams, gram_diags = output
    ctx.save_for_backward(z1, z2, stats, grams, gram_diags)
    # Only the loss is differentiable; without this autograd would hand the backward zero
    # gradients for stats and both N x N Grams (32 MB at N = 2048).
    ctx.mark_non_differentiable(stats, grams, gram_diags)
    ctx.set_materialize_grads(False)
    ctx.coefs = (sim, var, cov, eps, path)


def _backward(ctx, grad_loss, _gstats, _gg1, _gg2):
    z1, z2, stats, grams, gram_diags = ctx.saved_tensors
    dz1, dz2 = torch.ops.fastssl.vicreg_bwd(grad_loss, z1, z2, stats, grams, gram_diags, *ctx.coefs)
    return dz1, dz2, None, None, None, None, None


torch.library.register_autograd("fastssl::vicreg_fwd", _backward, setup_context=_setup_context)
_library.no_double_backward("vicreg_bwd", "vicreg")

EPS = 1e-4  # lightly's VICRegLoss eps (inside the sqrt of the variance)


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim: float, var: float,
                cov: float) -> torch.Tensor:
    """The loss, a 0-dim fp32 tensor, on the path the cost model picks."""
    path = engine.choose_path(z1.shape[0], z1.shape[1])
    return torch.ops.fastssl.vicreg_fwd(z1, z2, sim, var, cov, EPS, path)[0]


# ---------------------------------------------------------------------------------------
# CUDA kernels (Triton, on the engine of ops/redundancy.py)
# ---------------------------------------------------------------------------------------


def _ones(z):
    return torch.ones(z.shape[1], dtype=torch.float32, device=z.device)


@_library.triton_kernel("vicreg_fwd")
def vicreg_fwd_triton(z1, z2, sim: float, var: float, cov: float, eps: float, path: int):
    z1, z2 = z1.contiguous(), z2.contiguous()
    n, d = z1.shape
    stats, grams = [], []
    variance = covariance = 0.0
    for z in (z1, z2):
        zf = z.float()
        mu, v = zf.mean(dim=0), zf.var(dim=0)
        stats += [mu, v]
        one = _ones(z)
        if path == engine.PATH_GRAM:
            g = engine.gram(z, mu, one)
            frob = (g.double() ** 2).sum()
        else:
            g = z.new_empty((0, 0), dtype=torch.float32)
            frob = engine.tiles_sq(z, mu, one, z, mu, one).double()
        grams.append(g)
        variance = variance + torch.relu(1 - torch.sqrt(v.double() + eps)).mean()
        covariance = covariance + (frob / (n - 1) ** 2 - (v.double() ** 2).sum()) / d
    invariance = ((z1.double() - z2.double()) ** 2).mean()
    loss = sim * invariance + var * variance / 2 + cov * covariance
    if path == engine.PATH_GRAM:
        return (loss.float(), torch.stack(stats)) + engine.pack_grams(grams[0], grams[1])
    return loss.float(), torch.stack(stats), grams[0], grams[1]


@_library.triton_kernel("vicreg_bwd")
def vicreg_bwd_triton(grad, z1, z2, stats, g1, g2, sim: float, var: float, cov: float,
                      eps: float, path: int):
    z1, z2 = z1.contiguous(), z2.contiguous()
    n, d = z1.shape
    go = grad.float().reshape(1)
    a = go * (4 * cov / (d * (n - 1) ** 2))
    if path == engine.PATH_GRAM:
        g1, g2 = engine.unpack_grams(g1, g2)
    out = []
    for z, other, mu, v, g in ((z1, z2, stats[0], stats[1], g1), (z2, z1, stats[2], stats[3], g2)):
        s = torch.sqrt(v + eps)
        hinge = torch.where(s < 1, -go * var / (2 * d * (n - 1) * s), torch.zeros_like(s))
        coef = -a * (n - 1) * v + hinge  # the diagonal of K out of the covariance, the hinge in
        one = _ones(z)
        if path == engine.PATH_GRAM:
            dx = engine.gram_times(g, z, mu, one, z, mu, one, coef, a)
        else:
            dx = engine.tiles_bwd(z, mu, one, z, mu, one, coef, a)
        dz = dx - dx.mean(dim=0) + (go * (2 * sim / (n * d))) * (z.float() - other.float())
        out.append(dz.to(z.dtype))
    return out[0], out[1]
