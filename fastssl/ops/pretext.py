"""The pretext tasks' random draws (CPU kernels ``csrc/cpu/pretext.cpp``, CUDA kernels below):

* ``mae_mask``: MAE / SimMIM random patch masking. Spec: :func:`fastssl.reference.mae_mask`.
* ``pretext_noise``: the denoising task's corruption (additive Gaussian or masking noise with a
  per-sample level). Spec: :func:`fastssl.reference.pretext_noise`.

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

from . import _aot, _library
from ._triton_utils import TL_DTYPE, round_cast

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
def _sample_key(seed_ptr, b):
    # fastssl.reference.mae_row_keys: fmix32(b * 0x9E3779B9 + seed[1]) ^ seed[0] (mod 2^32).
    seed_lo = tl.load(seed_ptr) & 0xFFFFFFFF
    seed_hi = tl.load(seed_ptr + 1) & 0xFFFFFFFF
    return _fmix32((_mul32(b, 0x9E3779B9) + seed_hi) & 0xFFFFFFFF) ^ seed_lo


@triton.jit
def _counter_hash(key, counter):
    # fastssl.reference.counter_hash: fmix32((key + counter * 0x85EBCA6B) mod 2^32).
    return _fmix32((key + _mul32(counter, 0x85EBCA6B)) & 0xFFFFFFFF)


@triton.jit
def mae_mask_kernel(seed_ptr, mask_ptr, keep_ptr, restore_ptr, num_patches, num_keep,
                    BLOCK_L: tl.constexpr):
    b = tl.program_id(0)
    idx = tl.arange(0, BLOCK_L).to(tl.int64)
    key = _sample_key(seed_ptr, b.to(tl.int64) + tl.zeros([BLOCK_L], dtype=tl.int64))
    perm = idx
    for t in range(0, num_patches - 1):
        i = num_patches - 1 - t
        u = _counter_hash(key, i.to(tl.int64))
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


# ---------------------------------------------------------------------------------------
# pretext_noise
# ---------------------------------------------------------------------------------------
#
# ``pretext_noise(clean [B, C, H, W], amount [B, C] or [B, 1] fp32, seed [2] int64, masking,
# fill) -> noisy`` (clean's dtype). Every value is a pure function of (seed, sample, counter)
# through the same hash as mae_mask, and the Gaussian's ln / sin / cos are the reference's
# float32 polynomials: the interpreter equals the reference and the C++ kernel bit for bit;
# on a GPU (launched with enable_fp_fusion=False, IEEE division and sqrt) likewise up to
# the hardware's own fp32 arithmetic.

_library.define("pretext_noise", "(Tensor clean, Tensor amount, Tensor seed, bool masking, "
                "float fill) -> Tensor")


@torch.library.register_fake("fastssl::pretext_noise")
def _pretext_noise_fake(clean, amount, seed, masking, fill):
    return torch.empty_like(clean)


NOISE_BLOCK = 1024  # pairs (Gaussian) or pixels (masking) per program


@triton.jit
def pretext_gauss_kernel(x_ptr, amount_ptr, seed_ptr, out_ptr, n, half, plane, C,
                         OUT: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, blk): Box-Muller pairs j in [blk BLOCK, (blk + 1) BLOCK) of sample b; z0 to
    position j, z1 to j + half (fastssl.reference.box_muller_pairs)."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    key = _sample_key(seed_ptr, b + tl.zeros([BLOCK], dtype=tl.int64))
    h1 = _counter_hash(key, 2 * j)
    h2 = _counter_hash(key, 2 * j + 1)
    u1 = ((h1 >> 8) + 1).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    bits = u1.to(tl.int32, bitcast=True)
    e0 = ((bits >> 23) & 0xFF) - 127
    m0 = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m0 > 1.4142135381698608
    m = tl.where(big, m0 * 0.5, m0)
    e = (e0 + big.to(tl.int32)).to(tl.float32)
    s = tl.div_rn(m - 1.0, m + 1.0)
    s2 = s * s
    p = s2 * 0.09090909361839294 + 0.1111111119389534
    p = p * s2 + 0.1428571492433548
    p = p * s2 + 0.20000000298023224
    p = p * s2 + 0.3333333432674408
    p = p * s2
    ln_m = (s + s * p) * 2.0
    ln_u = e * 0.693359375 + (ln_m + e * -0.00021219444170128554)
    r = tl.sqrt_rn(ln_u * -2.0)
    t = (((h2 >> 8) & 0x3FFFFF).to(tl.int32).to(tl.float32) + 0.5) * 2.384185791015625e-07
    psi = t * 1.5707963705062866
    q = psi * psi
    ps = q * 1.6059044372074283e-10 + -2.5052107943679403e-08
    ps = ps * q + 2.7557318844628753e-06
    ps = ps * q + -0.00019841270113829523
    ps = ps * q + 0.008333333767950535
    ps = ps * q + -0.1666666716337204
    ps = ps * q
    sin_psi = psi + psi * ps
    pc = q * -1.147074536050896e-11 + 2.0876755879584152e-09
    pc = pc * q + -2.755731998149713e-07
    pc = pc * q + 2.4801587642286904e-05
    pc = pc * q + -0.0013888889225199819
    pc = pc * q + 0.0416666679084301
    pc = pc * q + -0.5
    pc = pc * q
    cos_psi = pc + 1.0
    z0 = r * cos_psi
    z1 = r * sin_psi
    z0 = tl.where(((h2 >> 31) & 1) == 1, -z0, z0)
    z1 = tl.where(((h2 >> 30) & 1) == 1, -z1, z1)
    base = b * n
    ok0 = j < half
    a0 = tl.load(amount_ptr + b * C + j // plane, mask=ok0, other=0.0)
    x0 = tl.load(x_ptr + base + j, mask=ok0, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + j, round_cast(x0 + a0 * z0, OUT), mask=ok0)
    i1 = j + half
    ok1 = ok0 & (i1 < n)
    a1 = tl.load(amount_ptr + b * C + i1 // plane, mask=ok1, other=0.0)
    x1 = tl.load(x_ptr + base + i1, mask=ok1, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + i1, round_cast(x1 + a1 * z1, OUT), mask=ok1)


@triton.jit
def pretext_drop_kernel(x_ptr, amount_ptr, seed_ptr, out_ptr, fill, plane, C,
                        OUT: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, blk): pixels [blk BLOCK, (blk + 1) BLOCK) of sample b, dropped (set to
    ``fill`` in every channel) where their 24-bit uniform is below ``amount[b]``."""
    b = tl.program_id(0).to(tl.int64)
    pix = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = pix < plane
    key = _sample_key(seed_ptr, b + tl.zeros([BLOCK], dtype=tl.int64))
    h = _counter_hash(key, pix)
    u = (h >> 8).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08
    drop = u < tl.load(amount_ptr + b)
    fill_v = round_cast(fill + tl.zeros([BLOCK], dtype=tl.float32), OUT)
    base = b * C * plane
    for c in range(0, C):
        x = tl.load(x_ptr + base + c * plane + pix, mask=ok)
        tl.store(out_ptr + base + c * plane + pix, tl.where(drop, fill_v, x), mask=ok)


