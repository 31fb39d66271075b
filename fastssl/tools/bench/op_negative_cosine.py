"""Benchmark spec: the symmetric BYOL / SimSiam negative cosine (N on the x axis, D = 256, BYOL's
projector width). Fused (one pass per direction, no normalised copies) vs the eager reference
(F.normalize of both, a product, a row sum) vs torch.compile(reference). Memory-bound: the
floor is reading p1, p2, z1, z2 once forward and once more backward, writing dp1, dp2."""
from __future__ import annotations

import torch

from ... import functional, reference
from .spec import OpBench

D = 256


def make_inputs(n: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(n, D, generator=g).to(device, dtype).requires_grad_() for _ in range(2)]
    z = [torch.randn(n, D, generator=g).to(device, dtype) for _ in range(2)]
    return {"p1": p[0], "p2": p[1], "z1": z[0], "z2": z[1]}


BENCHES = [OpBench(
    name="negative_cosine",
    x_label="N",
    sizes=[4096, 16384, 65536],
    make_inputs=make_inputs,
    fused=lambda x: functional.symmetric_negative_cosine(x["p1"], x["p2"], x["z1"], x["z2"]),
    reference=lambda x: reference.symmetric_negative_cosine(x["p1"], x["p2"], x["z1"], x["z2"]),
    describe=f"symmetric negative cosine (BYOL / SimSiam), N rows per view, D={D}",
)]
