"""MoCo key-queue enqueue: fused (pointer on the device, one op) vs the official MoCo
index-assignment style (pointer read to the host, slice assignment) and the device-index
reference (index_copy_). Queue K = 65,536 keys of D = 128 (MoCo v2); size = keys per
enqueue (the global batch)."""
from __future__ import annotations

import torch

from .. import moco, reference
from .spec import OpBench

QUEUE, DIM = 65536, 128


def make_inputs(size: int, dtype: torch.dtype, device: torch.device) -> dict:
    q = moco.MoCoQueue(DIM, QUEUE, dtype=dtype, device=device)
    with torch.no_grad():
        q.ptr.fill_(QUEUE - size // 2)  # every enqueue wraps around
    keys = torch.nn.functional.normalize(torch.randn(size, DIM, device=device), dim=1)
    return {"queue": q, "keys": keys.to(dtype)}


def fused(inp: dict):
    inp["queue"].enqueue(inp["keys"])
    return inp["queue"].buffer


def reference_enqueue(inp: dict):
    q = inp["queue"]
    reference.moco_enqueue_(q.buffer, q.ptr, inp["keys"])
    return q.buffer


def official(inp: dict):
    q = inp["queue"]
    reference.moco_enqueue_official_(q.buffer, q.ptr, inp["keys"])
    return q.buffer


BENCHES = [OpBench(
    name="moco_enqueue",
    x_label="keys per enqueue",
    sizes=[256, 1024, 4096],
    make_inputs=make_inputs,
    fused=fused,
    reference=reference_enqueue,
    extra_providers={"official": official},
    differentiable=False,
    unit=lambda size, s: (2 * 4 * size * DIM / s / 1e9, "GB/s (fp32)"),
    describe=f"MoCoQueue.enqueue into K = {QUEUE} x D = {DIM}, pointer near the end (wraps)",
)]
