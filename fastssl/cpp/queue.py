"""Fake registration for ``torch.ops.fastssl.moco_enqueue_`` (kernels:
``csrc/cpu/queue.cpp``, ``csrc/cuda/queue.cu``). The op writes the queue buffer, its
pointer and (on CUDA) a scratch counter in place and returns nothing, so it traces into
``torch.compile`` graphs as one node."""
from __future__ import annotations

import torch

from .. import _ext

_ext.available()  # runs the C++ registrations before the Python ones below


@torch.library.register_fake("fastssl::moco_enqueue_")
def _moco_enqueue_fake(buffer, ptr, counter, keys) -> None:
    return None
