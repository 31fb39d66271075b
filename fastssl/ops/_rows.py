"""O(rows x D) prologue and epilogue of the Triton contrastive ops (``xent``, ``info_nce``,
``clip_loss``, ``supcon``): L2 normalisation of the rows and its gradient, as plain tensor ops
(a few memory-bound kernels each, next to the O(rows^2 D) tile work of the engine).

Overflow-safe: each row is divided by its max-abs before the squared norm, so rows up to the
dtype's range (1e30 in fp32 / bf16) normalise as in fp64 -- the squared norm of the raw row
would overflow fp32 at ~1.8e19. A non-finite row gets a NaN norm, hence NaN rows that poison
every row's log-sum-exp (the C++ kernels give NaN losses for non-finite input too).
"""
from __future__ import annotations

import torch

NORM_EPS = 1e-12  # F.normalize's eps, on the fp32 norm


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """(M,) fp32 L2 norms of the rows of ``x``, without overflow."""
    xf = x.float()
    amax = xf.abs().amax(dim=1) if xf.shape[1] > 0 else xf.new_zeros(xf.shape[0])
    unit = torch.where((amax > 0) & torch.isfinite(amax), amax, torch.ones_like(amax))
    norm = unit * (xf / unit[:, None]).norm(dim=1)
    return torch.where(torch.isfinite(amax), norm, torch.full_like(norm, float("nan")))


def normalize_rows(x: torch.Tensor, normalize: bool):
    """-> (xhat in x's dtype, contiguous: the tensor-core operand; norms (M,) fp32).
    Without ``normalize``, xhat is x and the norms are ones."""
    if not normalize:
        return x.contiguous(), torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    norm = row_norms(x)
    xhat = (x.float() / norm.clamp_min(NORM_EPS)[:, None]).to(x.dtype).contiguous()
    return xhat, norm


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
