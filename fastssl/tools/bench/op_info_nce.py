"""Benchmark spec: InfoNCE against a MoCo queue (N = 256 queries, D = 128, queue size K on the
x axis). Fused C++/Triton vs the eager reference vs torch.compile(reference)."""
from __future__ import annotations

import torch

from ... import functional, reference
from .spec import OpBench

N, D, TEMPERATURE = 256, 128, 0.07


def make_inputs(k: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    queue = torch.nn.functional.normalize(torch.randn(k, D, generator=g), dim=1)
    return {
        "query": torch.randn(N, D, generator=g).to(device, dtype).requires_grad_(),
        "key": torch.randn(N, D, generator=g).to(device, dtype),  # momentum encoder: no grad
        "queue": queue.to(device, dtype),
    }


BENCHES = [OpBench(
    name="info_nce",
    x_label="queue K",
    sizes=[4096, 16384, 65536],
    make_inputs=make_inputs,
    fused=lambda x: functional.info_nce(x["query"], x["key"], x["queue"], TEMPERATURE),
    reference=lambda x: reference.info_nce(x["query"], x["key"], x["queue"], TEMPERATURE),
    # floor: S = Q U^T and the softmax-weighted U (2 matmul-equivalents of N K D)
    flops=lambda k: 2 * 2.0 * N * k * D,
    describe=f"MoCo InfoNCE, N={N} queries vs a queue of K keys, D={D}, tau={TEMPERATURE}",
)]
