"""Benchmark spec: the symmetric CLIP loss (batch B on the x axis, D = 256, learnable scale).
Fused vs the eager reference (B x B logits) vs torch.compile(reference)."""
from __future__ import annotations

import os

import torch

from ... import functional, reference
from .spec import OpBench

# Embedding width; FASTSSL_BENCH_CLIP_DIM overrides it (scripts/gpu_check.sh runs CLIP's
# D = 512 headline case that way).
D = int(os.environ.get("FASTSSL_BENCH_CLIP_DIM", "256"))


def make_inputs(b: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(b, D, generator=g).to(device, dtype).requires_grad_(),
        "text": torch.randn(b, D, generator=g).to(device, dtype).requires_grad_(),
        "logit_scale": torch.tensor(1 / 0.07, device=device).requires_grad_(),
    }


def _skip(provider: str, b: int, device: torch.device):
    if provider not in ("reference", "compiled"):
        return None
    # The reference holds ~6 fp32 B x B matrices (logits, both log-softmaxes, their gradients).
    need = 6 * 4 * b * b
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if need > 0.9 * free:
            return f"the reference's B x B matrices need ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} free"
        return None
    if b > 32768:
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
