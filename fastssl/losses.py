"""``nn.Module`` wrappers of the fused losses: they hold the configuration and call
``fastssl.functional``. Drop-in replacements for the loss modules of SSL code bases."""
from __future__ import annotations

import torch
from torch import nn

from . import _dispatch, _validate, functional


def _check_config(temperature_name: str, temperature, backend: str, reduction=None) -> None:
    """Construction-time checks, so a bad configuration fails where it is written, not at
    the first forward pass (the forward pass checks again: a learnable temperature moves)."""
    _validate.positive_number(temperature_name, temperature)
    if reduction is not None:
        _validate.reduction(reduction)
    if backend not in _dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")


class NTXentLoss(nn.Module):
    r"""NT-Xent (SimCLR) loss, fused: O(N·D) memory, forward and backward.

    Chen et al. 2020, https://arxiv.org/abs/2002.05709. See :func:`fastssl.nt_xent` for the
    formula and every argument.

    Args:
        temperature: float, or a tensor/``nn.Parameter`` to learn it (its gradient is computed).
        normalize, reduction, gather, decoupled, backend: as in :func:`fastssl.nt_xent`.

    Raises:
        TypeError, ValueError: at construction, for a temperature that is not a number or a
            one-element floating tensor > 0 and finite, or an unknown reduction or backend.

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
        _check_config("temperature", temperature, backend, reduction)
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


class InfoNCELoss(nn.Module):
    r"""InfoNCE (MoCo) loss, fused: against a memory queue or the other keys of the batch.

    He et al. 2020, https://arxiv.org/abs/1911.05722. See :func:`fastssl.info_nce` for the
    formula and every argument.

    Args:
        temperature: float, or a tensor/``nn.Parameter`` to learn it.
        normalize, reduction, gather, backend: as in :func:`fastssl.info_nce`.

    Raises:
        TypeError, ValueError: at construction, for a temperature that is not a number or a
            one-element floating tensor > 0 and finite, or an unknown reduction or backend.

    Shapes:
        ``forward(query, key, queue=None)``: query, key (N, D), queue (K, D) or None ->
        scalar, or (N,) with ``reduction="none"``.

    Example:
        >>> import torch, fastssl
        >>> criterion = fastssl.InfoNCELoss(temperature=0.2)
        >>> q = torch.randn(8, 128, requires_grad=True)
        >>> with torch.no_grad():  # MoCo: keys from the momentum encoder
        ...     k = torch.randn(8, 128)
        >>> queue = torch.nn.functional.normalize(torch.randn(1024, 128), dim=1)
        >>> loss = criterion(q, k, queue)
        >>> loss.backward()
        >>> q.grad.shape
        torch.Size([8, 128])
    """

    def __init__(self, temperature=0.07, *, normalize: bool = True, reduction: str = "mean",
                 gather: bool = False, backend: str = "auto"):
        super().__init__()
        _check_config("temperature", temperature, backend, reduction)
        self.temperature = temperature
        self.normalize, self.reduction, self.gather, self.backend = (normalize, reduction,
                                                                     gather, backend)

    def forward(self, query: torch.Tensor, key: torch.Tensor,
                queue: torch.Tensor | None = None) -> torch.Tensor:
        return functional.info_nce(query, key, queue, self.temperature,
                                   normalize=self.normalize, reduction=self.reduction,
                                   gather=self.gather, backend=self.backend)


class CLIPLoss(nn.Module):
    r"""Symmetric CLIP loss, fused, with CLIP's learnable logit scale.

    Radford et al. 2021, https://arxiv.org/abs/2103.00020. See :func:`fastssl.clip_loss`.
    The module owns ``logit_scale`` as ``exp(log_scale)`` with ``log_scale`` an
    ``nn.Parameter`` initialised to ``log(1 / init_temperature)`` (CLIP: 1/0.07), clamped to
    ``max_scale`` (CLIP: 100) in the forward pass, or a fixed float with ``learnable=False``.

    Args:
        init_temperature: initial temperature (logit scale = 1 / temperature).
        learnable: learn the scale (an ``nn.Parameter``) or keep it fixed.
        max_scale: upper clamp of the scale, > 0 (``math.inf``: no clamp).
        normalize, gather, backend: as in :func:`fastssl.clip_loss`.

    Raises:
        TypeError: ``init_temperature`` or ``max_scale`` not a number.
        ValueError: ``init_temperature`` <= 0 or not finite, ``max_scale`` <= 0 or NaN,
            unknown backend (at construction).

    Shapes:
        ``forward(image, text)``: image, text (B, D) -> scalar.

    Example:
        >>> import torch, fastssl
        >>> criterion = fastssl.CLIPLoss()
        >>> image = torch.randn(16, 64, requires_grad=True)
        >>> text = torch.randn(16, 64, requires_grad=True)
        >>> loss = criterion(image, text)
        >>> loss.backward()
        >>> criterion.log_scale.grad is not None
        True
    """

    def __init__(self, init_temperature: float = 0.07, *, learnable: bool = True,
                 max_scale: float = 100.0, normalize: bool = True, gather: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if isinstance(init_temperature, torch.Tensor):
            raise TypeError("init_temperature must be a float (the module owns the learnable "
                            "log scale), got a tensor")
        _check_config("init_temperature", init_temperature, backend)
        _validate.positive_number("max_scale", max_scale, allow_inf=True)
        init = torch.tensor(1.0 / float(init_temperature)).log()
        if learnable:
            self.log_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_scale", init)
        self.max_scale = max_scale
        self.normalize, self.gather, self.backend = normalize, gather, backend

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale = self.log_scale.exp().clamp(max=self.max_scale)
        return functional.clip_loss(image, text, scale, normalize=self.normalize,
                                    gather=self.gather, backend=self.backend)


class SupConLoss(nn.Module):
    r"""Supervised contrastive (SupCon) loss, fused.

    Khosla et al. 2020, https://arxiv.org/abs/2004.11362. See :func:`fastssl.supcon`; anchors
    without a positive are excluded from the mean.

    Args:
        temperature: float, or a tensor/``nn.Parameter`` to learn it.
        normalize, backend: as in :func:`fastssl.supcon`.

    Raises:
        TypeError, ValueError: at construction, for a temperature that is not a number or a
            one-element floating tensor > 0 and finite, or an unknown backend.

    Shapes:
        ``forward(features, labels)``: features (N, D), labels (N,) integers -> scalar.

    Example:
        >>> import torch, fastssl
        >>> criterion = fastssl.SupConLoss(temperature=0.1)
        >>> z = torch.randn(32, 128, requires_grad=True)
        >>> labels = torch.randint(0, 4, (32,))
        >>> criterion(z, labels).backward()
        >>> z.grad.shape
        torch.Size([32, 128])
    """

    def __init__(self, temperature=0.1, *, normalize: bool = True, backend: str = "auto"):
        super().__init__()
        _check_config("temperature", temperature, backend)
        self.temperature = temperature
        self.normalize, self.backend = normalize, backend

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return functional.supcon(features, labels, self.temperature, normalize=self.normalize,
                                 backend=self.backend)


class MaskedPatchLoss(nn.Module):
    r"""MAE's pixel reconstruction loss (``norm_pix_loss``), fused.

    He et al. 2022, https://arxiv.org/abs/2111.06377. See :func:`fastssl.masked_patch_loss`
    for the patch order, the formula and every argument.

    Args:
        patch_size, norm_pix, eps, backend: as in :func:`fastssl.masked_patch_loss`.

    Raises:
        TypeError, ValueError: at construction, for a patch_size that is not an int >= 1, an
            eps that is not a finite float > 0, or an unknown backend.

    Shapes:
        ``forward(pred, images, mask)``: pred (B, L, p·p·C), images (B, C, H, W), mask (B, L)
        bool or float (1 = masked) -> scalar.

    Example:
        >>> import torch, fastssl
        >>> criterion = fastssl.MaskedPatchLoss(patch_size=8)
        >>> images = torch.randn(2, 3, 16, 24)
        >>> pred = torch.randn(2, 6, 8 * 8 * 3, requires_grad=True)
        >>> mask = torch.rand(2, 6) < 0.75
        >>> criterion(pred, images, mask).backward()
        >>> pred.grad.shape
        torch.Size([2, 6, 192])
    """

    def __init__(self, patch_size: int, *, norm_pix: bool = True, eps: float = 1e-6,
                 backend: str = "auto"):
        super().__init__()
        _validate.positive_int("patch_size", patch_size)
        _validate.positive_number("eps", eps)
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        self.patch_size, self.norm_pix, self.eps, self.backend = patch_size, norm_pix, eps, backend

    def forward(self, pred: torch.Tensor, images: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        return functional.masked_patch_loss(pred, images, mask, patch_size=self.patch_size,
                                            norm_pix=self.norm_pix, eps=self.eps,
                                            backend=self.backend)


class BarlowTwinsLoss(nn.Module):
    r"""Barlow Twins loss, fused (no D x D matrix). See :func:`fastssl.barlow_twins`.

    Args:
        lambda_, normalize, gather, backend: as in :func:`fastssl.barlow_twins`.

    Shapes:
        ``forward(z1, z2)``: (N, D) each, N >= 2 -> scalar.

    Example:
        >>> import torch, fastssl
        >>> criterion = fastssl.BarlowTwinsLoss()
        >>> z1, z2 = torch.randn(32, 64, requires_grad=True), torch.randn(32, 64)
        >>> criterion(z1, z2).backward()
    """

    def __init__(self, lambda_: float = 5e-3, *, normalize: str = "batch", gather: bool = False,
                 backend: str = "auto"):
        super().__init__()
        _validate.finite_coefficient("lambda_", lambda_)
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        self.lambda_, self.normalize, self.gather, self.backend = lambda_, normalize, gather, backend

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return functional.barlow_twins(z1, z2, self.lambda_, normalize=self.normalize,
                                       gather=self.gather, backend=self.backend)


class VICRegLoss(nn.Module):
    r"""VICReg loss, fused (no D x D matrix). See :func:`fastssl.vicreg`.

    Args:
        sim, var, cov, gather, backend: as in :func:`fastssl.vicreg`.

    Shapes:
        ``forward(z1, z2)``: (N, D) each, N >= 2 -> scalar.

    Example:
        >>> import torch, fastssl
        >>> criterion = fastssl.VICRegLoss()
        >>> z1, z2 = torch.randn(32, 64, requires_grad=True), torch.randn(32, 64)
        >>> criterion(z1, z2).backward()
    """

    def __init__(self, sim: float = 25.0, var: float = 25.0, cov: float = 1.0, *,
                 gather: bool = False, backend: str = "auto"):
        super().__init__()
        for name, value in (("sim", sim), ("var", var), ("cov", cov)):
            _validate.finite_coefficient(name, value)
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        self.sim, self.var, self.cov, self.gather, self.backend = sim, var, cov, gather, backend

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return functional.vicreg(z1, z2, self.sim, self.var, self.cov, gather=self.gather,
                                 backend=self.backend)
