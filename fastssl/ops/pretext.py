"""``mae_mask``: MAE / SimMIM random patch masking (CPU kernel ``csrc/cpu/pretext.cpp``, CUDA
kernel below). Spec: :func:`fastssl.reference.mae_mask`.

* ``mae_mask(seed, batch, num_patches, num_keep) -> (mask, ids_keep, ids_restore)``; ``seed``
  is an int64 tensor of 2 values (drawn on the host from the caller's generator) on the device
  the outputs should live on: its device picks the kernel.

Each row's permutation is a Fisher-Yates shuffle driven by a counter-based hash of (seed, row,
step), so CPU, CUDA and the reference agree bit for bit from one seed. No autograd (integer
outputs).

Triton: one program per row; the permutation lives in registers as a BLOCK_L-wide vector and
each of the L - 1 swaps is two masked reductions and a select (O(L^2 / lanes) per row: at
L = 196, ~200 vector steps of 256 lanes; rows run in parallel), then three scatters by the
permutation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _library

_library.define("mae_mask", "(Tensor seed, int batch, int num_patches, int num_keep) -> "
                "(Tensor mask, Tensor ids_keep, Tensor ids_restore)")


@torch.library.register_fake("fastssl::mae_mask")
def _mae_mask_fake(seed, batch, num_patches, num_keep):
    return (seed.new_empty((batch, num_patches), dtype=torch.bool),
            seed.new_empty((batch, num_keep), dtype=torch.int64),
            seed.new_empty((batch, num_patches), dtype=torch.int64))


@triton.jit
def _mul32(h, c: tl.constexpr):
    # (h * c) mod 2^32 on int64 lanes holding uint32 values, from 16-bit halves (no int64
    # overflow), as fastssl.reference._mul32.
    lo = (h & 0xFFFF) * c
    hi = (((h >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & 0xFFFFFFFF


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


@triton.jit
def mae_mask_kernel(seed_ptr, mask_ptr, keep_ptr, restore_ptr, num_patches, num_keep,
                    BLOCK_L: tl.constexpr):
    b = tl.program_id(0)
    idx = tl.arange(0, BLOCK_L).to(tl.int64)
    seed_lo = tl.load(seed_ptr) & 0xFFFFFFFF
    seed_hi = tl.load(seed_ptr + 1) & 0xFFFFFFFF
    bb = b.to(tl.int64) + tl.zeros([BLOCK_L], dtype=tl.int64)
    key = _fmix32((_mul32(bb, 0x9E3779B9) + seed_hi) & 0xFFFFFFFF) ^ seed_lo
    perm = idx
    for t in range(0, num_patches - 1):
        i = num_patches - 1 - t
        u = _fmix32((key + ((i.to(tl.int64) * 0x85EBCA6B) & 0xFFFFFFFF)) & 0xFFFFFFFF)
        j = (u * (i + 1)) >> 32  # the same value in every lane
        at_i = tl.sum(tl.where(idx == i, perm, 0), axis=0)
        at_j = tl.sum(tl.where(idx == j, perm, 0), axis=0)
        perm = tl.where(idx == i, at_j, tl.where(idx == j, at_i, perm))
    valid = idx < num_patches
    row = b.to(tl.int64) * num_patches
    tl.store(keep_ptr + b.to(tl.int64) * num_keep + idx, perm, mask=idx < num_keep)
    tl.store(restore_ptr + row + perm, idx, mask=valid)
    tl.store(mask_ptr + row + perm, (idx >= num_keep).to(tl.int8), mask=valid)


@_library.triton_kernel("mae_mask")
def mae_mask_triton(seed, batch: int, num_patches: int, num_keep: int):
    """The CUDA kernel (CPU tensors under ``TRITON_INTERPRET=1``)."""
    if not (batch >= 1 and 1 <= num_patches and 0 <= num_keep <= num_patches):
        raise ValueError(f"mae_mask: need batch >= 1, num_patches >= 1, 0 <= num_keep <= "
                         f"num_patches; got {batch}, {num_patches}, {num_keep}")
    device = seed.device
    mask = torch.empty((batch, num_patches), dtype=torch.int8, device=device)
    ids_keep = torch.empty((batch, num_keep), dtype=torch.int64, device=device)
    ids_restore = torch.empty((batch, num_patches), dtype=torch.int64, device=device)
    block = max(16, triton.next_power_of_2(num_patches))
    mae_mask_kernel[(batch,)](seed.to(torch.int64).contiguous(), mask, ids_keep, ids_restore,
                              num_patches, num_keep, BLOCK_L=block,
                              num_warps=4 if block <= 1024 else 8)
    return mask.view(torch.bool), ids_keep, ids_restore


# For `fastssl gpu-report`: MAE's ViT-B/16 at 224^2 has 196 patches -> BLOCK_L = 256.
AOT_KERNELS = [
    {"name": "mae_mask_kernel[L<=256]", "fn": mae_mask_kernel,
     "signature": {"seed_ptr": "*i64", "mask_ptr": "*i8", "keep_ptr": "*i64",
                   "restore_ptr": "*i64", "num_patches": "i32", "num_keep": "i32",
                   "BLOCK_L": "constexpr"},
     "constexprs": {"BLOCK_L": 256}, "num_warps": 4, "tensor_cores": False},
]
