"""Benchmark spec: the symmetric CLIP loss (batch B on the x axis, D = 256, learnable scale).
Fused vs the eager reference (B x B logits) vs torch.compile(reference)."""
from __future__ import annotations

import torch

from .. import functional, reference
from .spec import OpBench

D = 256


def make_inputs(b: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(b, D, generator=g).to(device, dtype).requires_grad_(),
        "text": torch.randn(b, D, generator=g).to(device, dtype).requires_grad_(),
        "logit_scale": torch.tensor(1 / 0.07, device=device).requires_grad_(),
    }


def _skip(provider: str, b: int, device: torch.device):
    if provider in ("reference", "compiled") and b > 32768:
        return "the reference's B x B logits (and their gradient) exceed memory"
    return None


BENCHES = [OpBench(
    name="clip_loss",
    x_label="batch B",
    sizes=[2048, 8192, 16384],
    make_inputs=make_inputs,
    fused=lambda x: functional.clip_loss(x["image"], x["text"], x["logit_scale"]),
    reference=lambda x: reference.clip_loss(x["image"], x["text"], x["logit_scale"]),
    # fused fwd+bwd: 4 matmul-equivalents of B^2 D (forward, recompute, dI, dT)
    flops=lambda b: 4 * 2.0 * b * b * D,
    skip=_skip,
    describe=f"CLIP loss, B images vs B texts, D={D}, learnable logit scale",
)]
