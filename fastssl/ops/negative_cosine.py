r"""``negative_cosine``: the BYOL / SimSiam regression loss, 2 - 2 cos(p, z) per row, with a
stop-gradient on the target z.

.. math:: \ell_i = 2 - 2\,\frac{p_i \cdot z_i}{\max(\lVert p_i\rVert, \epsilon)\,
          \max(\lVert z_i\rVert, \epsilon)} = \lVert \hat p_i - \hat z_i \rVert^2
          \quad(\epsilon = 10^{-12}, \text{ F.normalize's})

Ops (CPU kernel ``csrc/cpu/negative_cosine.cpp``, CUDA kernel below):

* ``negative_cosine_fwd(p, z) -> loss`` (N,) fp32
* ``negative_cosine_bwd(grad, p, z) -> dp`` in p's dtype

Saved-tensor contract (both devices): p and z themselves, nothing else: the backward
recomputes the three row sums (p.z, |p|^2, |z|^2), an O(N D) pass that costs what reading a
saved statistic would not save (the backward has to read p and z to form dp anyway). z gets
no gradient: that is the stop-gradient of BYOL and SimSiam, inside the op.

Gradient (p_hat = p / |p|, unclamped rows):
dp_i = -2 g_i (z_i / (m_p m_z) - cos_i p_i / |p_i|^2), m = max(|.|, eps); where |p_i| <= eps
the normalisation is a constant 1 / eps and dp_i = -2 g_i z_i / (eps m_z).

Overflow: the squared norm of a raw fp32 row overflows at |x| ~ 1.8e19. The C++ kernel sums in
double (exact products of fp32 values, no overflow below fp32's max); the Triton kernel scales
each row by the exact power of two 2^-e that brings its max-abs into [1, 2) before the fp32
sums (a pass for the max-abs, one for the sums): cos is scale-free and the norms are
recovered as 2^e |x 2^-e|. A row holding inf or NaN gives a NaN loss and NaN gradient.

Memory-bound: forward reads N D elements of each input (the Triton kernel twice: the max-abs
pass, then the sums, the second from L2 for BLOCK_N x D tiles that fit), writes N floats;
backward reads them again and writes N D.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _aot, _library
from ._triton_utils import TL_DTYPE, next_pow2, round_cast

EPS = 1e-12  # F.normalize's

_library.define("negative_cosine_fwd", "(Tensor p, Tensor z) -> Tensor")
_library.define("negative_cosine_bwd", "(Tensor grad, Tensor p, Tensor z) -> Tensor")


@torch.library.register_fake("fastssl::negative_cosine_fwd")
def _fwd_fake(p, z):
    return p.new_empty((p.shape[0],), dtype=torch.float32)


@torch.library.register_fake("fastssl::negative_cosine_bwd")
def _bwd_fake(grad, p, z):
    return torch.empty_like(p)


def _setup_context(ctx, inputs, output):
    p, z = inputs
    ctx.save_for_backward(p, z)


def _backward(ctx, grad_loss):
    p, z = ctx.saved_tensors
    dp = torch.ops.fastssl.negative_cosine_bwd(grad_loss, p, z) \
        if ctx.needs_input_grad[0] else None
    return dp, None  # stop-gradient on z


torch.library.register_autograd("fastssl::negative_cosine_fwd", _backward,
                                setup_context=_setup_context)
_library.no_double_backward("negative_cosine_bwd", "negative_cosine")


# ---------------------------------------------------------------------------------------
# CUDA kernels (Triton)
# ---------------------------------------------------------------------------------------


@triton.jit
def _pow2_inverse_scale(amax):
    """2^-e with amax 2^-e in [1, 2), exact: 2^127 for zero / subnormal rows (whose max-abs
    then lands in [0, 2)), 2^-126 at most the other way (the smallest normal power)."""
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return (tl.minimum(tl.maximum(254 - e, 1), 254) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_row_sums(p_ptr, z_ptr, rows, rmask, D, stride_p, stride_z,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(p.z, |p|^2, |z|^2 of the rows scaled by sp, sz; sp; sz), fp32. Two passes over D."""
    cols = tl.arange(0, BLOCK_D)
    p_row = p_ptr + rows.to(tl.int64)[:, None] * stride_p
    z_row = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    # 1. Row max-abs (read N x D of each input).
    amax_p = tl.zeros([BLOCK_N], dtype=tl.float32)
    amax_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m = rmask[:, None] & ((d0 + cols) < D)[None, :]
        p = tl.load(p_row + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
        z = tl.load(z_row + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
        amax_p = tl.maximum(amax_p, tl.max(tl.abs(p), axis=1))
        amax_z = tl.maximum(amax_z, tl.max(tl.abs(z), axis=1))
    sp = _pow2_inverse_scale(amax_p)
    sz = _pow2_inverse_scale(amax_z)
    # 2. Sums of the scaled rows: |x 2^-e| <= 2 per element, no overflow in fp32.
    pz = tl.zeros([BLOCK_N], dtype=tl.float32)
    pp = tl.zeros([BLOCK_N], dtype=tl.float32)
    zz = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m = rmask[:, None] & ((d0 + cols) < D)[None, :]
        p = tl.load(p_row + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32) * sp[:, None]
        z = tl.load(z_row + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32) * sz[:, None]
        pz += tl.sum(p * z, axis=1)
        pp += tl.sum(p * p, axis=1)
        zz += tl.sum(z * z, axis=1)
    return pz, pp, zz, sp, sz


@triton.jit
def negcos_fwd_kernel(p_ptr, z_ptr, loss_ptr, N, D, stride_p, stride_z,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    pz, pp, zz, sp, sz = _scaled_row_sums(p_ptr, z_ptr, rows, rmask, D, stride_p, stride_z,
                                          BLOCK_N, BLOCK_D)
    # max(|x|, eps) in the scaled units: max(|x 2^-e|, eps 2^-e).
    mp = tl.maximum(tl.sqrt_rn(pp), 1e-12 * sp)
    mz = tl.maximum(tl.sqrt_rn(zz), 1e-12 * sz)
    cos = tl.div_rn(tl.div_rn(pz, mp), mz)
    tl.store(loss_ptr + rows, 2.0 - 2.0 * cos, mask=rmask)


@triton.jit
def negcos_bwd_kernel(g_ptr, p_ptr, z_ptr, dp_ptr, N, D, stride_p, stride_z, stride_dp,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, OUT_DTYPE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    pz, pp, zz, sp, sz = _scaled_row_sums(p_ptr, z_ptr, rows, rmask, D, stride_p, stride_z,
                                          BLOCK_N, BLOCK_D)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    norm_p = tl.sqrt_rn(pp)
    mp = tl.maximum(norm_p, 1e-12 * sp)
    mz = tl.maximum(tl.sqrt_rn(zz), 1e-12 * sz)
    cos = tl.div_rn(tl.div_rn(pz, mp), mz)
    # dp = -2 g (sp / mp) (zs / mz - [unclamped] cos ps / |ps|), in the scaled units
    # (ps = p sp, zs = z sz): sp / mp <= 1 / eps, so no coefficient overflows.
    scale = -2.0 * g * tl.div_rn(sp, mp)
    coef_z = tl.div_rn(scale, mz) * sz
    unclamped = norm_p >= 1e-12 * sp
    coef_p = tl.where(unclamped, -tl.div_rn(scale * cos, tl.where(unclamped, norm_p, 1.0)),
                      0.0) * sp
    # A NaN norm fails both comparisons (max, >=), which would leave part of the row finite:
    # a non-finite row (cos NaN) gets an all-NaN gradient, as the reference does.
    coef_z = tl.where(cos == cos, coef_z, float("nan"))
    cols = tl.arange(0, BLOCK_D)
    p_row = p_ptr + rows.to(tl.int64)[:, None] * stride_p
    z_row = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    dp_row = dp_ptr + rows.to(tl.int64)[:, None] * stride_dp
    # 3. Write dp (read N x D of each input once more, write N x D).
    for d0 in range(0, D, BLOCK_D):
        m = rmask[:, None] & ((d0 + cols) < D)[None, :]
        p = tl.load(p_row + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
        z = tl.load(z_row + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dp = coef_z[:, None] * z + coef_p[:, None] * p
        tl.store(dp_row + d0 + cols[None, :], round_cast(dp, OUT_DTYPE), mask=m)


def _tiles(d: int):
    """(BLOCK_N, BLOCK_D): D in chunks of up to 512 (register tiles of 2,048 fp32 per input,
    16 per thread at 4 warps), as many rows as fill the tile."""
    block_d = min(next_pow2(d), 512)
    return max(1, 2048 // block_d), block_d


@_library.triton_kernel("negative_cosine_fwd")
def negative_cosine_fwd_triton(p, z):
    p, z = p.contiguous(), z.contiguous()
    n, d = p.shape
    loss = torch.empty(n, dtype=torch.float32, device=p.device)
    block_n, block_d = _tiles(d)
    negcos_fwd_kernel[(triton.cdiv(n, block_n),)](p, z, loss, n, d, p.stride(0), z.stride(0),
                                                  BLOCK_N=block_n, BLOCK_D=block_d)
    return loss


@_library.triton_kernel("negative_cosine_bwd")
def negative_cosine_bwd_triton(grad, p, z):
    p, z = p.contiguous(), z.contiguous()
    g = grad.to(torch.float32).contiguous()
    n, d = p.shape
    dp = torch.empty_like(p)
    block_n, block_d = _tiles(d)
    negcos_bwd_kernel[(triton.cdiv(n, block_n),)](g, p, z, dp, n, d, p.stride(0), z.stride(0),
                                                  dp.stride(0), BLOCK_N=block_n,
                                                  BLOCK_D=block_d, OUT_DTYPE=TL_DTYPE[p.dtype])
    return dp


def _aot_entries():
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for d in (256, 2048):  # BYOL's / SimSiam's projector widths
            block_n, block_d = _tiles(d)
            out.append(_aot.aot_entry(
                negcos_fwd_kernel, op="negative_cosine", dtype=dtype, D=d,
                pointers={"p_ptr": dtype, "z_ptr": dtype, "loss_ptr": torch.float32},
                constexprs={"BLOCK_N": block_n, "BLOCK_D": block_d}, tensor_cores=False))
            out.append(_aot.aot_entry(
                negcos_bwd_kernel, op="negative_cosine", dtype=dtype, D=d,
                pointers={"g_ptr": torch.float32, "p_ptr": dtype, "z_ptr": dtype,
                          "dp_ptr": dtype},
                constexprs={"BLOCK_N": block_n, "BLOCK_D": block_d,
                            "OUT_DTYPE": TL_DTYPE[dtype]}, tensor_cores=False))
    return out


# Every kernel configuration the launchers use, for `fastssl gpu-report`.
AOT_KERNELS = _aot_entries()


def negative_cosine_rows(p, z):
    """Per-row losses (N,) fp32 (gradient to p only)."""
    return torch.ops.fastssl.negative_cosine_fwd(p, z)
