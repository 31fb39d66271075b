"""Fused NT-Xent (SimCLR) loss on the GPU in Triton: kernels + launchers + autograd.Function.

Same semantics as :func:`fastssl.reference.nt_xent` and ``csrc/cpu/ntxent.cpp``. Notation
(DESIGN.md): M = 2N rows, Z = [z1; z2] (M x D), Zhat = normalize(Z) (L2, eps 1e-12 on the norm,
in fp32), S = Zhat Zhat^T / tau, diagonal masked, row i's target t(i) = (i + N) mod M (with
``decoupled`` also masked out of the log-sum-exp), loss_i = LSE_j S_ij - S_i,t(i).
One "matmul-equivalent" (eq) = 2 M^2 D FLOPs, the cost of S once.

Design: full row blocks, flash-attention style, backward recomputes S
------------------------------------------------------------------------
* Prologue (O(M D)): one pass writes Zhat in the input dtype (the tensor-core operand) and the
  fp32 inverse norms r (M); a non-finite row gets r = NaN, which poisons every row's LSE
  (every row reads every column), so non-finite input -> NaN loss and gradients.
* Forward: program (row block I, column split s) streams the column tiles of split s:
  S_IJ = tl.dot(Zhat_I, Zhat_J^T) * (log2(e) / tau) -- the log2(e) folded into the scale so the
  online (max, sum) uses exp2 -- and keeps the running row (max, sum) in fp32 registers.
  The 2N x 2N matrix is never written. Cost: 1 eq, M^2 exp2, reads Zhat once per row block.
  A combine kernel merges the splits' (max, sum) in split order (deterministic) and writes
  lse (M fp32, saved) and loss rows (M, input dtype).
* Backward: dZhat = (G + G^T) Zhat / tau with G_ij = g_i softmax_i(j) - g_i [j = t(i)].
  Program (I, s) recomputes S_IJ (1 eq) and forms, in fp32,
      K_IJ = g_i exp2(S2_ij - lse2_i) + g_j exp2(S2_ij - lse2_j)      (S symmetric: 2 exp2)
  then the -(g_i + g_t(i)) of the target is folded in fp32 *before* K is cast to the input
  dtype for ``dZhat_I += tl.dot(K, Zhat_J)`` (1 eq) -- the positive's p ~ 1 - eps would
  otherwise cancel after rounding. Cost: 2 eq, 2 M^2 exp2. An epilogue kernel (O(M D)) sums
  the splits' partials in split order, scales by 1/tau, applies the normalisation gradient
  dZ = r (dZhat - zhat (zhat . dZhat)) (dZhat * r where the norm was clamped), writes dz1/dz2
  and zhat_a . dZhat_a per row, from which dL/dtau = -(1/(2 tau)) sum_a zhat_a . dZhat_a.
* Masks cost only where they apply: the self-mask runs only in tiles that cross the diagonal,
  the target fold / positive extraction / decoupled mask only in tiles that hold a target
  column, the ragged-column mask only in the last tile (scalar branches around tile work).

Counts, fwd + bwd (M = 65,536, D = 128, bf16: see ``fastssl gpu-report``):
    this design : 3 eq = 6 M^2 D FLOPs (3.30e12), 3 M^2 exp2 (1.29e10), HBM ~ (6 b + 8) M D +
                  O(M) bytes (~0.17 GB; b = bytes/element; column tiles are re-read from L2,
                  M/BLOCK_M times per pass)
    eager ref.  : 3 eq, 2 M^2 exp, and ~15 passes over M^2 logits (0.13 TB in bf16)
Why not the symmetric upper-triangle schedule (2 eq, 2 M^2 exp, what the C++ kernel does)?
A tile (I, J) then updates the column statistics and dZ of block J, owned by another program:
on a GPU that needs floating-point atomics (order-dependent results) or per-tile partial
buffers of O(M^2 D / BLOCK) bytes (GBs at M = 131,072). It saves 1/3 of the tensor-core FLOPs
and exps but loses determinism or O(M D) memory; full rows keep both. Why not gradients in the
forward (Liger-style)? Row j's softmax needs lse_j, known only after a full pass: it would
still be 1 + 2 eq, only moved into the forward, and would tie the gradient to a uniform g
(no ``reduction="none"`` with an arbitrary grad_output).

Grid: (cdiv(M, BLOCK_M), splits). When the row blocks alone are fewer than the SMs, the
column tiles are split across ``splits`` programs (partials: (splits, M) stats forward,
(splits, M, D) fp32 backward, bounded by ~num_sms * BLOCK_M * D * 4 bytes); reductions of
partials run in a fixed order. No atomics anywhere: results are bitwise reproducible for a
given shape and GPU. On an H100 (132 SMs), bf16: 2N = 512 -> 8 x 16 = 128 programs (64 x 32
tiles, forward and backward); 2N = 131,072 -> 1024 x 1 programs (128-row blocks).

Precision: fp32 accumulation everywhere; the dot operands are Zhat in the input dtype (bf16 /
fp16 / fp32). fp32 inputs use ``tl.dot(input_precision=...)`` from ``FASTSSL_FP32_DOT``
(default ``"bf16x3"``: tensor cores, ~1e-5 relative, 3x the products; ``"tf32"`` faster and
~1e-3; ``"tf32x3"`` ~1e-6 but spills; ``"ieee"`` no tensor cores), see
:mod:`fastssl.ops._triton_utils`; fp32's FLOP counts below are 3x. fp16 backward: g is
pre-scaled by a power of two (2^14 / max|g|) so that K (~ g / M per entry) stays in fp16's
normal range; the epilogue undoes it exactly.

Limits: D <= 256 (one register/shared-memory block of columns per row; larger D raises).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _library
from ._triton_utils import (INTERPRET, TL_TYPE, dot_in_fp32, dot_precision, next_pow2,
                            num_sms)

# Globals read inside kernels must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NORM_EPS = tl.constexpr(1e-12)  # F.normalize's eps, on the fp32 norm
MAX_D = 256
# fp16 backward: g is scaled so that max |g| * scale = 2^14, keeping K = g p well inside fp16's
# normal range (|K| <= 2 max|g|, so <= 2^15 < 65504 after scaling).
FP16_G_TARGET = 2.0 ** 14


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _load_pair_rows(z1_ptr, z2_ptr, rows, cols, N, D, s1r, s1c, s2r, s2c):
    """Rows of Z = [z1; z2] as fp32 (0 outside [0, 2N) x [0, D))."""
    first = rows < N
    inb = (rows < 2 * N)[:, None] & (cols < D)[None, :]
    r1 = tl.where(first, rows, 0)
    r2 = tl.where(first, 0, rows - N)
    x1 = tl.load(z1_ptr + r1[:, None] * s1r + cols[None, :] * s1c, mask=inb & first[:, None],
                 other=0.0)
    x2 = tl.load(z2_ptr + r2[:, None] * s2r + cols[None, :] * s2c, mask=inb & ~first[:, None],
                 other=0.0)
    return x1.to(tl.float32) + x2.to(tl.float32)


@triton.jit
def ntxent_prologue_kernel(z1_ptr, z2_ptr, zhat_ptr, rinv_ptr, N, D, s1r, s1c, s2r, s2c,
                           NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    # read M D (input dtype); write M D (input dtype) + M fp32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    x = _load_pair_rows(z1_ptr, z2_ptr, rows, cols, N, D, s1r, s1c, s2r, s2c)
    # 0 for a finite row, NaN if any element is inf/NaN (inf - inf = NaN).
    poison = tl.sum(x - x, axis=1)
    if NORMALIZE:
        norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
        r = tl.div_rn(tl.full(norm.shape, 1.0, tl.float32), tl.maximum(norm, NORM_EPS))
    else:
        r = tl.full([BLOCK_R], 1.0, tl.float32)
    r = r + poison
    inb = rows < 2 * N
    tl.store(rinv_ptr + rows, r, mask=inb)
    zh = x * r[:, None]
    tl.store(zhat_ptr + rows[:, None] * D + cols[None, :], zh.to(zhat_ptr.dtype.element_ty),
             mask=inb[:, None] & (cols < D)[None, :])


@triton.jit
def _target_range(i0, N, BLOCK_M: tl.constexpr):
    """Columns t(i) = (i + N) mod 2N of rows [i0, i0 + BLOCK_M) as two ranges [lo, hi)."""
    row_hi = tl.minimum(i0 + BLOCK_M, 2 * N)
    lo1 = i0 + N
    hi1 = tl.minimum(row_hi, N) + N
    lo2 = tl.maximum(i0, N) - N
    hi2 = row_hi - N
    return lo1, hi1, lo2, hi2


@triton.jit
def _overlaps(j0, lo, hi, BLOCK_N: tl.constexpr):
    return (lo < hi) & (j0 < hi) & (lo < j0 + BLOCK_N)


@triton.jit
def ntxent_fwd_kernel(zhat_ptr, temp_ptr, mpart_ptr, lpart_ptr, ppart_ptr, N, D,
                      TILES_PER_SPLIT, DECOUPLED: tl.constexpr, DOT_FP32: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # reads BLOCK_M D + (columns of the split) D; writes 3 BLOCK_M fp32 partials.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    M = 2 * N
    i0 = pid_m * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < D
    q = tl.load(zhat_ptr + rows[:, None] * D + dcol[None, :],
                mask=(rows < M)[:, None] & dmask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    # 1. [Scale] log2(e) / tau, so that exp(S - m) = exp2(S2 - m2).
    scale = LOG2E / tl.load(temp_ptr).to(tl.float32)
    tgt = tl.where(rows < N, rows + N, rows - N)
    lo1, hi1, lo2, hi2 = _target_range(i0, N, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    j_begin = pid_s * TILES_PER_SPLIT * BLOCK_N
    j_end = tl.minimum(j_begin + TILES_PER_SPLIT * BLOCK_N, M)
    for j0 in range(j_begin, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = tl.load(zhat_ptr + cols[:, None] * D + dcol[None, :],
                    mask=(cols < M)[:, None] & dmask[None, :], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        # 2. [Similarity] 2 BLOCK_M BLOCK_N D FLOPs on the tensor cores, fp32 accumulation.
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale
        # 3. [Masks] only the tiles they touch pay for them.
        if j0 + BLOCK_N > M:  # ragged last tile
            s = tl.where((cols < M)[None, :], s, float("-inf"))
        if (j0 < i0 + BLOCK_M) & (i0 < j0 + BLOCK_N):  # crosses the diagonal
            s = tl.where(rows[:, None] == cols[None, :], float("-inf"), s)
        if _overlaps(j0, lo1, hi1, BLOCK_N) | _overlaps(j0, lo2, hi2, BLOCK_N):
            is_t = tgt[:, None] == cols[None, :]
            pos += tl.sum(tl.where(is_t, s, 0.0), axis=1)
            if DECOUPLED:
                s = tl.where(is_t, float("-inf"), s)
        # 4. [Online softmax] running max and sum, exp2; a row with no column yet keeps -inf.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - shift) + tl.sum(tl.exp2(s - shift[:, None]), axis=1)
        m_i = m_new
    out = pid_s * M + rows
    inb = rows < M
    tl.store(mpart_ptr + out, m_i, mask=inb)
    tl.store(lpart_ptr + out, l_i, mask=inb)
    tl.store(ppart_ptr + out, pos, mask=inb)


@triton.jit
def ntxent_fwd_combine_kernel(mpart_ptr, lpart_ptr, ppart_ptr, lse_ptr, loss_ptr, M, SPLITS,
                              BLOCK: tl.constexpr):
    # reads 3 SPLITS M fp32; writes M fp32 + M (input dtype). Split order fixed: deterministic.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = rows < M
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for s in range(SPLITS):
        m = tl.maximum(m, tl.load(mpart_ptr + s * M + rows, mask=inb, other=float("-inf")))
    shift = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK], tl.float32)
    pos = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLITS):
        ms = tl.load(mpart_ptr + s * M + rows, mask=inb, other=float("-inf"))
        total += tl.load(lpart_ptr + s * M + rows, mask=inb, other=0.0) * tl.exp2(ms - shift)
        pos += tl.load(ppart_ptr + s * M + rows, mask=inb, other=0.0)
    lse2 = shift + tl.log2(tl.where(inb, total, 1.0))  # padding rows: no log2(0)
    tl.store(lse_ptr + rows, lse2, mask=inb)
    tl.store(loss_ptr + rows, ((lse2 - pos) * LN2).to(loss_ptr.dtype.element_ty), mask=inb)


@triton.jit
def ntxent_bwd_kernel(zhat_ptr, temp_ptr, lse_ptr, g_ptr, dpart_ptr, N, D, TILES_PER_SPLIT,
                      DECOUPLED: tl.constexpr, DOT_FP32: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # reads BLOCK_M (D + 2) + (columns of the split) (D + 2); writes BLOCK_M D fp32 partials.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    M = 2 * N
    i0 = pid_m * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    rmask = rows < M
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < D
    q = tl.load(zhat_ptr + rows[:, None] * D + dcol[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    scale = LOG2E / tl.load(temp_ptr).to(tl.float32)
    lse_i = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g_i = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    tgt = tl.where(rows < N, rows + N, rows - N)
    lo1, hi1, lo2, hi2 = _target_range(i0, N, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    j_begin = pid_s * TILES_PER_SPLIT * BLOCK_N
    j_end = tl.minimum(j_begin + TILES_PER_SPLIT * BLOCK_N, M)
    for j0 in range(j_begin, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < M
        k = tl.load(zhat_ptr + cols[:, None] * D + dcol[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        lse_j = tl.load(lse_ptr + cols, mask=cmask, other=0.0)
        g_j = tl.load(g_ptr + cols, mask=cmask, other=0.0)
        if DOT_FP32:
            kf = k.to(tl.float32)
        else:
            kf = k
        # 1. [Recompute] S2_IJ in log2 units (1 eq over the whole backward).
        s = tl.dot(q, tl.trans(kf), input_precision=INPUT_PRECISION) * scale
        # 2. [G + G^T] both softmaxes of the symmetric S: row i's and row j's (2 exp2).
        p = g_i[:, None] * tl.exp2(s - lse_i[:, None]) + g_j[None, :] * tl.exp2(s - lse_j[None, :])
        if j0 + BLOCK_N > M:
            p = tl.where(cmask[None, :], p, 0.0)
        if (j0 < i0 + BLOCK_M) & (i0 < j0 + BLOCK_N):
            p = tl.where(rows[:, None] == cols[None, :], 0.0, p)
        if _overlaps(j0, lo1, hi1, BLOCK_N) | _overlaps(j0, lo2, hi2, BLOCK_N):
            # 3. [Target] -(g_i + g_t(i)) folded in fp32, before the down-cast below.
            is_t = tgt[:, None] == cols[None, :]
            if DECOUPLED:
                p = tl.where(is_t, 0.0, p)
            p = tl.where(is_t, p - (g_i[:, None] + g_j[None, :]), p)
        # 4. [dZhat_I += K Zhat_J] 2 BLOCK_M BLOCK_N D FLOPs on the tensor cores.
        pk = p.to(k.dtype)
        if DOT_FP32:
            pk = pk.to(tl.float32)
        acc = tl.dot(pk, kf, acc, input_precision=INPUT_PRECISION)
    out = (pid_s * M + rows)[:, None] * D + dcol[None, :]
    tl.store(dpart_ptr + out, acc, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def ntxent_bwd_epilogue_kernel(dpart_ptr, z1_ptr, z2_ptr, rinv_ptr, temp_ptr, gscale_ptr,
                               dz1_ptr, dz2_ptr, dots_ptr, N, D, SPLITS, s1r, s1c, s2r, s2c,
                               NORMALIZE: tl.constexpr, UNSCALE: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # reads SPLITS M D fp32 + M D (input) + M; writes M D (input dtype) + M fp32.
    M = 2 * N
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    mask = rmask[:, None] & (cols < D)[None, :]
    off = rows[:, None] * D + cols[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(SPLITS):  # fixed order: deterministic
        acc += tl.load(dpart_ptr + s * M * D + off, mask=mask, other=0.0)
    inv_tau = tl.div_rn(1.0, tl.load(temp_ptr).to(tl.float32))
    if UNSCALE:
        inv_tau = inv_tau / tl.load(gscale_ptr)  # power of two: exact
    dzh = acc * inv_tau
    x = _load_pair_rows(z1_ptr, z2_ptr, rows, cols, N, D, s1r, s1c, s2r, s2c)
    r = tl.load(rinv_ptr + rows, mask=rmask, other=1.0)
    zh = x * r[:, None]  # fp32 zhat, not the rounded tensor-core operand
    dot = tl.sum(zh * dzh, axis=1)
    tl.store(dots_ptr + rows, dot, mask=rmask)
    if NORMALIZE:
        # d/dz of z / max(|z|, eps): r (dZhat - zhat (zhat . dZhat)); r dZhat when clamped.
        clamped = tl.sqrt_rn(tl.sum(x * x, axis=1)) < NORM_EPS
        dz = tl.where(clamped[:, None], dzh, dzh - zh * dot[:, None]) * r[:, None]
    else:
        dz = dzh
    first = rows < N
    r1 = tl.where(first, rows, 0)
    r2 = tl.where(first, 0, rows - N)
    tl.store(dz1_ptr + r1[:, None] * D + cols[None, :], dz.to(dz1_ptr.dtype.element_ty),
             mask=mask & first[:, None])
    tl.store(dz2_ptr + r2[:, None] * D + cols[None, :], dz.to(dz2_ptr.dtype.element_ty),
             mask=mask & ~first[:, None])


# ---------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------

# Tile configs, (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass, each checked with
# `fastssl gpu-report` for 0 spills and tensor-core instructions on sm_80 and sm_90 at D = 128:
# * "large" (bf16/fp16): 128-row blocks, 8 warps (two warpgroups on sm_90): each column tile
#   loaded from L2 feeds 128 rows (128 FLOP per L2 byte). The backward's 128 x 64 tile spilled
#   36-44 bytes on sm_80 (255 registers: a 128 x 128 fp32 accumulator + the S/K tile), so its
#   BLOCK_N is 32 (0 spills, 239 registers on sm_90).
# * "small" (bf16/fp16): when even a full column split of the large tiles gives fewer programs
#   than SMs (2N = 512: 4 x 8 = 32 programs large, 8 x 16 = 128 small).
# * "fp32": bf16x3 splits each fp32 operand in two bf16 halves (3 products), so operands take
#   twice the registers and shared memory: 64-row blocks, backward 64 x 16 (0 spills; tf32x3
#   spilled 232-864 bytes at every tile size that fits in shared memory).
# * "wide" (bf16/fp16, 128 < D <= 256): 64-row blocks, 8 warps.
CONFIGS = {
    "large": dict(fwd=(128, 64, 8, 3), bwd=(128, 32, 8, 3)),
    "small": dict(fwd=(64, 32, 4, 3), bwd=(64, 32, 4, 3)),
    "fp32": dict(fwd=(64, 32, 4, 2), bwd=(64, 16, 4, 2)),
    "wide": dict(fwd=(64, 64, 8, 2), bwd=(64, 32, 8, 2)),
    # interpreter (tests): BLOCK_M != BLOCK_N on purpose, and cheap in Python
    "interpret": dict(fwd=(64, 32, 4, 1), bwd=(64, 32, 4, 1)),
}
ROW_BLOCK = 8  # prologue / epilogue rows per program (memory-bound; 0 spills at D = 128)
COMBINE_BLOCK = 256


def config_name(m: int, d: int, dtype: torch.dtype, sms: int, interpret: bool = INTERPRET) -> str:
    if interpret:
        return "interpret"
    if dtype == torch.float32:
        return "fp32"
    if next_pow2(d) > 128:
        return "wide"
    bm, bn = CONFIGS["large"]["fwd"][:2]
    return "large" if triton.cdiv(m, bm) * triton.cdiv(m, bn) >= sms else "small"


def pick_config(m: int, d: int, sms: int, dtype: torch.dtype = torch.bfloat16,
                interpret: bool = INTERPRET) -> dict:
    """Tile sizes and column split of both passes for 2N = ``m`` on a GPU with ``sms`` SMs.

    Returns ``{"name", "BLOCK_D", "fwd": {...}, "bwd": {...}}``; each pass dict holds
    ``BLOCK_M, BLOCK_N, num_warps, num_stages, row_blocks, splits, tiles_per_split``, and its
    grid is ``(row_blocks, splits)``. Columns are split only when the row blocks alone are
    fewer than the SMs; every split is non-empty.
    """
    name = config_name(m, d, dtype, sms, interpret)
    out = dict(name=name, BLOCK_D=max(16, next_pow2(d)))
    for pass_ in ("fwd", "bwd"):
        bm, bn, warps, stages = CONFIGS[name][pass_]
        row_blocks, tiles = triton.cdiv(m, bm), triton.cdiv(m, bn)
        splits = 1 if row_blocks >= sms else min(tiles, triton.cdiv(sms, row_blocks))
        per = triton.cdiv(tiles, splits)
        out[pass_] = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
                          row_blocks=row_blocks, splits=triton.cdiv(tiles, per),
                          tiles_per_split=per)
    return out


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def _check(z1: torch.Tensor) -> None:
    if z1.dtype not in TL_TYPE:
        raise TypeError(f"nt_xent (triton): dtype must be float32, bfloat16 or float16, got "
                        f"{z1.dtype}")
    if z1.shape[1] > MAX_D:
        raise NotImplementedError(
            f"nt_xent (triton): D = {z1.shape[1]} > {MAX_D} is not supported by the fused GPU "
            "kernels (one block of columns per row); use backend='reference'")


def ntxent_forward(z1: torch.Tensor, z2: torch.Tensor, temperature: torch.Tensor,
                   normalize: bool, decoupled: bool):
    """Forward launcher.

    Args:
        z1, z2: (N, D) bf16/fp16/fp32, same device (CUDA, or CPU under the interpreter).
        temperature: 1-element fp32 tensor on the same device.
    Returns:
        loss rows (2N,) in the input dtype, lse2 (2N,) fp32 (log2 units), zhat (2N, D) in the
        input dtype, rinv (2N,) fp32.
    """
    _check(z1)
    n, d = z1.shape
    m = 2 * n
    dev, dtype = z1.device, z1.dtype
    cfg = pick_config(m, d, num_sms(dev), dtype)
    zhat = torch.empty((m, d), device=dev, dtype=dtype)
    rinv = torch.empty((m,), device=dev, dtype=torch.float32)
    ntxent_prologue_kernel[(triton.cdiv(m, ROW_BLOCK),)](
        z1, z2, zhat, rinv, n, d, z1.stride(0), z1.stride(1), z2.stride(0), z2.stride(1),
        NORMALIZE=normalize, BLOCK_R=ROW_BLOCK, BLOCK_D=cfg["BLOCK_D"])
    fc = cfg["fwd"]
    splits = fc["splits"]
    part = torch.empty((3, splits, m), device=dev, dtype=torch.float32)
    ntxent_fwd_kernel[(fc["row_blocks"], splits)](
        zhat, temperature, part[0], part[1], part[2], n, d, fc["tiles_per_split"],
        DECOUPLED=decoupled, DOT_FP32=dot_in_fp32(dtype), INPUT_PRECISION=dot_precision(dtype),
        BLOCK_M=fc["BLOCK_M"], BLOCK_N=fc["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=fc["num_warps"], num_stages=fc["num_stages"])
    lse = torch.empty((m,), device=dev, dtype=torch.float32)
    loss = torch.empty((m,), device=dev, dtype=dtype)
    ntxent_fwd_combine_kernel[(triton.cdiv(m, COMBINE_BLOCK),)](
        part[0], part[1], part[2], lse, loss, m, splits, BLOCK=COMBINE_BLOCK)
    return loss, lse, zhat, rinv


def ntxent_backward(grad_rows: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                    zhat: torch.Tensor, rinv: torch.Tensor, lse: torch.Tensor,
                    temperature: torch.Tensor, normalize: bool, decoupled: bool,
                    need_dtemp: bool):
    """Backward launcher: (dz1, dz2, dtemperature as a 0-dim fp32 tensor or None)."""
    n, d = z1.shape
    m = 2 * n
    dev, dtype = z1.device, z1.dtype
    cfg = pick_config(m, d, num_sms(dev), dtype)
    g = grad_rows.to(torch.float32).contiguous()
    unscale = dtype == torch.float16
    gscale = None
    if unscale:
        gmax = g.abs().amax().clamp_min(1e-30)
        gscale = torch.exp2(torch.floor(torch.log2(FP16_G_TARGET / gmax))).reshape(1)
        g = g * gscale
    bc = cfg["bwd"]
    splits = bc["splits"]
    dpart = torch.empty((splits, m, d), device=dev, dtype=torch.float32)
    ntxent_bwd_kernel[(bc["row_blocks"], splits)](
        zhat, temperature, lse, g, dpart, n, d, bc["tiles_per_split"],
        DECOUPLED=decoupled, DOT_FP32=dot_in_fp32(dtype), INPUT_PRECISION=dot_precision(dtype),
        BLOCK_M=bc["BLOCK_M"], BLOCK_N=bc["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=bc["num_warps"], num_stages=bc["num_stages"])
    dz1 = torch.empty((n, d), device=dev, dtype=dtype)
    dz2 = torch.empty((n, d), device=dev, dtype=dtype)
    dots = torch.empty((m,), device=dev, dtype=torch.float32)
    ntxent_bwd_epilogue_kernel[(triton.cdiv(m, ROW_BLOCK),)](
        dpart, z1, z2, rinv, temperature, gscale if unscale else temperature, dz1, dz2, dots,
        n, d, splits, z1.stride(0), z1.stride(1), z2.stride(0), z2.stride(1),
        NORMALIZE=normalize, UNSCALE=unscale, BLOCK_R=ROW_BLOCK, BLOCK_D=cfg["BLOCK_D"])
    dtemp = None
    if need_dtemp:
        # dL/dtau = -(1 / (2 tau)) sum_a zhat_a . dZhat_a (a fixed-order reduction).
        dtemp = -dots.sum() / (2.0 * temperature.reshape(()))
    return dz1, dz2, dtemp


def ntxent_fwd_cuda(z1, z2, temperature, normalize: bool, decoupled: bool):
    """TEMPORARY adapter of the old launchers to the op contract (replaced by the D-loop
    kernels)."""
    loss, lse2, zhat, rinv = ntxent_forward(z1, z2, temperature.reshape(1), normalize,
                                            decoupled)
    return loss, lse2 * LN2.value, zhat, 1.0 / rinv


def ntxent_bwd_cuda(grad_loss, zhat, norms, lse, temperature, normalize, decoupled, dtype):
    """TEMPORARY adapter (see ntxent_fwd_cuda)."""
    n = zhat.shape[0] // 2
    z = (zhat.float() * norms[:, None]).to(dtype)
    t = temperature.reshape(1)
    dz1, dz2, dtemp = ntxent_backward(grad_loss, z[:n], z[n:], zhat, 1.0 / norms,
                                      lse / LN2.value, t, normalize, decoupled, True)
    return dz1, dz2, dtemp


# ---------------------------------------------------------------------------------------
# The op: schemas, fake, autograd (one for both devices), the Triton CUDA kernels
# ---------------------------------------------------------------------------------------
#
# Saved-tensor contract (both devices): ntxent_fwd returns (loss (2N,) in the input dtype,
# lse (2N,) fp32 natural-log LSE, zhat (2N, D), norms (2N,) fp32 raw L2 row norms) and
# ntxent_bwd consumes (zhat, norms, lse). zhat is the operand the device's kernel multiplies:
# fp32 on CPU (the C++ kernel computes in fp32), the input dtype on CUDA (tensor cores) --
# :func:`zhat_dtype`, which the fake uses too.

_library.define("ntxent_fwd", "(Tensor z1, Tensor z2, Tensor temperature, bool normalize, "
                "bool decoupled) -> (Tensor loss, Tensor lse, Tensor zhat, Tensor norms)")
_library.define("ntxent_bwd", "(Tensor grad_loss, Tensor zhat, Tensor norms, Tensor lse, "
                "Tensor temperature, bool normalize, bool decoupled, ScalarType dtype)"
                " -> (Tensor dz1, Tensor dz2, Tensor dtemperature)")


def zhat_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved normalised rows: the input dtype where Triton runs (CUDA, or CPU
    inside ``fastssl._dispatch.triton_on_cpu()``), fp32 for the C++ CPU kernel."""
    from .. import _dispatch
    if device.type == "cuda" or (device.type == "cpu" and _dispatch.triton_on_cpu_active()):
        return dtype
    return torch.float32


