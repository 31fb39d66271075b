"""Benchmark spec: the supervised contrastive loss (N on the x axis, D = 128, 100 classes).
Fused vs the eager reference (N x N logits and masks) vs torch.compile(reference)."""
from __future__ import annotations

import torch

from ... import functional, reference
from .spec import OpBench

D, CLASSES, TEMPERATURE = 128, 100, 0.1


def make_inputs(n: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "features": torch.randn(n, D, generator=g).to(device, dtype).requires_grad_(),
        "labels": torch.randint(0, CLASSES, (n,), generator=g).to(device),
    }


BENCHES = [OpBench(
    name="supcon",
    x_label="N",
    sizes=[2048, 4096, 8192],
    make_inputs=make_inputs,
    fused=lambda x: functional.supcon(x["features"], x["labels"], TEMPERATURE),
    reference=lambda x: reference.supcon(x["features"], x["labels"], TEMPERATURE),
    flops=lambda n: 4 * 2.0 * n * n * D,
    describe=f"SupCon, N samples, D={D}, {CLASSES} classes, tau={TEMPERATURE}",
)]
