"""Benchmark spec: the VICReg loss (D = 8192, the paper's projector; N on the x axis). Fused
(Gram path when N < 5D/3, tiled covariance otherwise: no D x D matrix) vs the eager reference
(two D x D covariances and their gradients) vs torch.compile(reference). The issue's
acceptance shape is N = 2048, D = 8192, fp32, forward + backward."""
from __future__ import annotations

import torch

from ... import functional, reference
from .spec import OpBench

D = 8192


def make_inputs(n: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, D, generator=g)
    z1 = base + 0.5 * torch.randn(n, D, generator=g)
    z2 = 0.8 * base + 0.5 * torch.randn(n, D, generator=g)
    return {"z1": z1.to(device, dtype).requires_grad_(),
            "z2": z2.to(device, dtype).requires_grad_()}


def _flops(n: int) -> float:
    # The floor of the fused Gram path (ops/redundancy.py): 6 N^2 D; tiled: 10 N D^2.
    return 6.0 * n * n * D if 3 * n < 5 * D else 10.0 * n * D * D


BENCHES = [OpBench(
    name="vicreg",
    x_label="N",
    sizes=[2048],
    make_inputs=make_inputs,
    fused=lambda x: functional.vicreg(x["z1"], x["z2"]),
    reference=lambda x: reference.vicreg(x["z1"], x["z2"]),
    flops=_flops,
    describe=f"VICReg, N samples, D={D}, sim=var=25, cov=1",
)]
