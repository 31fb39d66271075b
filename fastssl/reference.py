"""Pure-PyTorch ground truth for every fastssl op.

These functions are the specification: tests compare every fused kernel against them,
benchmarks time them (eager and under ``torch.compile``), and ``backend="reference"`` runs
them. They favour clarity over memory: most materialise the full N x N logits.

Sections are per op, in the order of ``fastssl/__init__.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------
# NT-Xent (SimCLR) and its decoupled variant (DCL)
# ---------------------------------------------------------------------------------------


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature=0.1, *, normalize: bool = True,
            reduction: str = "mean", decoupled: bool = False) -> torch.Tensor:
    """NT-Xent loss of SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709).

    Z = [z1; z2] (2N x D), L2-normalised when ``normalize``; S = Z Z^T / temperature with the
    diagonal masked; row i's positive is t(i) = (i + N) mod 2N;
    loss_i = logsumexp_{j != i} S_ij - S_i,t(i). With ``decoupled`` (DCL, Yeh et al. 2021,
    https://arxiv.org/abs/2110.06848) the positive is also removed from the logsumexp.

    Args:
        z1, z2: (N, D) embeddings of the two views.
        temperature: float or 0-dim tensor (> 0).
        reduction: "mean" over the 2N rows, "sum", or "none" (the (2N,) vector).
    """
    z = torch.cat([z1, z2], dim=0)
    if normalize:
        z = F.normalize(z, dim=1)
    m = z.shape[0]
    n = m // 2
    logits = (z @ z.T) / temperature
    rows = torch.arange(m, device=z.device)
    target = (rows + n) % m
    mask = torch.eye(m, dtype=torch.bool, device=z.device)
    positive = logits[rows, target]
    if decoupled:
        mask = mask.clone()
        mask[rows, target] = True
    logits = logits.masked_fill(mask, float("-inf"))
    loss = torch.logsumexp(logits, dim=1) - positive
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# ---------------------------------------------------------------------------------------
# InfoNCE (MoCo), CLIP, SupCon                                      [issue: contrastive family]
# ---------------------------------------------------------------------------------------



# ---------------------------------------------------------------------------------------
# MoCo machinery: EMA update and key queue                          [issue: MoCo machinery]
# ---------------------------------------------------------------------------------------



# ---------------------------------------------------------------------------------------
# SSL augmentation                                                  [issue: augmentation]
# ---------------------------------------------------------------------------------------
