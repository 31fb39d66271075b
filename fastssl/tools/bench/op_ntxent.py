"""NT-Xent benchmark: fused (C++ on CPU / Triton on CUDA) vs eager reference vs
torch.compile(reference), on synthetic embeddings z1, z2 ~ N(0, 1) of shape (N, D), D = 128."""
from __future__ import annotations

import torch

from ... import functional, reference
from .spec import OpBench

DIM = 128
TEMPERATURE = 0.1


def make_inputs(size: int, dtype: torch.dtype, device: torch.device) -> dict:
    """size = 2N rows (both views)."""
    g = torch.Generator().manual_seed(size)
    n = size // 2
    z1 = torch.randn(n, DIM, generator=g).to(device=device, dtype=dtype).requires_grad_()
    z2 = torch.randn(n, DIM, generator=g).to(device=device, dtype=dtype).requires_grad_()
    return {"z1": z1, "z2": z2}


def fused(inp: dict) -> torch.Tensor:
    return functional.nt_xent(inp["z1"], inp["z2"], TEMPERATURE)


def eager(inp: dict) -> torch.Tensor:
    return reference.nt_xent(inp["z1"], inp["z2"], TEMPERATURE)


def floor_flops(size: int) -> float:
    # Two matmul-equivalents of (2N)^2 D (one multiply-add = 2 FLOPs): S = Z Z^T once over the
    # full square and dZ = K Z once; the symmetric fused design does exactly this much GEMM work.
    return 2 * 2.0 * size * size * DIM


def skip(provider: str, size: int, device: torch.device):
    """The O(N^2) providers keep several (2N)^2 fp32 matrices alive (eager: ~3, measured
    3.2 GB at 2N = 16384; compiled: ~2.2): skip them where that cannot fit."""
    if provider in ("reference", "compiled"):
        need = (3.2 if provider == "reference" else 2.3) * size * size * 4
        if device.type == "cuda":
            free = torch.cuda.mem_get_info()[0]
        else:
            free = _available_ram()
        if need > 0.8 * free:
            return f"needs ~{need / 2**30:.0f} GiB for its (2N)^2 logits, {free / 2**30:.0f} GiB free"
    return None


def _available_ram() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


BENCHES = [OpBench(
    name="nt_xent", x_label="2N", sizes=[2048, 8192, 16384, 65536], make_inputs=make_inputs,
    fused=fused, reference=eager, flops=floor_flops, skip=skip,
    describe=f"NT-Xent loss, D={DIM}, temperature={TEMPERATURE}, synthetic N(0,1) embeddings")]
