"""Glue for ``torch.ops.fastssl.ssl_augment`` (kernel: ``csrc/cpu/augment.cpp``).

No autograd: augmentation runs on data, before the model. The fake (meta) implementation
gives the output's shape contract, for ``torch.compile`` and ``torch.library.opcheck``.
"""
from __future__ import annotations

import torch

from .. import _ext

_ext.available()  # runs the C++ registrations before the Python ones below


@torch.library.register_fake("fastssl::ssl_augment")
def _ssl_augment_fake(images, crop, flags, factors, order, taps, solarize_threshold, mean,
                      std, out_size, out_dtype):
    return images[0].new_empty((len(images), 3, out_size, out_size), dtype=out_dtype)


def pack_params(params) -> tuple:
    """AugmentParams -> the kernel's (crop, flags, factors, order, taps) CPU tensors; flags
    columns: flip, jitter, gray, blur, solarize."""
    flags = torch.stack([params.flip, params.jitter, params.gray, params.blur,
                         params.solarize], dim=1).to(torch.bool).contiguous()
    return (params.crop.to(torch.int64).contiguous(), flags,
            params.factors.to(torch.float32).contiguous(),
            params.order.to(torch.int64).contiguous(),
            params.taps.to(torch.float32).contiguous())


def ssl_augment(images: list, params, out_size: int, mean: torch.Tensor, std: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """Runs the fused C++ kernel on a list of B uint8 or float32 [3, H, W] CPU images."""
    crop, flags, factors, order, taps = pack_params(params)
    return torch.ops.fastssl.ssl_augment(
        [im.contiguous() for im in images], crop, flags, factors, order, taps,
        float(params.solarize_threshold), mean.to(torch.float32).contiguous(),
        std.to(torch.float32).contiguous(), int(out_size), out_dtype)