@torch.library.register_fake("fastssl::ntxent_fwd")
def _ntxent_fwd_fake(z1, z2, temperature, normalize, decoupled):
    m, d = 2 * z1.shape[0], z1.shape[1]
    f32 = torch.float32
    return (z1.new_empty((m,)), z1.new_empty((m,), dtype=f32),
            z1.new_empty((m, d), dtype=zhat_dtype(z1.device, z1.dtype)),
            z1.new_empty((m,), dtype=f32))


@torch.library.register_fake("fastssl::ntxent_bwd")
def _ntxent_bwd_fake(grad_loss, zhat, norms, lse, temperature, normalize, decoupled, dtype):
    m, d = zhat.shape
    return (zhat.new_empty((m // 2, d), dtype=dtype), zhat.new_empty((m // 2, d), dtype=dtype),
            torch.empty_like(temperature))


def _setup_context(ctx, inputs, output):
    z1, _z2, temperature, normalize, decoupled = inputs
    _loss, lse, zhat, norms = output
    ctx.save_for_backward(zhat, norms, lse, temperature)
    ctx.normalize, ctx.decoupled, ctx.dtype = normalize, decoupled, z1.dtype


def _backward(ctx, grad_loss, _glse, _gzhat, _gnorms):
    zhat, norms, lse, temperature = ctx.saved_tensors
    dz1, dz2, dtemp = torch.ops.fastssl.ntxent_bwd(
        grad_loss, zhat, norms, lse, temperature, ctx.normalize, ctx.decoupled, ctx.dtype)
    return dz1, dz2, (dtemp if ctx.needs_input_grad[2] else None), None, None


torch.library.register_autograd("fastssl::ntxent_fwd", _backward, setup_context=_setup_context)
_library.no_double_backward("ntxent_bwd", "nt_xent")


@_library.triton_kernel("ntxent_fwd")
def ntxent_fwd_triton(z1, z2, temperature, normalize: bool, decoupled: bool):
    return ntxent_fwd_cuda(z1, z2, temperature.reshape(()).to(torch.float32), normalize,
                           decoupled)


@_library.triton_kernel("ntxent_bwd")
def ntxent_bwd_triton(grad_loss, zhat, norms, lse, temperature, normalize: bool,
                      decoupled: bool, dtype: torch.dtype):
    dz1, dz2, dtemp = ntxent_bwd_cuda(grad_loss, zhat, norms, lse,
                                      temperature.reshape(()).to(torch.float32), normalize,
                                      decoupled, dtype)
    return dz1, dz2, dtemp.reshape(temperature.shape).to(temperature.dtype)


def nt_xent_rows(z1: torch.Tensor, z2: torch.Tensor, temperature: torch.Tensor,
                 normalize: bool, decoupled: bool) -> torch.Tensor:
    """Per-row NT-Xent losses (2N,) in the input dtype; differentiable in z1, z2 and
    temperature (a 0-dim fp32 tensor on the embeddings' device). Arguments are validated by
    :func:`fastssl.nt_xent`, which callers should use."""
    loss, _lse, _zhat, _norms = torch.ops.fastssl.ntxent_fwd(z1, z2, temperature, normalize,
                                                             decoupled)
    return loss


# ---------------------------------------------------------------------------------------
# Ahead-of-time compile list for `fastssl gpu-report` (the configs the launchers use, D = 128)
# ---------------------------------------------------------------------------------------


def _aot_entries() -> list:
    """One entry per (kernel, dtype, config) the launchers use on a GPU, at D = 128 (and the
    wide config at D = 256)."""
    entries = []
    i32 = "i32"
    plans = [(torch.bfloat16, "large", 128), (torch.bfloat16, "small", 128),
             (torch.bfloat16, "wide", 256), (torch.float16, "large", 128),
             (torch.float16, "small", 128), (torch.float32, "fp32", 128)]
    for dtype, cname, block_d in plans:
        ty = TL_TYPE[dtype]
        prec = "bf16x3" if dtype == torch.float32 else "ieee"
        for pass_, fn, sig in (
                ("fwd", ntxent_fwd_kernel,
                 {"zhat_ptr": f"*{ty}", "temp_ptr": "*fp32", "mpart_ptr": "*fp32",
                  "lpart_ptr": "*fp32", "ppart_ptr": "*fp32", "N": i32, "D": i32,
                  "TILES_PER_SPLIT": i32}),
                ("bwd", ntxent_bwd_kernel,
                 {"zhat_ptr": f"*{ty}", "temp_ptr": "*fp32", "lse_ptr": "*fp32",
                  "g_ptr": "*fp32", "dpart_ptr": "*fp32", "N": i32, "D": i32,
                  "TILES_PER_SPLIT": i32})):
            bm, bn, warps, stages = CONFIGS[cname][pass_]
            entries.append(dict(
                name=f"{fn.__name__}[{ty},{cname},D{block_d}]", fn=fn, signature=sig,
                constexprs=dict(DECOUPLED=False, DOT_FP32=False, INPUT_PRECISION=prec,
                                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d),
                tensor_cores=True, num_warps=warps, num_stages=stages))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ty = TL_TYPE[dtype]
        entries.append(dict(
            name=f"ntxent_prologue_kernel[{ty}]", fn=ntxent_prologue_kernel,
            signature={"z1_ptr": f"*{ty}", "z2_ptr": f"*{ty}", "zhat_ptr": f"*{ty}",
                       "rinv_ptr": "*fp32", "N": i32, "D": i32, "s1r": i32, "s1c": i32,
                       "s2r": i32, "s2c": i32},
            constexprs=dict(NORMALIZE=True, BLOCK_R=ROW_BLOCK, BLOCK_D=128),
            tensor_cores=False, num_warps=4, num_stages=1))
        entries.append(dict(
            name=f"ntxent_fwd_combine_kernel[{ty}]", fn=ntxent_fwd_combine_kernel,
            signature={"mpart_ptr": "*fp32", "lpart_ptr": "*fp32", "ppart_ptr": "*fp32",
                       "lse_ptr": "*fp32", "loss_ptr": f"*{ty}", "M": i32, "SPLITS": i32},
            constexprs=dict(BLOCK=COMBINE_BLOCK), tensor_cores=False, num_warps=4,
            num_stages=1))
        entries.append(dict(
            name=f"ntxent_bwd_epilogue_kernel[{ty}]", fn=ntxent_bwd_epilogue_kernel,
            signature={"dpart_ptr": "*fp32", "z1_ptr": f"*{ty}", "z2_ptr": f"*{ty}",
                       "rinv_ptr": "*fp32", "temp_ptr": "*fp32", "gscale_ptr": "*fp32",
                       "dz1_ptr": f"*{ty}", "dz2_ptr": f"*{ty}", "dots_ptr": "*fp32",
                       "N": i32, "D": i32, "SPLITS": i32, "s1r": i32, "s1c": i32,
                       "s2r": i32, "s2c": i32},
            constexprs=dict(NORMALIZE=True, UNSCALE=dtype == torch.float16, BLOCK_R=ROW_BLOCK,
                            BLOCK_D=128),
            tensor_cores=False, num_warps=4, num_stages=1))
    return entries


AOT_KERNELS = _aot_entries()


# ---------------------------------------------------------------------------------------
# Work counts (for `fastssl gpu-report`'s roofline estimates)
# ---------------------------------------------------------------------------------------


def work_fused(m: int, d: int, elem_bytes: int = 2) -> dict:
    """FLOPs, exps and HBM bytes of this module's fwd + bwd at 2N = m (see the header)."""
    flops = 3 * 2 * m * m * d          # S fwd, S recompute, K Zhat
    exps = 3 * m * m                   # fwd 1, bwd 2 per element
    md = m * d
    hbm = (md * elem_bytes * 2        # prologue: read z, write zhat
           + md * elem_bytes          # forward: zhat (L2-resident re-reads not counted)
           + md * elem_bytes          # backward: zhat
           + md * 4 * 2               # backward partials: write + read fp32 (splits = 1)
           + md * elem_bytes * 2      # epilogue: read z, write dz
           + m * 4 * 12 + m * elem_bytes)  # rinv, partial stats, lse, g, dots, loss
    return dict(flops=flops, exps=exps, bytes=hbm)


def work_eager_reference(m: int, d: int, elem_bytes: int = 2) -> dict:
    """FLOPs, exps and HBM bytes of ``fastssl.reference.nt_xent`` fwd + bwd in eager PyTorch,
    counting each kernel's M^2 reads and writes (the O(M D) traffic is negligible)."""
    mm = m * m
    b = elem_bytes
    passes = [
        ("z @ z.T", 0, 1),                 # write logits
        ("/ temperature", 1, 1),
        ("eye mask", 0, 1 / b),            # bool
        ("masked_fill", 1 + 1 / b, 1),
        ("logsumexp", 1, 0),
        ("logsumexp backward", 1, 1),      # exp(x - lse) * g
        ("masked_fill backward", 1 + 1 / b, 1),
        ("div backward", 1, 1),
        ("matmul backward (dS Z, dS^T Z)", 2, 0),
    ]
    hbm = sum(r + w for _, r, w in passes) * mm * b
    return dict(flops=3 * 2 * mm * d, exps=2 * mm, bytes=int(hbm))


ESTIMATE_SHAPE = dict(m=65536, d=128)
