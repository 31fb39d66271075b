"""Fused NT-Xent (SimCLR) loss: the op (schemas, fake, autograd) and its Triton CUDA kernels.

Same semantics as :func:`fastssl.reference.nt_xent` and ``csrc/cpu/ntxent.cpp``. Notation
(docs/DESIGN.md, section 4.2): M = 2N rows, Z = [z1; z2] (M x D), Zhat = normalize(Z) (L2, eps 1e-12 on the norm,
in fp32), S = Zhat Zhat^T / tau, diagonal masked, row i's target t(i) = (i + N) mod M (with
``decoupled`` also masked out of the log-sum-exp), loss_i = LSE_j S_ij - S_i,t(i).
One "matmul-equivalent" (eq) = 2 M^2 D FLOPs, the cost of S once.

Launchers (the CUDA kernels of ``fastssl::ntxent_fwd`` / ``fastssl::ntxent_bwd``; the C++ CPU
kernels return the same tensors):
    ntxent_fwd_cuda(z1, z2, temperature, normalize, decoupled) -> (loss, lse, zhat, norms)
    ntxent_bwd_cuda(grad_loss, zhat, norms, lse, temperature, normalize, decoupled, dtype)
        -> (dz1, dz2, dtemperature)
loss (M,) input dtype; lse (M,) fp32 natural-log; "zhat" (M, D) input dtype, here the
power-of-two scaled raw rows zs (below); norms (M,) fp32 raw L2 row norms; temperature a one-element fp32 device tensor read through its pointer (no host
sync anywhere, the fp16 gradient scale included).

Design: full row blocks, flash-attention style, backward recomputes S
------------------------------------------------------------------------
* Exact operands: the tensor cores multiply zs = z 2^-e (per row, e from the row's max-abs
  exponent so that max |zs| is in [0.5, 1)), exact in the input dtype, and the fp32 factor
  r = 1 / max(|zs|, eps 2^-e) (so zs r = z / max(|z|, eps) = zhat) is applied to the fp32 dot
  products: S_ij = ((zs_i . zs_j) (r_i r_j)) / tau (symmetric). Rounding zhat itself to 16 bits was the
  dominant error at small tau (tau = 0.01, N = 33, D = 40, z2 = z1 + 1.5 noise: dz error
  2.4e-3 fp16 / 1.8e-2 bf16 vs the C++ kernel's fp32 rows 3.3e-4 / 3.1e-3).
* Prologue (O(M D)): per row, in D-chunks: max-abs -> e, then |zs| = sqrt(sum zs^2) over the
  stored (input-dtype) zs values, norm = 2^e |zs| (overflow-safe: the raw squared sum
  overflows fp32 at |x| ~ 1.8e19, that of zs never; inputs up to bf16/fp32's max normalise
  correctly), r in fp32; writes zs, norms, r. A row holding inf/NaN gets a NaN norm and NaN
  zs, which poisons every row's LSE (every row reads every column): non-finite input -> NaN
  loss and gradients, as in the C++ kernel. The backward recovers r bit-identically from
  (zs, norms) in ntxent_rscale_kernel (O(M D)): the op's saved tensors keep their schema.
* Forward: program (row block I, column split s) streams the column tiles of split s:
  S_IJ = Zhat_I Zhat_J^T / tau, a GEMM K-loop over BLOCK_K-wide chunks of D (one chunk, the
  row block held in registers, when D <= BLOCK_K), and keeps the running row (max, sum) in
  fp32 registers; exp(S - m) = exp2((S - m) log2(e)). log2(e) is folded into the (small)
  difference rather than into 1/tau, so that the logits are natural-unit and bit-identical
  in the backward's recompute: the saved natural-log LSE then normalises them exactly (an
  LSE kept in log2 units and converted to natural and back adds ~ulp(lse) to every
  probability: measured 5x plain fp32 PyTorch's dL/dtau error where that sum cancels, D = 1).
  The M x M matrix is never written. Cost: 1 eq, M^2 exp2. A combine kernel merges the
  splits' (max, sum) in split order (deterministic) and writes lse and the loss rows; the
  positive logit is read from the same S tile as the LSE (no negative rows).
* Backward: dZhat = (G + G^T) Zhat / tau with G_ij = g_i softmax_i(j) - g_i [j = t(i)],
  as (G + G^T) diag(r) Zs / tau.
  Program (I, s, D-panel p) recomputes S_IJ (the K-loop over all of D) and forms, in fp32,
      K_IJ = g_i exp2((S_ij - lse_i) log2 e) + g_j exp2((S_ij - lse_j) log2 e)   (2 exp2)
  then the -(g_i + g_t(i)) of the target and the column factor r_j are folded in fp32
  *before* K r_J is cast to the input dtype for ``dZhat_I[:, p] += tl.dot(K r_J, Zs_J[:, p])``
  -- the positive's p ~ 1 - eps would otherwise cancel after rounding. The accumulator is BLOCK_M x BLOCK_DP fp32 registers.
  Cost: (1 + P) eq and 2 P M^2 exp2 for P = cdiv(D, BLOCK_DP) panels (P = 1 up to D = 256).
  An epilogue kernel (O(M D), two passes over D-chunks) sums the splits' partials in split
  order, scales by 1/tau, applies the normalisation gradient dZ = r (dZhat - zhat (zhat .
  dZhat)) with r = 1 / max(norm, 1e-12) (r dZhat where the norm was clamped) and zhat =
  zs r_s in fp32 (r_s the prologue's factor), writes dz1/dz2
  and zhat_a . dZhat_a per row, from which dL/dtau = -(1/(2 tau)) sum_a zhat_a . dZhat_a.
* Masks cost only where they apply: the self-mask runs only in tiles that cross the diagonal,
  the target fold / positive extraction / decoupled mask only in tiles that hold a target
  column, the ragged-column mask only in the last tile (scalar branches around tile work),
  the ragged-D mask only when D is not a multiple of BLOCK_K (a constexpr).

Wide D: why D-panels (recompute S per panel) rather than accumulating dZhat in global memory?
The program owns its rows, so it could keep dZhat_I (BLOCK_M x D fp32) in global memory and
read-modify-write one D-chunk at a time for every column tile, without atomics: that moves
8 BLOCK_M D bytes per column tile against 4 BLOCK_M BLOCK_N D FLOPs (S and K Zhat), i.e.
BLOCK_N / 2 = 16-32 FLOP per byte of L2 traffic, 3-10x below an H100's ~90-165 FLOP/B L2
balance (989 TFLOP/s over ~6-11 TB/s), and 8 M^2 D / BLOCK_N bytes in all (0.55 TB at
M = 65,536, D = 1024, BLOCK_N = 64; the 132 programs' accumulators, 132 x 256 KiB, also do not
fit the 50 MB L2). Panels stay compute-bound: at D = 1024 (P = 4) the backward is 5 eq instead
of 2, fwd + bwd 6 eq (lower bound 53 ms at M = 65,536 vs 40 ms for the memory-bound eager
reference's 133 GB of logit traffic, which at that M also needs 8.6 GB per logit tensor; fused
stays O(M D)). A 512-wide panel (P = 2, 4 eq) would be better, but its 64 x 512 fp32
accumulator spilled in every tile of the sweep (32-544 bytes, below).

Counts, fwd + bwd (bf16, b = 2 bytes/element; ``fastssl gpu-report`` prints the H100 figures):
    M = 65,536, D = 128  : 3 eq = 6 M^2 D FLOPs (3.30e12), 3 M^2 exp2 (1.29e10),
                           HBM (6 b + 8) M D + O(M) bytes (~0.17 GB; column tiles re-read from L2)
    M = 65,536, D = 1024 : 6 eq (5.28e13), 9 M^2 exp2, ~1.7 GB
    eager reference      : 3 eq, 2 M^2 exp, and ~15 passes over M^2 logits (0.13 TB in bf16)
Why not the symmetric upper-triangle schedule (2 eq, 2 M^2 exp, what the C++ kernel does)?
A tile (I, J) then updates the column statistics and dZ of block J, owned by another program:
on a GPU that needs floating-point atomics (order-dependent results) or per-tile partial
buffers of O(M^2 D / BLOCK) bytes (GBs at M = 131,072). It saves 1/3 of the tensor-core FLOPs
and exps but loses determinism or O(M D) memory; full rows keep both. Why not gradients in the
forward (Liger-style)? Row j's softmax needs lse_j, known only after a full pass: it would
still be 1 + 2 eq, only moved into the forward, and would tie the gradient to a uniform g
(no ``reduction="none"`` with an arbitrary grad_output).

Grid: forward (cdiv(M, BLOCK_M), splits), backward (cdiv(M, BLOCK_M), splits * panels). When
the row blocks (times the panels) are fewer than the SMs, the column tiles are split across
``splits`` programs (partials: (splits, M) stats forward, (splits, M, D) fp32 backward, bounded
by ~num_sms * BLOCK_M * D * 4 bytes); reductions of partials run in a fixed order. No atomics
anywhere: results are bitwise reproducible for a given shape and GPU.

Tiles per (arch, dtype, D-class) -- TILE_TABLE below -- picked from an ahead-of-time sweep
(``fastssl gpu-report``: Triton's PTX through its own ptxas, triton 3.9) among candidates at
D in {64, 128, 256, 512, 768, 1024} (512 / 768 / 1024 share the "wide" tiles): the chosen
tiles have 0 spill bytes, shared memory within the arch's limit (sm_80 163 KiB, sm_90 227 KiB)
and run on wgmma (sm_90) / mma.sync (sm_80). The launcher picks the table by the device's
compute capability (>= 9.0 -> sm_90, else sm_80). Tile = (BLOCK_M, BLOCK_N, BLOCK_K[,
BLOCK_DP], warps, stages); regs / shared bytes per arch as compiled:
  arch   dtype      D          forward tile        regs/shared backward tile          regs/shared
  sm_90  bf16/fp16  <= 64      (128, 64, 64, 8, 3)   128 / 24K   (128, 64, 64, 64, 8, 3)   221 / 32K
  sm_90  bf16/fp16  <= 128     (128, 64, 128, 8, 3)  128 / 48K   (128, 64, 128, 128, 8, 3) 250 / 64K
  sm_90  bf16/fp16  <= 256     (128, 64, 256, 8, 2)  170 / 96K*  (64, 64, 256, 256, 8, 2)  199 / 72K*
  sm_90  bf16/fp16  > 256      (128, 64, 64, 8, 3)   255 / 24K   (64, 32, 64, 256, 8, 2)   238 / 64K
  sm_90  fp32       <= 64      (64, 64, 64, 4, 2)    128 / 48K   (64, 32, 64, 64, 4, 2)    239 / 32K
  sm_90  fp32       <= 128     (64, 32, 128, 4, 2)   128 / 64K   (64, 16, 128, 128, 4, 2)  229 / 48K
  sm_90  fp32       > 128      (128, 32, 32, 8, 3)   222 / 44K   (64, 16, 32, 128, 4, 2)   240 / 32K
  sm_80  bf16/fp16  <= 64      (128, 64, 64, 8, 3)   216 / 24K   (128, 32, 64, 64, 8, 3)   254 / 32K
  sm_80  bf16/fp16  <= 128     (128, 64, 128, 8, 3)  216 / 48K   (64, 32, 128, 128, 4, 3)  255 / 32K
  sm_80  bf16/fp16  <= 256     (64, 64, 256, 8, 2)   255 / 48K*  (64, 32, 256, 256, 8, 2)  240 / 56K*
  sm_80  bf16/fp16  > 256      (128, 64, 64, 8, 3)   255 / 24K   (64, 32, 64, 256, 8, 2)   255 / 32K
  sm_80  fp32       <= 64      (64, 32, 64, 4, 2)    178 / 24K   (64, 16, 64, 64, 4, 2)    202 / 20K
  sm_80  fp32       <= 128     (64, 32, 128, 4, 2)   255 / 48K   (32, 16, 128, 128, 4, 2)  224 / 26K
  sm_80  fp32       > 128      (128, 32, 32, 8, 3)   247 / 40K   (64, 16, 32, 128, 8, 2)   222 / 16K
    short batches (bf16/fp16, D <= 128, fewer tiles than SMs): (64, 32, ., 4, 3) both passes,
    64-166 / 12-24K forward, 179-255 / 16-32K backward.
    Figures from the exact-operand kernels (zs and fp32 r, see Precision), re-swept at D in
    {64, 128, 1024}: 0 spills in all 112 nt_xent rows (fp32 > 128 and "wide" measured at
    D = 1024). * = the D = 256 rows are the previous (zhat-operand) kernels' figures, not
    re-compiled since. The exact-operand backward spilled 48 B in the previous sm_80 bf16/fp16
    d128 tile (128, 32, 128, 128, 8, 3); (64, 32, 128, 128, 4, 3) has 0.
Every compiled: 0 spills, wgmma on sm_90, mma on sm_80 (`fastssl gpu-report --only nt_xent:`).
Rejected in the sweep (spill bytes): bf16 bwd 64 x 512 D-panels (32-544, both archs); bf16
bwd (128, 64, 128, 128) on sm_80 (12); bf16 wide fwd with BLOCK_K = 128 (1120-1860) or
BLOCK_N = 128 (284-528); bf16 wide bwd 128-row / 4-warp tiles (120-936); fp32 bwd
(64, 16, 128, 128, 4 or 8 warps) on sm_80 (24); fp32 wide BLOCK_K = 64 (324-1348). Several
chosen tiles sit at 254-255 registers on sm_80 with 0 spills: a Triton upgrade may tip them
(``tests/test_gpu_report.py`` would fail).

Precision: fp32 accumulation everywhere; the dot operands are zs (exact) in the input dtype
(bf16 / fp16 / fp32) and, backward, K r_J rounded to it; every normalisation factor is fp32. fp32 inputs use ``tl.dot(input_precision=...)`` from ``FASTSSL_FP32_DOT``
(default ``"bf16x3"``, present in triton 3.6 and 3.9: tensor cores, ~1e-5 relative, 3x the
products; ``"tf32"`` faster and ~1e-3; ``"ieee"`` no tensor cores), see
:mod:`fastssl.ops._triton_utils`; fp32's FLOP counts are 3x. fp16 backward: g is pre-scaled
by a power of two (2^14 / max|g|, on the device) so that K (~ g / M per entry) stays in fp16's
normal range; the epilogue undoes it exactly. Under the interpreter, fp32 -> bf16 casts are
rounded to nearest even (``round_cast``), as on the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _library
from ._aot import aot_entry
from ._triton_utils import (INTERPRET, TL_TYPE, dot_in_fp32, dot_precision,
                            merge_lse_partials, next_pow2, num_sms, round_cast)

# Globals read inside kernels must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NORM_EPS = tl.constexpr(1e-12)  # F.normalize's eps, on the fp32 norm
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
def _pow2(e):
    """2^e in fp32 for an int32 tile e in [-126, 127], built from the exponent bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def ntxent_prologue_kernel(z1_ptr, z2_ptr, zs_ptr, norm_ptr, r_ptr, N, D, s1r, s1c, s2r, s2c,
                           NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    # reads M D (input dtype) 3x (L1/L2-resident after the first); writes M D + 2 M fp32.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    inb = rows < 2 * N
    dcol = tl.arange(0, BLOCK_D)
    out_ty = zs_ptr.dtype.element_ty
    # 1. [Max-abs] per row, and a poison term: 0 for a finite row, NaN if any element is
    #    inf/NaN (inf - inf = NaN), added to the norm and to every zs of the row.
    amax = tl.zeros([BLOCK_R], tl.float32)
    poison = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = _load_pair_rows(z1_ptr, z2_ptr, rows, d0 + dcol, N, D, s1r, s1c, s2r, s2c)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        poison += tl.sum(x - x, axis=1)
    # 2. [Power-of-two scale] e from amax's exponent field so that max |zs| is in [0.5, 1)
    #    (zero / subnormal rows: e = -125, max |zs| < 0.5; amax >= 2^126: e = 126, max |zs|
    #    < 4, so that 2^-e stays a normal fp32). zs = z 2^-e is exact in the input dtype (a
    #    power of two) except for elements that fall below the dtype's normal range (fp16:
    #    |z_k| < 2^-14 max|z|, rounded to a subnormal, abs error <= 2^-25 on max|zs| < 1).
    #    Without normalize zs = z (the scale still serves the norm).
    bexp = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.minimum(tl.maximum(bexp, 1) - 126, 126)
    scale = _pow2(-e)
    # 3. [Overflow-safe norm] |z| = 2^e |zs| (exact scalings; the squared sum of raw fp32
    #    values overflows at |x| ~ 1.8e19, that of zs never). The sum is taken over the zs
    #    values as stored (rounded to the input dtype), in the same chunking as
    #    ntxent_rscale_kernel, so that the backward recomputes |zs| bit-identically.
    ss = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = _load_pair_rows(z1_ptr, z2_ptr, rows, d0 + dcol, N, D, s1r, s1c, s2r, s2c)
        xs = round_cast(x * scale[:, None], out_ty).to(tl.float32)
        ss += tl.sum(xs * xs, axis=1)
    root = tl.sqrt_rn(ss)
    norm = root * _pow2(e) + poison
    tl.store(norm_ptr + rows, norm, mask=inb)
    # 4. [r] zhat = z / max(|z|, eps) = zs r with r = 1 / max(|zs|, eps 2^-e) in fp32 (a
    #    clamped row: r = 2^e / eps, as F.normalize and the C++ kernel). r stays in fp32: the
    #    kernels apply it to the fp32 dot products, never to a 16-bit operand.
    if NORMALIZE:
        r = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32),
                      tl.maximum(root, scale * NORM_EPS))
    else:
        r = tl.full([BLOCK_R], 1.0, tl.float32)
    tl.store(r_ptr + rows, r, mask=inb)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dcol
        x = _load_pair_rows(z1_ptr, z2_ptr, rows, cols, N, D, s1r, s1c, s2r, s2c)
        if NORMALIZE:
            zs = x * scale[:, None] + poison[:, None]
        else:
            zs = x + poison[:, None]
        tl.store(zs_ptr + rows[:, None] * D + cols[None, :], round_cast(zs, out_ty),
                 mask=inb[:, None] & (cols < D)[None, :])


