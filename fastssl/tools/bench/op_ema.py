"""EMA (momentum) update of a ResNet-50-shaped parameter list: fused vs the Python loop,
``torch._foreach_lerp_``, and one ``lerp_`` over a single flat buffer (the bandwidth floor).

The parameter list is built from ResNet-50's real shapes (161 tensors, 25,557,032 parameters
at width 100%; no torchvision needed), scaled in width: size = width in percent. Target and
online tensors are views into two flat buffers, so every provider reads and writes the very
same memory (3 x 4 bytes per fp32 parameter) and ``flat_lerp`` is the floor.
"""
from __future__ import annotations

import math

import torch

from ... import moco, reference
from .spec import OpBench

MOMENTUM = 0.996


def resnet50_shapes(width: float = 1.0) -> list:
    """Parameter shapes of torchvision's ResNet-50 (conv, BN weight/bias, fc) in registration
    order, channels scaled by ``width``: 161 tensors, 25,557,032 parameters at width 1."""
    c = lambda n: max(1, int(round(n * width)))  # noqa: E731
    stem = c(64)
    shapes = [(stem, 3, 7, 7), (stem,), (stem,)]
    inplanes = stem
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        p, out = c(planes), c(planes * 4)
        for b in range(blocks):
            shapes += [(p, inplanes, 1, 1), (p,), (p,), (p, p, 3, 3), (p,), (p,),
                       (out, p, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, inplanes), (1000,)]
    return shapes


def _views(flat: torch.Tensor, shapes: list) -> list:
    out, off = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[off:off + n].view(s))
        off += n
    return out


def make_inputs(size: int, dtype: torch.dtype, device: torch.device) -> dict:
    shapes = resnet50_shapes(size / 100)
    n = sum(math.prod(s) for s in shapes)
    flat_t = torch.randn(n, dtype=dtype, device=device)
    flat_o = torch.randn(n, dtype=dtype, device=device)
    return {"target": _views(flat_t, shapes), "online": _views(flat_o, shapes),
            "flat_target": flat_t, "flat_online": flat_o, "momentum": MOMENTUM}


def fused(inp: dict):
    moco.ema_update_(inp["target"], inp["online"], inp["momentum"])
    return inp["flat_target"]


def reference_loop(inp: dict):
    reference.ema_update_(inp["target"], inp["online"], inp["momentum"])
    return inp["flat_target"]


def foreach_lerp(inp: dict):
    torch._foreach_lerp_(inp["target"], inp["online"], 1.0 - inp["momentum"])
    return inp["flat_target"]


def flat_lerp(inp: dict):
    return inp["flat_target"].lerp_(inp["flat_online"], 1.0 - inp["momentum"])


def official_loop(inp: dict):
    """The official MoCo update: ``p_k = p_k * m + p_q * (1 - m)``, tensor by tensor."""
    m = inp["momentum"]
    for t, o in zip(inp["target"], inp["online"]):
        t.mul_(m).add_(o, alpha=1.0 - m)
    return inp["flat_target"]


def _params(size: int) -> int:
    return sum(math.prod(s) for s in resnet50_shapes(size / 100))


BENCHES = [OpBench(
    name="ema",
    x_label="ResNet-50 width %",
    sizes=[25, 50, 100, 200],
    make_inputs=make_inputs,
    fused=fused,
    reference=reference_loop,
    extra_providers={"foreach_lerp": foreach_lerp, "flat_lerp": flat_lerp,
                     "official_loop": official_loop},
    differentiable=False,
    # read target + online, write target (fp32)
    unit=lambda size, s: (3 * 4 * _params(size) / s / 1e9, "GB/s (fp32)"),
    describe="EMA of a ResNet-50-shaped parameter list (161 tensors), m = 0.996, in place",
)]
