r"""``vicreg``: the VICReg loss (Bardes et al. 2022, https://arxiv.org/abs/2105.04906) without
the D x D covariance matrices. The math, both paths (Gram when N < 5 D / 3, tiled covariance
otherwise) and their cost model are in ``ops/redundancy.py``.

Ops (CPU kernel ``csrc/cpu/vicreg.cpp``, CUDA kernel below):

* ``vicreg_fwd(z1, z2, sim, var, cov, eps, path) -> (loss, stats, gram1, gram2)``
* ``vicreg_bwd(grad, z1, z2, stats, gram1, gram2, sim, var, cov, eps, path) -> (dz1, dz2)``

Saved-tensor contract (both devices): z1, z2 (raw), ``stats`` (4, D) fp32 = [mu1, v1, mu2, v2]
(batch means and unbiased variances), and on the Gram path the N x N fp32 Grams X1 X1^T,
X2 X2^T of the centred views (``(0, 0)`` on the tiled path, which recomputes its tiles of the
covariance). ``loss`` is a 0-dim fp32 tensor.
"""
from __future__ import annotations

import torch

from . import _library
from . import redundancy as engine

_library.define("vicreg_fwd", "(Tensor z1, Tensor z2, float sim, float var, float cov, "
                "float eps, int path) -> (Tensor loss, Tensor stats, Tensor gram1, "
                "Tensor gram2)")
_library.define("vicreg_bwd", "(Tensor grad, Tensor z1, Tensor z2, Tensor stats, "
                "Tensor gram1, Tensor gram2, float sim, float var, float cov, float eps, "
                "int path) -> (Tensor dz1, Tensor dz2)")


@torch.library.register_fake("fastssl::vicreg_fwd")
def _fwd_fake(z1, z2, sim, var, cov, eps, path):
    n, d = z1.shape
    g = n if path == engine.PATH_GRAM else 0
    f32 = dict(dtype=torch.float32)
    return (z1.new_empty((), **f32), z1.new_empty((4, d), **f32), z1.new_empty((g, g), **f32),
            z1.new_empty((g, g), **f32))


@torch.library.register_fake("fastssl::vicreg_bwd")
def _bwd_fake(grad, z1, z2, stats, gram1, gram2, sim, var, cov, eps, path):
    return torch.empty_like(z1), torch.empty_like(z2)


def _setup_context(ctx, inputs, output):
    z1, z2, sim, var, cov, eps, path = inputs
    _loss, stats, gram1, gram2 = output
    ctx.save_for_backward(z1, z2, stats, gram1, gram2)
    ctx.coefs = (sim, var, cov, eps, path)


def _backward(ctx, grad_loss, _gstats, _gg1, _gg2):
    z1, z2, stats, gram1, gram2 = ctx.saved_tensors
    dz1, dz2 = torch.ops.fastssl.vicreg_bwd(grad_loss, z1, z2, stats, gram1, gram2, *ctx.coefs)
    return dz1, dz2, None, None, None, None, None


torch.library.register_autograd("fastssl::vicreg_fwd", _backward, setup_context=_setup_context)
_library.no_double_backward("vicreg_bwd", "vicreg")

EPS = 1e-4  # lightly's VICRegLoss eps (inside the sqrt of the variance)


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim: float, var: float,
                cov: float) -> torch.Tensor:
    """The loss, a 0-dim fp32 tensor, on the path the cost model picks."""
    path = engine.choose_path(z1.shape[0], z1.shape[1])
    return torch.ops.fastssl.vicreg_fwd(z1, z2, sim, var, cov, EPS, path)[0]