@triton.jit
def ntxent_rscale_kernel(zs_ptr, norm_ptr, r_ptr, M, D, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """The backward's r from the saved (zs, norms), equal to the prologue's: |zs| is re-summed
    in the prologue's order (bit-identical), and 2^e = norm / |zs| is exact (both normal fp32,
    a power-of-two ratio) -- rounded to the nearest power of two all the same; rows with
    max |zs| < 0.5 are the zero / subnormal-max rows, e = -125 by construction (their norm
    may be subnormal, its ratio inexact). norm = inf (finite rows past fp32's range): 2^e =
    inf, r = 1 / |zs|, as in the prologue (eps 2^-e underflows to 0 there)."""
    # reads M D (input dtype) + M fp32; writes M fp32.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    inb = rows < M
    dcol = tl.arange(0, BLOCK_D)
    ss = tl.zeros([BLOCK_R], tl.float32)
    zmax = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dcol
        zs = tl.load(zs_ptr + rows[:, None] * D + cols[None, :],
                     mask=inb[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(zs * zs, axis=1)
        zmax = tl.maximum(zmax, tl.max(tl.abs(zs), axis=1))
    root = tl.sqrt_rn(ss)
    norm = tl.load(norm_ptr + rows, mask=inb, other=1.0)
    ratio = tl.div_rn(norm, tl.where(root > 0, root, 1.0))
    bits = (ratio.to(tl.int32, bitcast=True) + 0x400000) & 0x7F800000
    pow2e = tl.where(zmax < 0.5, _pow2(tl.full([BLOCK_R], -125, tl.int32)),
                     bits.to(tl.float32, bitcast=True))
    r = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32),
                  tl.maximum(root, tl.div_rn(tl.full([BLOCK_R], NORM_EPS, tl.float32), pow2e)))
    tl.store(r_ptr + rows, r, mask=inb)


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
def _norm_factor(r_ptr, idx, M, NORMALIZE: tl.constexpr):
    """Factors r_idx of the logits, for a row or a column tile (normalize; 1 otherwise: not
    read)."""
    if NORMALIZE:
        return tl.load(r_ptr + idx, mask=idx < M, other=0.0)
    else:
        return tl.full(idx.shape, 1.0, tl.float32)


@triton.jit
def _logits(dot, r_i, r_j, inv_tau, NORMALIZE: tl.constexpr):
    """S_IJ = ((zs_i . zs_j) (r_i r_j)) / tau in fp32, on the fp32 dot of the exact operands:
    one expression for the forward and the backward's recompute (bit-identical logits), and
    symmetric (r_i r_j commutes exactly): S_ij == S_ji bit for bit, so a saturated positive
    cancels exactly in both softmax terms of K (with (r_i / tau) r_j it did not: a 1e-5
    gradient where the truth is 1e-27, tau = 0.01)."""
    if NORMALIZE:
        return (dot * (r_i[:, None] * r_j[None, :])) * inv_tau
    else:
        return dot * inv_tau


@triton.jit
def _similarity_k_loop(zhat_ptr, rows, cols, M, D, DOT_FP32: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Zhat_I Zhat_J^T for any D: a GEMM K-loop over BLOCK_K-wide chunks of D, fp32
    accumulator (BLOCK_M x BLOCK_N). Reads (BLOCK_M + BLOCK_N) D elements (L2-resident)."""
    kcol = tl.arange(0, BLOCK_K)
    rmask = rows < M
    cmask = cols < M
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + kcol
        if EVEN_K:
            qm = rmask[:, None]
            km = cmask[:, None]
        else:
            qm = rmask[:, None] & (kk < D)[None, :]
            km = cmask[:, None] & (kk < D)[None, :]
        q = tl.load(zhat_ptr + rows[:, None] * D + kk[None, :], mask=qm, other=0.0)
        k = tl.load(zhat_ptr + cols[:, None] * D + kk[None, :], mask=km, other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), s, input_precision=INPUT_PRECISION)
    return s


@triton.jit
def ntxent_fwd_kernel(zhat_ptr, r_ptr, temp_ptr, mpart_ptr, lpart_ptr, ppart_ptr, N, D,
                      TILES_PER_SPLIT, NORMALIZE: tl.constexpr, DECOUPLED: tl.constexpr,
                      DOT_FP32: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr,
                      EVEN_K: tl.constexpr):
    # reads BLOCK_M D + (columns of the split) D; writes 3 BLOCK_M fp32 partials.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    M = 2 * N
    i0 = pid_m * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    kcol = tl.arange(0, BLOCK_K)
    if ONE_CHUNK:  # D <= BLOCK_K: the row block stays in registers for the whole pass
        q = tl.load(zhat_ptr + rows[:, None] * D + kcol[None, :],
                    mask=(rows < M)[:, None] & (kcol < D)[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
    # 1. [Scale] S = Zhat_I Zhat_J^T / tau in natural units, and exp(S - m) = exp2((S - m)
    #    log2(e)): log2(e) is folded into the (small) difference, not into the scale, so the
    #    backward recomputes bit-identical logits and the saved natural-log LSE needs no
    #    conversion (a log2-unit LSE converted to natural and back would add ~ulp(lse) to every
    #    probability: 5x plain fp32 PyTorch's dL/dtau error where that sum cancels, D = 1).
    inv_tau = tl.div_rn(1.0, tl.load(temp_ptr).to(tl.float32))
    r_i = _norm_factor(r_ptr, rows, M, NORMALIZE)
    tgt = tl.where(rows < N, rows + N, rows - N)
    lo1, hi1, lo2, hi2 = _target_range(i0, N, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    j_begin = pid_s * TILES_PER_SPLIT * BLOCK_N
    j_end = tl.minimum(j_begin + TILES_PER_SPLIT * BLOCK_N, M)
    for j0 in range(j_begin, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        # 2. [Similarity] 2 BLOCK_M BLOCK_N D FLOPs on the tensor cores, fp32 accumulation.
        if ONE_CHUNK:
            k = tl.load(zhat_ptr + cols[:, None] * D + kcol[None, :],
                        mask=(cols < M)[:, None] & (kcol < D)[None, :], other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        else:
            s = _similarity_k_loop(zhat_ptr, rows, cols, M, D, DOT_FP32, INPUT_PRECISION,
                                   BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
        s = _logits(s, r_i, _norm_factor(r_ptr, cols, M, NORMALIZE), inv_tau, NORMALIZE)
        # 3. [Masks] only the tiles they touch pay for them.
        if j0 + BLOCK_N > M:  # ragged last tile
            s = tl.where((cols < M)[None, :], s, float("-inf"))
        if (j0 < i0 + BLOCK_M) & (i0 < j0 + BLOCK_N):  # crosses the diagonal
            s = tl.where(rows[:, None] == cols[None, :], float("-inf"), s)
        if _overlaps(j0, lo1, hi1, BLOCK_N) | _overlaps(j0, lo2, hi2, BLOCK_N):
            # the positive is read from the same tile as the LSE: no separate dot product,
            # so loss_i = LSE_i - S_i,t(i) >= 0 up to the exp2/log2 rounding
            is_t = tgt[:, None] == cols[None, :]
            pos += tl.sum(tl.where(is_t, s, 0.0), axis=1)
            if DECOUPLED:
                s = tl.where(is_t, float("-inf"), s)
        # 4. [Online softmax] running max and sum, exp2; a row with no column yet keeps -inf.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = (l_i * tl.exp2((m_i - shift) * LOG2E)
               + tl.sum(tl.exp2((s - shift[:, None]) * LOG2E), axis=1))
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
    shift, total, pos = merge_lse_partials(mpart_ptr, lpart_ptr, ppart_ptr, rows, inb, M, SPLITS,
                                           True)
    # natural-log LSE (the op's saved-tensor contract, shared with the C++ kernel); the max
    # is added unconverted, only log(sum) goes through log2
    lse = shift + tl.log2(tl.where(inb, total, 1.0)) * LN2  # padding rows: no log2(0)
    tl.store(lse_ptr + rows, lse, mask=inb)
    tl.store(loss_ptr + rows, round_cast(lse - pos, loss_ptr.dtype.element_ty), mask=inb)


@triton.jit
def ntxent_bwd_kernel(zhat_ptr, r_ptr, temp_ptr, lse_ptr, g_ptr, dpart_ptr, N, D,
                      TILES_PER_SPLIT, PANELS, NORMALIZE: tl.constexpr,
                      DECOUPLED: tl.constexpr, DOT_FP32: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DP: tl.constexpr,
                      ONE_CHUNK: tl.constexpr, EVEN_K: tl.constexpr):
    # Program (row block I, column split s, D-panel p) accumulates dZhat_I[:, panel p] over
    # the column tiles of split s in a BLOCK_M x BLOCK_DP fp32 register tile.
    # reads BLOCK_M (D + 2) + (columns of the split) (D + BLOCK_DP + 2) elements;
    # writes BLOCK_M BLOCK_DP fp32 partials.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1) // PANELS
    pid_p = tl.program_id(1) % PANELS
    M = 2 * N
    i0 = pid_m * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    rmask = rows < M
    pcol = pid_p * BLOCK_DP + tl.arange(0, BLOCK_DP)
    pmask = pcol < D
    if ONE_CHUNK:  # D <= BLOCK_K == BLOCK_DP, one panel: Zhat_J serves both dots
        q = tl.load(zhat_ptr + rows[:, None] * D + pcol[None, :],
                    mask=rmask[:, None] & pmask[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
    # The saved LSE is natural-log, so the logits are too: S - lse is formed in natural units
    # and only the (small) difference is scaled by log2(e) for exp2. Converting lse itself to
    # log2 units would add a rounding of ~ulp(lse) to every probability (a 3-8x larger
    # dL/dtau error than plain fp32 PyTorch where that sum cancels, e.g. D = 1).
    inv_tau = tl.div_rn(1.0, tl.load(temp_ptr).to(tl.float32))
    r_i = _norm_factor(r_ptr, rows, M, NORMALIZE)
    lse_i = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g_i = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    tgt = tl.where(rows < N, rows + N, rows - N)
    lo1, hi1, lo2, hi2 = _target_range(i0, N, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_DP], tl.float32)
    j_begin = pid_s * TILES_PER_SPLIT * BLOCK_N
    j_end = tl.minimum(j_begin + TILES_PER_SPLIT * BLOCK_N, M)
    for j0 in range(j_begin, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < M
        # 1. [Recompute] S_IJ (1 eq per D-panel over the whole backward).
        v = tl.load(zhat_ptr + cols[:, None] * D + pcol[None, :],
                    mask=cmask[:, None] & pmask[None, :], other=0.0)
        if DOT_FP32:
            vf = v.to(tl.float32)
        else:
            vf = v
        if ONE_CHUNK:
            s = tl.dot(q, tl.trans(vf), input_precision=INPUT_PRECISION)
        else:
            s = _similarity_k_loop(zhat_ptr, rows, cols, M, D, DOT_FP32, INPUT_PRECISION,
                                   BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
        r_j = _norm_factor(r_ptr, cols, M, NORMALIZE)
        s = _logits(s, r_i, r_j, inv_tau, NORMALIZE)
        lse_j = tl.load(lse_ptr + cols, mask=cmask, other=0.0)
        g_j = tl.load(g_ptr + cols, mask=cmask, other=0.0)
        # 2. [G + G^T] both softmaxes of the symmetric S: row i's and row j's (2 exp2).
        p = (g_i[:, None] * tl.exp2((s - lse_i[:, None]) * LOG2E)
             + g_j[None, :] * tl.exp2((s - lse_j[None, :]) * LOG2E))
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
        # 4. [dZhat_I += (K r_J) zs_J] 2 BLOCK_M BLOCK_N BLOCK_DP FLOPs on the tensor cores;
        #    r_j is folded into K in fp32, so the only rounding is K r_J's to the input dtype.
        if NORMALIZE:
            p = p * r_j[None, :]
        pk = round_cast(p, v.dtype)
        if DOT_FP32:
            pk = pk.to(tl.float32)
        acc = tl.dot(pk, vf, acc, input_precision=INPUT_PRECISION)
    out = (pid_s * M + rows)[:, None] * D + pcol[None, :]
    tl.store(dpart_ptr + out, acc, mask=rmask[:, None] & pmask[None, :])


@triton.jit
def ntxent_bwd_epilogue_kernel(dpart_ptr, zhat_ptr, norm_ptr, rs_ptr, temp_ptr, gscale_ptr,
                               dz1_ptr,
                               dz2_ptr, dots_ptr, N, D, SPLITS, NORMALIZE: tl.constexpr,
                               UNSCALE: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_D: tl.constexpr):
    # reads 2 (SPLITS M D fp32 + M D) + M; writes M D (input dtype) + M fp32. Two passes over
    # D in chunks (the row's zhat . dZhat is needed before any dZ of the row).
    M = 2 * N
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dcol = tl.arange(0, BLOCK_D)
    rmask = rows < M
    inv_tau = tl.div_rn(1.0, tl.load(temp_ptr).to(tl.float32))
    if UNSCALE:
        inv_tau = inv_tau / tl.load(gscale_ptr)  # power of two: exact
    norm = tl.load(norm_ptr + rows, mask=rmask, other=1.0)
    r = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.maximum(norm, NORM_EPS))
    if NORMALIZE:  # zhat = zs r_s in fp32 (r_s: the prologue's r, for the scaled rows zs)
        rs = tl.load(rs_ptr + rows, mask=rmask, other=0.0)
    else:
        rs = tl.full([BLOCK_R], 1.0, tl.float32)
    # 1. [zhat . dZhat] per row, summing the splits' partials in split order.
    dot = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dcol
        mask = rmask[:, None] & (cols < D)[None, :]
        off = rows[:, None] * D + cols[None, :]
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for s in range(SPLITS):  # fixed order: deterministic
            acc += tl.load(dpart_ptr + s * M * D + off, mask=mask, other=0.0)
        zh = tl.load(zhat_ptr + off, mask=mask, other=0.0).to(tl.float32) * rs[:, None]
        dot += tl.sum(zh * (acc * inv_tau), axis=1)
    tl.store(dots_ptr + rows, dot, mask=rmask)
    # 2. [Normalisation gradient] d/dz of z / max(|z|, eps): r (dZhat - zhat (zhat . dZhat));
    #    r dZhat where the norm was clamped.
    clamped = norm < NORM_EPS
    first = rows < N
    r1 = tl.where(first, rows, 0)
    r2 = tl.where(first, 0, rows - N)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dcol
        mask = rmask[:, None] & (cols < D)[None, :]
        off = rows[:, None] * D + cols[None, :]
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for s in range(SPLITS):
            acc += tl.load(dpart_ptr + s * M * D + off, mask=mask, other=0.0)
        dzh = acc * inv_tau
        if NORMALIZE:
            zh = tl.load(zhat_ptr + off, mask=mask, other=0.0).to(tl.float32) * rs[:, None]
            dz = tl.where(clamped[:, None], dzh, dzh - zh * dot[:, None]) * r[:, None]
        else:
            dz = dzh
        tl.store(dz1_ptr + r1[:, None] * D + cols[None, :],
                 round_cast(dz, dz1_ptr.dtype.element_ty), mask=mask & first[:, None])
        tl.store(dz2_ptr + r2[:, None] * D + cols[None, :],
                 round_cast(dz, dz2_ptr.dtype.element_ty), mask=mask & ~first[:, None])


# ---------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------

# Tiles per (arch, dtype, D-class), from the ahead-of-time sweep (`fastssl gpu-report
# --only nt_xent`, see the module header for the numbers). A pass's tile is
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the backward's adds BLOCK_DP, the
# width of its register accumulator (one D-panel). D-classes: "d64" (D <= 64), "d128",
# "d256" (one D-chunk: the row block and, in the backward, the accumulator hold all of D)
# and "wide" (D > 256: K-loop over D in the forward, D-panels in the backward).
D_CLASSES = (("d64", 64), ("d128", 128), ("d256", 256), ("wide", None))
FWD, BWD = "fwd", "bwd"


def _tile(fwd, bwd):
    return {FWD: dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), fwd)),
            BWD: dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_DP", "num_warps",
                           "num_stages"), bwd))}


def d_class(d: int) -> str:
    for name, limit in D_CLASSES:
        if limit is None or d <= limit:
            return name
    raise AssertionError


ROW_BLOCK = 8      # prologue / epilogue rows per program (memory-bound)
ROW_BLOCK_D = 128  # ... and the width of their D-chunks


def row_block_d(d: int) -> int:
    return min(ROW_BLOCK_D, max(16, next_pow2(d)))


def row_warps(block_d: int) -> int:
    """Warps of the prologue / epilogue: 2 for chunks of <= 64 columns (triton 3.6's ptxas
    spilled 12 bytes of the fp32 epilogue at 8 x 64 with 4 warps on sm_90; 2 warps: 0)."""
    return 2 if block_d <= 64 else 4
COMBINE_BLOCK = 256

# (arch, dtype) -> D-class -> (fwd tile, bwd tile), from the sweep in the module header;
# bf16 and fp16 share tiles. "small" variants for short batches (fewer tiles than SMs).
_HALF = {
    80: {"d64": ((128, 64, 64, 8, 3), (128, 32, 64, 64, 8, 3)),
         "d128": ((128, 64, 128, 8, 3), (64, 32, 128, 128, 4, 3)),
         "d256": ((64, 64, 256, 8, 2), (64, 32, 256, 256, 8, 2)),
         "wide": ((128, 64, 64, 8, 3), (64, 32, 64, 256, 8, 2))},
    90: {"d64": ((128, 64, 64, 8, 3), (128, 64, 64, 64, 8, 3)),
         "d128": ((128, 64, 128, 8, 3), (128, 64, 128, 128, 8, 3)),
         "d256": ((128, 64, 256, 8, 2), (64, 64, 256, 256, 8, 2)),
         "wide": ((128, 64, 64, 8, 3), (64, 32, 64, 256, 8, 2))},
}
_HALF_SMALL = ((64, 32, None, 4, 3), (64, 32, None, None, 4, 3))
_FP32 = {
    80: {"d64": ((64, 32, 64, 4, 2), (64, 16, 64, 64, 4, 2)),
         "d128": ((64, 32, 128, 4, 2), (32, 16, 128, 128, 4, 2)),
         "d256": ((128, 32, 32, 8, 3), (64, 16, 32, 128, 8, 2)),
         "wide": ((128, 32, 32, 8, 3), (64, 16, 32, 128, 8, 2))},
    90: {"d64": ((64, 64, 64, 4, 2), (64, 32, 64, 64, 4, 2)),
         "d128": ((64, 32, 128, 4, 2), (64, 16, 128, 128, 4, 2)),
         "d256": ((128, 32, 32, 8, 3), (64, 16, 32, 128, 4, 2)),
         "wide": ((128, 32, 32, 8, 3), (64, 16, 32, 128, 4, 2))},
}
TILE_TABLE = {(arch, ty): (_FP32 if ty == "fp32" else _HALF)[arch]
              for arch in (80, 90) for ty in ("fp32", "bf16", "fp16")}
# interpreter (tests): BLOCK_M != BLOCK_N on purpose, narrow D-chunks and D-panels so that
# small test widths already take the K-loop, ragged chunks and several panels.
_INTERPRET_TILE = ((64, 32, 32, 4, 1), (64, 32, 32, 64, 4, 1))


def _arch(cap: int) -> int:
    """The tile table an arch uses: Hopper and later -> 90, Ampere / Ada -> 80."""
    return 90 if cap >= 90 else 80


def pick_config(m: int, d: int, sms: int, dtype: torch.dtype = torch.bfloat16,
                cap: int = 90, interpret: bool = INTERPRET) -> dict:
    """Tiles, D-chunking and grid of both passes for 2N = ``m``, width ``d`` on a GPU with
    ``sms`` SMs of compute capability ``cap`` (e.g. 90).

    Returns ``{"name", "fwd": {...}, "bwd": {...}}``; each pass dict holds ``BLOCK_M, BLOCK_N,
    BLOCK_K, num_warps, num_stages, ONE_CHUNK, EVEN_K, row_blocks, splits, tiles_per_split``
    (the backward also ``BLOCK_DP, panels``); the forward grid is ``(row_blocks, splits)``,
    the backward's ``(row_blocks, splits * panels)``. Columns are split only when the row
    blocks (times the D-panels) alone are fewer than the SMs; every split is non-empty.
    """
    ty = TL_TYPE[dtype]
    dcls = d_class(d)
    if interpret:
        name, (fwd, bwd) = "interpret", _INTERPRET_TILE
        if d <= fwd[2]:
            dcls = "one"
    else:
        fwd, bwd = TILE_TABLE[(_arch(cap), ty)][dcls]
        name = f"sm_{_arch(cap)}/{ty}/{dcls}"
        if ty != "fp32" and dcls in ("d64", "d128"):
            bm, bn = fwd[:2]
            if triton.cdiv(m, bm) * triton.cdiv(m, bn) < sms:
                fwd = _HALF_SMALL[0][:2] + (fwd[2],) + _HALF_SMALL[0][3:]
                bwd = _HALF_SMALL[1][:2] + bwd[2:4] + _HALF_SMALL[1][4:]
                name += "/small"
    one = dcls != "wide" and not (ty == "fp32" and dcls == "d256")
    if dcls == "one":
        one = True
    out = dict(name=name)
    for pass_, tile in ((FWD, fwd), (BWD, bwd)):
        c = _tile(fwd, bwd)[pass_]
        if one:  # the whole row in one chunk (and, backward, one panel): BLOCK_K = pow2(D)
            width = max(16, next_pow2(d))
            c["BLOCK_K"] = width
            if pass_ == BWD:
                c["BLOCK_DP"] = width
        c["ONE_CHUNK"] = one
        c["EVEN_K"] = d % c["BLOCK_K"] == 0
        panels = triton.cdiv(d, c["BLOCK_DP"]) if pass_ == BWD else 1
        if pass_ == BWD:
            c["panels"] = panels
        row_blocks, tiles = triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(m, c["BLOCK_N"])
        base = row_blocks * panels
        splits = 1 if base >= sms else min(tiles, triton.cdiv(sms, base))
        per = triton.cdiv(tiles, splits)
        c.update(row_blocks=row_blocks, splits=triton.cdiv(tiles, per), tiles_per_split=per)
        out[pass_] = c
    return out


# ---------------------------------------------------------------------------------------
# Launchers (the CUDA kernels of fastssl::ntxent_fwd / fastssl::ntxent_bwd)
# ---------------------------------------------------------------------------------------


def _device_cap(device: torch.device) -> int:
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _check(z1: torch.Tensor, z2: torch.Tensor, temperature: torch.Tensor) -> None:
    if z1.dtype not in TL_TYPE or z2.dtype != z1.dtype:
        raise TypeError(f"ntxent (triton): z1 and z2 must share one dtype of float32, bfloat16 "
                        f"or float16, got {z1.dtype} and {z2.dtype}")
    if z1.dim() != 2 or z1.shape != z2.shape or z1.shape[0] < 1 or z1.shape[1] < 1:
        raise ValueError(f"ntxent (triton): z1 and z2 must be (N, D) with N, D >= 1 and equal "
                         f"shapes, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature.numel() != 1 or temperature.dtype != torch.float32 \
            or temperature.device != z1.device:
        raise ValueError("ntxent (triton): temperature must be a one-element float32 tensor on "
                         f"{z1.device}, got {temperature.dtype} {tuple(temperature.shape)} on "
                         f"{temperature.device}")


def ntxent_fwd_cuda(z1: torch.Tensor, z2: torch.Tensor, temperature: torch.Tensor,
                    normalize: bool, decoupled: bool):
    """Forward of ``fastssl::ntxent_fwd`` on CUDA (or CPU tensors under the interpreter).

    Args:
        z1, z2: (N, D) fp32 / bf16 / fp16, same device, any strides, any D >= 1.
        temperature: one-element fp32 tensor on the same device, read by the kernels through
            its pointer (no host sync).
        normalize, decoupled: as in :func:`fastssl.nt_xent`.
    Returns:
        loss (2N,) in the input dtype; lse (2N,) fp32, natural-log LSE of each row's masked
        logits; "zhat" (2N, D) in the input dtype, the tensor-core operand zs: the raw rows
        scaled by a power of two 2^-e per row (max |zs| in [0.5, 1)), or the raw rows when
        ``normalize`` is False; norms (2N,) fp32, the raw L2 row norms 2^e |zs|,
        overflow-safe. A row holding inf/NaN has a NaN norm and NaN zhat,
        and makes every loss and lse NaN (as the C++ kernel does).
    """
    _check(z1, z2, temperature)
    n, d = z1.shape
    m = 2 * n
    dev, dtype = z1.device, z1.dtype
    cfg = pick_config(m, d, num_sms(dev), dtype, _device_cap(dev))
    zhat = torch.empty((m, d), device=dev, dtype=dtype)
    norms = torch.empty((m,), device=dev, dtype=torch.float32)
    r = torch.empty((m,), device=dev, dtype=torch.float32)
    ntxent_prologue_kernel[(triton.cdiv(m, ROW_BLOCK),)](
        z1, z2, zhat, norms, r, n, d, z1.stride(0), z1.stride(1), z2.stride(0), z2.stride(1),
        NORMALIZE=normalize, BLOCK_R=ROW_BLOCK, BLOCK_D=row_block_d(d),
        num_warps=row_warps(row_block_d(d)))
    fc = cfg[FWD]
    splits = fc["splits"]
    part = torch.empty((3, splits, m), device=dev, dtype=torch.float32)
    ntxent_fwd_kernel[(fc["row_blocks"], splits)](
        zhat, r, temperature, part[0], part[1], part[2], n, d, fc["tiles_per_split"],
        NORMALIZE=normalize, DECOUPLED=decoupled, DOT_FP32=dot_in_fp32(dtype), INPUT_PRECISION=dot_precision(dtype),
        BLOCK_M=fc["BLOCK_M"], BLOCK_N=fc["BLOCK_N"], BLOCK_K=fc["BLOCK_K"],
        ONE_CHUNK=fc["ONE_CHUNK"], EVEN_K=fc["EVEN_K"], num_warps=fc["num_warps"],
        num_stages=fc["num_stages"])
    lse = torch.empty((m,), device=dev, dtype=torch.float32)
    loss = torch.empty((m,), device=dev, dtype=dtype)
    ntxent_fwd_combine_kernel[(triton.cdiv(m, COMBINE_BLOCK),)](
        part[0], part[1], part[2], lse, loss, m, splits, BLOCK=COMBINE_BLOCK)
    return loss, lse, zhat, norms


def ntxent_bwd_cuda(grad_loss: torch.Tensor, zhat: torch.Tensor, norms: torch.Tensor,
                    lse: torch.Tensor, temperature: torch.Tensor, normalize: bool,
                    decoupled: bool, dtype: torch.dtype):
    """Backward of ``fastssl::ntxent_bwd`` on CUDA (or CPU tensors under the interpreter).

    Args:
        grad_loss: (2N,) any float dtype; zhat, norms, lse: ``ntxent_fwd_cuda``'s outputs;
        temperature: the forward's one-element fp32 tensor; dtype: the input dtype.
    Returns:
        dz1, dz2 (N, D) in ``dtype``; dtemperature, fp32, shaped like ``temperature``. The
        normalisation gradient uses zhat = zs r_s (r_s recovered from zs and norms, equal to
        the forward's) and r = 1 / max(norm, 1e-12), not z1 / z2.
    """
    m, d = zhat.shape
    n = m // 2
    dev = zhat.device
    zhat = zhat.contiguous()
    cfg = pick_config(m, d, num_sms(dev), zhat.dtype, _device_cap(dev))
    g = grad_loss.to(torch.float32).contiguous()
    unscale = zhat.dtype == torch.float16
    gscale = None
    if unscale:  # device-side: no host sync
        gmax = g.abs().amax().clamp_min(1e-30)
        gscale = torch.exp2(torch.floor(torch.log2(FP16_G_TARGET / gmax))).reshape(1)
        g = g * gscale
    bc = cfg[BWD]
    splits, panels = bc["splits"], bc["panels"]
    if normalize:  # the prologue's r, recovered exactly from (zs, norms)
        r = torch.empty((m,), device=dev, dtype=torch.float32)
        ntxent_rscale_kernel[(triton.cdiv(m, ROW_BLOCK),)](
            zhat, norms, r, m, d, BLOCK_R=ROW_BLOCK, BLOCK_D=row_block_d(d),
            num_warps=row_warps(row_block_d(d)))
    else:
        r = norms  # not read (NORMALIZE=False)
    dpart = torch.empty((splits, m, d), device=dev, dtype=torch.float32)
    ntxent_bwd_kernel[(bc["row_blocks"], splits * panels)](
        zhat, r, temperature, lse, g, dpart, n, d, bc["tiles_per_split"], panels,
        NORMALIZE=normalize, DECOUPLED=decoupled, DOT_FP32=dot_in_fp32(zhat.dtype),
        INPUT_PRECISION=dot_precision(zhat.dtype), BLOCK_M=bc["BLOCK_M"],
        BLOCK_N=bc["BLOCK_N"], BLOCK_K=bc["BLOCK_K"], BLOCK_DP=bc["BLOCK_DP"],
        ONE_CHUNK=bc["ONE_CHUNK"], EVEN_K=bc["EVEN_K"], num_warps=bc["num_warps"],
        num_stages=bc["num_stages"])
    dz1 = torch.empty((n, d), device=dev, dtype=dtype)
    dz2 = torch.empty((n, d), device=dev, dtype=dtype)
    dots = torch.empty((m,), device=dev, dtype=torch.float32)
    ntxent_bwd_epilogue_kernel[(triton.cdiv(m, ROW_BLOCK),)](
        dpart, zhat, norms, r, temperature, gscale if unscale else temperature, dz1, dz2, dots,
        n, d, splits, NORMALIZE=normalize, UNSCALE=unscale, BLOCK_R=ROW_BLOCK,
        BLOCK_D=row_block_d(d), num_warps=row_warps(row_block_d(d)))
    # dL/dtau = -(1 / (2 tau)) sum_a zhat_a . dZhat_a (a fixed-order device reduction).
    dtemp = (-dots.sum() / (2.0 * temperature.reshape(()))).reshape(temperature.shape)
    return dz1, dz2, dtemp


# ---------------------------------------------------------------------------------------
# The op: schemas, fake, autograd (one for both devices), the Triton CUDA kernels
# ---------------------------------------------------------------------------------------
#
# Saved-tensor contract: ntxent_fwd returns (loss (2N,) in the input dtype, lse (2N,) fp32
# natural-log LSE, zhat (2N, D), norms (2N,) fp32 raw L2 row norms |z| on both devices) and
# ntxent_bwd consumes (zhat, norms, lse) from the same device's forward. "zhat" is the
# operand the device's kernel multiplies, in :func:`zhat_dtype` (the fake uses it too):
# - CPU (C++ kernel): fp32 normalised rows z / max(|z|, 1e-12).
# - CUDA (Triton; CPU inside triton_on_cpu): the input dtype, holding zs = z 2^-e, the raw
#   rows scaled exactly by a per-row power of two (max |zs| in [0.5, 1); zero / subnormal-max
#   rows e = -125), or z itself when normalize is False. The normalised row is zs r with
#   r = 1 / max(|zs|, 1e-12 2^-e) in fp32; the backward recomputes |zs| and 2^e = norms / |zs|
#   (an exact power of two) from the saved pair, so no extra saved tensor is needed.

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


AOT_DS = (64, 128, 256, 512, 768, 1024)
AOT_ARCHS = (80, 90)


def _aot_entries() -> list:
    """Every (kernel, arch, dtype, D, config) the launchers use on a GPU, at the widths of
    ``AOT_DS``: the tile kernels once per arch (their tiles are per arch), with the short-batch
    "small" tiles where they exist; the O(M D) kernels once for both archs. Entries that compile
    to the same configuration (e.g. D = 512 / 768 / 1024 share the "wide" tiles) are compiled
    once by ``fastssl gpu-report`` (its cache is keyed by configuration)."""
    entries = []
    ptr_f32 = "fp32"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for d in AOT_DS:
            for arch in AOT_ARCHS:
                plans = {"": pick_config(65536, d, 132, dtype, arch, interpret=False)}
                small = pick_config(512, d, 132, dtype, arch, interpret=False)
                if small["name"].endswith("/small"):
                    plans["small"] = small
                for tag, cfg in plans.items():
                    fc, bc = cfg[FWD], cfg[BWD]
                    common = dict(NORMALIZE=True, DECOUPLED=False, DOT_FP32=False,
                                  INPUT_PRECISION="bf16x3" if dtype == torch.float32 else "ieee")
                    entries.append(aot_entry(
                        ntxent_fwd_kernel, op="nt_xent", dtype=dtype, D=d, arch=arch, tag=tag,
                        pointers=dict(zhat_ptr=dtype, r_ptr=ptr_f32, temp_ptr=ptr_f32,
                                      mpart_ptr=ptr_f32,
                                      lpart_ptr=ptr_f32, ppart_ptr=ptr_f32),
                        constexprs=dict(common, **{k: fc[k] for k in (
                            "BLOCK_M", "BLOCK_N", "BLOCK_K", "ONE_CHUNK", "EVEN_K")}),
                        tensor_cores=True, num_warps=fc["num_warps"],
                        num_stages=fc["num_stages"]))
                    entries.append(aot_entry(
                        ntxent_bwd_kernel, op="nt_xent", dtype=dtype, D=d, arch=arch, tag=tag,
                        pointers=dict(zhat_ptr=dtype, r_ptr=ptr_f32, temp_ptr=ptr_f32,
                                      lse_ptr=ptr_f32,
                                      g_ptr=ptr_f32, dpart_ptr=ptr_f32),
                        constexprs=dict(common, **{k: bc[k] for k in (
                            "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_DP", "ONE_CHUNK",
                            "EVEN_K")}),
                        tensor_cores=True, num_warps=bc["num_warps"],
                        num_stages=bc["num_stages"]))
            block_d = row_block_d(d)
            entries.append(aot_entry(
                ntxent_prologue_kernel, op="nt_xent", dtype=dtype, D=d,
                pointers=dict(z1_ptr=dtype, z2_ptr=dtype, zs_ptr=dtype, norm_ptr=ptr_f32,
                              r_ptr=ptr_f32),
                constexprs=dict(NORMALIZE=True, BLOCK_R=ROW_BLOCK, BLOCK_D=block_d),
                tensor_cores=False, num_warps=row_warps(block_d), num_stages=1))
            entries.append(aot_entry(
                ntxent_rscale_kernel, op="nt_xent", dtype=dtype, D=d,
                pointers=dict(zs_ptr=dtype, norm_ptr=ptr_f32, r_ptr=ptr_f32),
                constexprs=dict(BLOCK_R=ROW_BLOCK, BLOCK_D=block_d),
                tensor_cores=False, num_warps=row_warps(block_d), num_stages=1))
            entries.append(aot_entry(
                ntxent_bwd_epilogue_kernel, op="nt_xent", dtype=dtype, D=d,
                pointers=dict(dpart_ptr=ptr_f32, zhat_ptr=dtype, norm_ptr=ptr_f32,
                              rs_ptr=ptr_f32, temp_ptr=ptr_f32, gscale_ptr=ptr_f32, dz1_ptr=dtype,
                              dz2_ptr=dtype, dots_ptr=ptr_f32),
                constexprs=dict(NORMALIZE=True, UNSCALE=dtype == torch.float16,
                                BLOCK_R=ROW_BLOCK, BLOCK_D=block_d),
                tensor_cores=False, num_warps=row_warps(block_d), num_stages=1))
        entries.append(aot_entry(
            ntxent_fwd_combine_kernel, op="nt_xent", dtype=dtype, D=None,
            pointers=dict(mpart_ptr=ptr_f32, lpart_ptr=ptr_f32, ppart_ptr=ptr_f32,
                          lse_ptr=ptr_f32, loss_ptr=dtype),
            constexprs=dict(BLOCK=COMBINE_BLOCK), tensor_cores=False, num_warps=4,
            num_stages=1))
    return entries


AOT_KERNELS = _aot_entries()


# ---------------------------------------------------------------------------------------
# Work counts (for `fastssl gpu-report`'s roofline estimates)
# ---------------------------------------------------------------------------------------


def _pass(flops, exps, nbytes) -> dict:
    return dict(flops=int(flops), exps=int(exps), bytes=int(nbytes))


def _total(passes: dict) -> dict:
    out = {k: sum(p[k] for p in passes.values()) for k in ("flops", "exps", "bytes")}
    out["passes"] = passes
    return out


def work_fused(m: int, d: int, elem_bytes: int = 2) -> dict:
    """FLOPs, exps and HBM bytes of this module's fwd + bwd at 2N = m, width d, on an H100's
    bf16 tiles (see the header): ``{"flops", "exps", "bytes", "passes": {"fwd", "bwd"}}``.
    The backward's S recompute and its exps repeat once per D-panel."""
    panels = pick_config(m, d, 132, torch.bfloat16, 90, interpret=False)[BWD]["panels"]
    eq = 2 * m * m * d
    md, b = m * d, elem_bytes
    # fwd: prologue reads z, writes zhat + norms; the tile pass reads zhat once from HBM (its
    # re-reads hit L2); partial stats, lse and loss are O(M).
    fwd = _pass(eq, m * m, 3 * md * b + m * (32 + b))
    # bwd: tiles read zhat (once per panel), lse, g; write fp32 partials; the epilogue reads
    # them and zhat, writes dz and the per-row dots.
    bwd = _pass((panels + 1) * eq, 2 * m * m * panels,
                (panels + 2) * md * b + 8 * md + 16 * m)
    return _total(dict(fwd=fwd, bwd=bwd))


def work_eager_reference(m: int, d: int, elem_bytes: int = 2) -> dict:
    """FLOPs, exps and HBM bytes of ``fastssl.reference.nt_xent`` fwd + bwd in eager PyTorch,
    counting each kernel's M^2 reads and writes (the O(M D) traffic is negligible)."""
    mm = m * m
    b = elem_bytes
    fwd_passes = [  # (name, reads, writes) in units of M^2 elements
        ("z @ z.T", 0, 1),
        ("/ temperature", 1, 1),
        ("eye mask", 0, 1 / b),            # bool
        ("masked_fill", 1 + 1 / b, 1),
        ("logsumexp", 1, 0),
    ]
    bwd_passes = [
        ("logsumexp backward", 1, 1),      # exp(x - lse) * g
        ("masked_fill backward", 1 + 1 / b, 1),
        ("div backward", 1, 1),
        ("matmul backward (dS Z, dS^T Z)", 2, 0),
    ]
    eq = 2 * mm * d
    fwd = _pass(eq, mm, sum(r + w for _, r, w in fwd_passes) * mm * b)
    bwd = _pass(2 * eq, mm, sum(r + w for _, r, w in bwd_passes) * mm * b)
    return _total(dict(fwd=fwd, bwd=bwd))


# (2N, D) of the roofline rows: the headline shape, and the widest D of the sweep.
ESTIMATE_SHAPES = ((65536, 128), (65536, 1024))

