"""MoCo key-queue enqueue: fused (pointer on the device, one op) vs the official MoCo
index-assignment style (pointer read to the host, slice assignment) and the device-index
reference (index_copy_). Queue K = 65,536 keys of D = 128 (MoCo v2); size = keys per
enqueue (the global batch).

Every timed call wraps around the end of the ring: each provider first puts the pointer
size/2 slots before the end (``_before_the_end``, a 0-dim fill, the same in every provider)
and then enqueues, so the two-segment write -- the case official MoCo cannot do and the
fused kernel splits -- is what is measured, not only in the untimed warm-up (before, only the
first call wrapped: the pointer then sat at size/2 for the next 65,536/size calls)."""
from __future__ import annotations

import torch

from ... import moco, reference
from .spec import OpBench

QUEUE, DIM = 65536, 128


def make_inputs(size: int, dtype: torch.dtype, device: torch.device) -> dict:
    q = moco.MoCoQueue(DIM, QUEUE, dtype=dtype, device=device)
    keys = torch.nn.functional.normalize(torch.randn(size, DIM, device=device), dim=1)
    return {"queue": q, "keys": keys.to(dtype)}


def _before_the_end(inp: dict) -> None:
    with torch.no_grad():
        inp["queue"].ptr.fill_(QUEUE - inp["keys"].shape[0] // 2)


def fused(inp: dict):
    _before_the_end(inp)
    inp["queue"].enqueue(inp["keys"])
    return inp["queue"].buffer


def reference_enqueue(inp: dict):
    _before_the_end(inp)
    q = inp["queue"]
    reference.moco_enqueue_(q.buffer, q.ptr, inp["keys"])
    return q.buffer


def official(inp: dict):
    _before_the_end(inp)
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
    describe=f"MoCoQueue.enqueue into K = {QUEUE} x D = {DIM}; every timed call wraps",
)]
