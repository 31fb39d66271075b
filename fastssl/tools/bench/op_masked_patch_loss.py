"""Benchmark spec: MAE's pixel reconstruction loss (batch B on the x axis; 224 x 224 RGB,
p = 16: L = 196 patches of 768 values, 75 % of them masked, norm_pix as MAE trains).
Fused vs the eager reference (patchify copy, normalised target, squared error: several
(B, L, 768) temporaries) vs torch.compile(reference)."""
from __future__ import annotations

import torch

from ... import functional, reference
from .spec import OpBench

SIDE, CHANNELS, PATCH, MASK_RATIO = 224, 3, 16, 0.75
PATCHES = (SIDE // PATCH) ** 2


def make_inputs(b: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    n_masked = int(PATCHES * MASK_RATIO)
    # MAE's masking: a random subset of exactly 75 % of each image's patches.
    order = torch.rand(b, PATCHES, generator=g).argsort(dim=1)
    mask = torch.zeros(b, PATCHES, dtype=torch.bool).scatter_(1, order[:, :n_masked], True)
    return {
        "pred": torch.randn(b, PATCHES, PATCH * PATCH * CHANNELS, generator=g)
        .to(device, dtype).requires_grad_(),
        "images": torch.randn(b, CHANNELS, SIDE, SIDE, generator=g).to(device, dtype),
        "mask": mask.to(device),
    }


BENCHES = [OpBench(
    name="masked_patch_loss",
    x_label="B",
    sizes=[64, 128, 256],
    make_inputs=make_inputs,
    fused=lambda x: functional.masked_patch_loss(x["pred"], x["images"], x["mask"],
                                                 patch_size=PATCH),
    reference=lambda x: reference.masked_patch_loss(x["pred"], x["images"], x["mask"],
                                                    patch_size=PATCH),
    describe=f"MAE loss, B x {CHANNELS} x {SIDE}^2, p={PATCH}, mask ratio {MASK_RATIO}, "
             "norm_pix",
)]