@_library.triton_kernel("pretext_noise")
def pretext_noise_triton(clean, amount, seed, masking: bool, fill: float):
    """The CUDA kernels (CPU tensors under ``TRITON_INTERPRET=1``)."""
    if clean.dim() != 4 or clean.dtype not in TL_DTYPE:
        raise ValueError(f"pretext_noise: clean must be a float32 / bfloat16 / float16 "
                         f"[B, C, H, W] tensor, got {clean.dtype} {tuple(clean.shape)}")
    B, C, H, W = clean.shape
    if amount.dtype != torch.float32 or tuple(amount.shape) != (B, 1 if masking else C):
        raise ValueError(f"pretext_noise: amount must be float32 [B, {1 if masking else 'C'}],"
                         f" got {amount.dtype} {tuple(amount.shape)}")
    x = clean.contiguous()
    out = torch.empty_like(x)
    plane, n = H * W, C * H * W
    if x.numel() == 0:
        return out
    amt = amount.contiguous()
    seed = seed.to(torch.int64).contiguous()
    opts = dict(OUT=TL_DTYPE[x.dtype], BLOCK=NOISE_BLOCK, num_warps=4, enable_fp_fusion=False)
    if masking:
        grid = (B, triton.cdiv(plane, NOISE_BLOCK))
        pretext_drop_kernel[grid](x, amt, seed, out, float(torch.tensor(fill).float()), plane,
                                  C, **opts)
    else:
        half = (n + 1) // 2
        grid = (B, triton.cdiv(half, NOISE_BLOCK))
        pretext_gauss_kernel[grid](x, amt, seed, out, n, half, plane, C, **opts)
    return out


# For `fastssl gpu-report`: MAE's ViT-B/16 at 224^2 has 196 patches -> BLOCK_L = 256; the
# noise kernels are elementwise (one configuration per dtype a view can have).
AOT_KERNELS = [
    {"name": "mae_mask_kernel[L<=256]", "fn": mae_mask_kernel,
     "signature": {"seed_ptr": "*i64", "mask_ptr": "*i8", "keep_ptr": "*i64",
                   "restore_ptr": "*i64", "num_patches": "i32", "num_keep": "i32",
                   "BLOCK_L": "constexpr"},
     "constexprs": {"BLOCK_L": 256}, "num_warps": 4, "tensor_cores": False},
] + [
    _aot.aot_entry(pretext_gauss_kernel, op="pretext_noise", dtype=dt, D=None,
                   name=f"pretext_noise:gauss[{_aot.sig_type(dt)}]",
                   pointers={"x_ptr": dt, "amount_ptr": torch.float32, "seed_ptr": torch.int64,
                             "out_ptr": dt},
                   constexprs={"OUT": TL_DTYPE[dt], "BLOCK": NOISE_BLOCK}, tensor_cores=False)
    for dt in (torch.float32, torch.bfloat16, torch.float16)
] + [
    _aot.aot_entry(pretext_drop_kernel, op="pretext_noise", dtype=dt, D=None,
                   name=f"pretext_noise:drop[{_aot.sig_type(dt)}]",
                   pointers={"x_ptr": dt, "amount_ptr": torch.float32, "seed_ptr": torch.int64,
                             "out_ptr": dt},
                   floats=("fill",), constexprs={"OUT": TL_DTYPE[dt], "BLOCK": NOISE_BLOCK},
                   tensor_cores=False)
    for dt in (torch.float32, torch.bfloat16, torch.float16)
]
