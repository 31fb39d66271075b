"""``nn.Module`` wrappers of the fused losses: they hold the configuration and call
``fastssl.functional``. Drop-in replacements for the loss modules of SSL code bases."""
from __future__ import annotations

import torch
from torch import nn

from . import functional


class NTXentLoss(nn.Module):
    r"""NT-Xent (SimCLR) loss, fused: O(N·D) memory, forward and backward.

    Chen et al. 2020, https://arxiv.org/abs/2002.05709. See :func:`fastssl.nt_xent` for the
    formula and every argument.

    Args:
        temperature: float, or a tensor/``nn.Parameter`` to learn it (its gradient is computed).
        normalize, reduction, gather, decoupled, backend: as in :func:`fastssl.nt_xent`.

    Shapes:
        ``forward(z1, z2)``: z1, z2 (N, D) -> scalar, or (2N,) with ``reduction="none"``.

    Example:
        >>> import torch, fastssl
        >>> criterion = fastssl.NTXentLoss(temperature=0.1)
        >>> z1 = torch.randn(16, 128, requires_grad=True)
        >>> z2 = torch.randn(16, 128, requires_grad=True)
        >>> loss = criterion(z1, z2)
        >>> loss.backward()
        >>> z1.grad.shape
        torch.Size([16, 128])
    """

    def __init__(self, temperature=0.1, *, normalize: bool = True, reduction: str = "mean",
                 gather: bool = False, decoupled: bool = False, backend: str = "auto"):
        super().__init__()
        self.temperature = temperature
        self.normalize, self.reduction, self.gather = normalize, reduction, gather
        self.decoupled, self.backend = decoupled, backend

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return functional.nt_xent(z1, z2, self.temperature, normalize=self.normalize,
                                  reduction=self.reduction, gather=self.gather,
                                  decoupled=self.decoupled, backend=self.backend)

    def extra_repr(self) -> str:
        t = self.temperature
        t = float(t.detach()) if isinstance(t, torch.Tensor) else t
        return (f"temperature={t}, normalize={self.normalize}, reduction={self.reduction!r}, "
                f"decoupled={self.decoupled}, backend={self.backend!r}")
