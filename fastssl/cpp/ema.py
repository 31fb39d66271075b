"""Fake registration for ``torch.ops.fastssl.ema_update_`` (kernels: ``csrc/cpu/ema.cpp``,
``csrc/cuda/ema.cu``). The op mutates its target list in place, returns nothing and has no
gradient (it runs under ``torch.no_grad``)."""
from __future__ import annotations

import torch

from .. import _ext

_ext.available()  # runs the C++ registrations before the Python ones below


@torch.library.register_fake("fastssl::ema_update_")
def _ema_update_fake(target, online, weight) -> None:
    # A list that mixes devices dispatches here when one of them is "meta": say so, as the
    # device kernels do.
    devices = {t.device for t in target} | {o.device for o in online}
    if len(devices) > 1:
        raise RuntimeError(f"ema_update_: tensors on several devices: {sorted(map(str, devices))}")
    return None


def ema_update_(targets: list, onlines: list, weight: float) -> None:
    """``t <- lerp(t, o, weight)`` for every pair, one multi-threaded pass (CPU) or one launch
    per dtype pair (CUDA). Arguments already checked by ``fastssl.ema_update_``."""
    torch.ops.fastssl.ema_update_(targets, onlines, float(weight))
