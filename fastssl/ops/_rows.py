"""O(rows x D) prologue and epilogue of the Triton contrastive ops (``xent``, ``info_nce``,
``clip_loss``, ``supcon``): the engine's exact operands with their fp32 inverse norms
(:func:`scaled_rows`), and the gradient of the L2 normalisation, as plain tensor ops (a few
memory-bound kernels each, next to the O(rows^2 D) tile work of the engine).

Overflow-safe: each row is scaled by a power of two from its max-abs before the squared norm,
so rows up to the dtype's range (1e30 in fp32 / bf16) normalise as in fp64 -- the squared norm
of the raw row would overflow fp32 at ~1.8e19. A non-finite row gets a NaN norm, hence NaN
logits that poison every row's log-sum-exp (the C++ kernels give NaN losses for non-finite
input too).
"""
from __future__ import annotations

import torch

NORM_EPS = 1e-12  # F.normalize's eps, on the fp32 norm


def normalize_backward(dxhat: torch.Tensor, x: torch.Tensor, norm: torch.Tensor,
                       normalize: bool) -> torch.Tensor:
    """dx (fp32) from dL/dxhat (fp32) through xhat = x / max(||x||, eps) (identity without
    ``normalize``); the projection uses xhat recomputed in fp32."""
    if not normalize:
        return dxhat
    denom = norm.clamp_min(NORM_EPS)[:, None]
    xhat = x.float() / denom
    proj = dxhat - xhat * (xhat * dxhat).sum(dim=1, keepdim=True)
    clamped = (norm < NORM_EPS)[:, None]
    return torch.where(clamped, dxhat, proj) / denom


def scaled_rows(x: torch.Tensor, normalize: bool):
    """The exact tensor-core operands of the contrastive engine and their fp32 row factors:
    -> (xs in x's dtype, r (M,) fp32, norms (M,) fp32) with xs * r == x / max(||x||, eps).

    xs = x * 2^-e per row (e from the row's max-abs) is exact in x's dtype (a power-of-two
    scale), so the dot of two rows is the dot of the inputs themselves, not of normalised rows
    rounded to 16 bits (at tau = 0.01 that rounding would dominate the error); the normalisation
    is the fp32 factor r applied to the fp32 dot. Also overflow-safe: |xs| < 1.
    Without ``normalize``: xs = x, r = 1."""
    m = x.shape[0]
    if not normalize:
        ones = torch.ones(m, dtype=torch.float32, device=x.device)
        return x.contiguous(), ones, ones
    xf = x.float()
    amax = xf.abs().amax(dim=1) if xf.shape[1] > 0 else xf.new_zeros(m)
    finite = torch.isfinite(amax)
    _, e = torch.frexp(torch.where(finite & (amax > 0), amax, torch.ones_like(amax)))
    xs32 = torch.ldexp(xf, -e[:, None].to(torch.float32))
    norm_s = xs32.norm(dim=1)
    norms = torch.where(finite, torch.ldexp(norm_s, e.to(torch.float32)),
                        torch.full_like(norm_s, float("nan")))
    eps_s = torch.ldexp(torch.full_like(norm_s, NORM_EPS), -e.to(torch.float32))
    r = 1.0 / torch.maximum(norm_s, eps_s)
    r = torch.where(finite, r, torch.full_like(r, float("nan")))
    return xs32.to(x.dtype).contiguous(), r, norms
