r"""Triton "rows vs columns" contrastive engine: rows Q (M x D) against columns C (NC x D),
``S_ij = scale rq_i rc_j (q_i . c_j)``, never stored (rq, rc: optional fp32 per-row / column
multipliers, e.g. inverse norms of raw rows; default ones). Shared by info_nce / clip_loss / supcon / the fused
gather losses (the op files call :func:`row_lse` and :func:`softmax_grad`; they normalise, save
tensors, multiply gradients by the scale and register the ops).

Kernels
-------
* :func:`row_lse` -- ``_row_lse_kernel``: program (row block I, column split s) streams the
  column tiles of split s: S tile by a K-loop over D (``tl.dot`` per D-chunk, fp32
  accumulation), the target logit ``pos`` read from that same tile, then the masks (ragged
  columns, diagonal, self index, target with ``mask_target``), then the online (max, sum)
  (flash-attention forward without an output). Per-split partials (3 x splits x M fp32) are
  merged by ``_lse_combine_kernel`` in split order.
* :func:`softmax_grad` -- ``_softmax_grad_kernel``: ``sum_j (P_ij rc_j) c_j`` with, in fp32,
      P_ij = g_i (valid_ij exp(S_ij - lse_i) - [j = t_i]) + h_j (valid_ij exp(S_ij - clse_j)
             - [i = ct_j])                                   (either term optional)
  The -g_i / -h_j of the targets are folded into P in fp32 *before* P is rounded to the dot
  dtype: the target's probability 1 - eps would otherwise cancel after rounding (fp16 CLIP,
  B = 37, confident pairs: 4.8e-2 relative error in dI when the fold came after the cast).
  A row whose lse is -inf (no valid column) / a column whose clse is -inf gets weight 0 and
  lse +inf, so every entry is exp(-inf) = 0 (never 0 * exp(+inf)), at no per-element cost. Per-split partials (splits x M x D fp32; with one
  split, the output itself) are added in split order by ``_sum_splits_kernel``. The column-side
  gradient is this kernel with rows and columns swapped (P^T has the same form): no atomics.
* fp16: P rc is multiplied by a power of two ``2^14 / (max(|g|, |h|) max|rc|)`` (computed on
  the device, no host sync; |P_ij rc_j| <= 2 max(|g|, |h|) max|rc| stays <= 2^15), undone
  exactly on the output: with mean reduction over 65,536 rows,
  g = 1.5e-5 would put every P entry below fp16's smallest normal (6.1e-5).

Masks cost only in the tiles they touch: the ragged-column mask in the last tile, the diagonal
in tiles crossing it, a self/target index only in tiles inside [min, max] of that row block's
(or column tile's) indices (scalar branches around tile work).

Width: any D. The S tile is a GEMM K-loop over D-chunks of BLOCK_D. The P @ C accumulator
(BLOCK_M x D fp32) stays in registers only while D <= BLOCK_D ("resident": one chunk; q and
the column tile are then loaded once per tile and used by both dots). Above that the program
accumulates its own (BLOCK_M, D) output rows chunk-wise in global memory: per column tile,
for each D-chunk, load the fp32 chunk (skipped on the split's first tile), add P @ C_chunk,
store; a CTA barrier per tile orders the store before the next tile's load. No atomics: the
program owns those rows. Why not tile the output D over the grid instead? Each output D-tile
would recompute the full-D S tile: FLOPs per (row, column) pair 2D (S) x T + 2D (P@C) with T =
D / BLOCK_D_out output tiles, i.e. (2T + 2) / 4 of the minimum: 1.5x at D = 512, 2.5x at
D = 1024 (BLOCK_D_out = 256), plus T x the exps. Chunk-wise accumulation keeps the minimum
4 D FLOPs and 1 exp per pair per term and adds 8 BLOCK_M D bytes (fp32 read + write) per
column tile against 4 BLOCK_M BLOCK_N D FLOPs: BLOCK_N / 2 FLOP per byte, served from L2
(the rows of one program: BLOCK_M x D x 4 = 256 KiB at D = 1024; 132 programs: 33 MiB < 50
MiB L2 of an H100). At BLOCK_M = BLOCK_N = 64, 16-bit inputs, the per-tile L2 traffic goes
from 384 D bytes (column tile read twice, q chunks re-read) to 896 D bytes, i.e. ~2.3x, with
no extra tensor-core work, and the grid (hence the column-split logic) is unchanged.

Grid: (cdiv(M, BLOCK_M), splits). Columns are split only when the row blocks alone are fewer
than the SMs (``_triton_utils.num_sms``): splits = cdiv(tiles, cdiv(tiles, cdiv(sms,
row_blocks))), every split non-empty; partials are bounded by ~(sms + row_blocks) BLOCK_M D 4
bytes (35 MB at D = 1024 on 132 SMs). All merges run in a fixed order: bitwise reproducible
for a given shape and GPU.
Counts: ``row_lse`` 2 M NC D FLOPs (x3 products for fp32 bf16x3), M NC exp; ``softmax_grad``
4 M NC D FLOPs, M NC exp per present term.

Precision: fp32 accumulation everywhere; 16-bit inputs are tensor-core operands as given. With
raw rows (exact in the dtype, e.g. power-of-two scaled) and their fp32 inverse norms as rq / rc,
S carries only fp32 error: the factors multiply the fp32 dot result, and rc_j is folded into P
in fp32 before P's one rounding, so the dot with the raw c tile is exact up to that rounding
(normalised rows rounded to bf16 cost ~2^-9 |S| in S: at scale 100, 1.06 relative error in the
gradient of tests/test_contrastive_core_triton.py::test_rq_rc_precision_clustered_tau_001 vs
1.3e-2 with raw rows, fp16 4.6e-2 vs 1.6e-3: P's rounding alone). P is
rounded to the input dtype with :func:`fastssl.ops._triton_utils.round_cast` (round to nearest
even, also under the interpreter, which would truncate to bf16), and under the interpreter bf16
operands reach ``tl.dot`` as exact fp32 (``dot_in_fp32``: its bf16 dot multiplies raw bit
patterns, triton-lang/triton#11584) -- so the interpreter tests see the GPU's error. fp32 inputs: ``tl.dot(input_precision=...)`` from
``FASTSSL_FP32_DOT`` (default "bf16x3", accepted by the NVIDIA backends of triton 3.6 and 3.9:
``allowed_dot_input_precisions`` of both lists tf32, tf32x3, ieee, bf16x3, bf16x6).

Tiles (``TILES``): BLOCK_M x BLOCK_N x BLOCK_D, warps / stages, per (arch, dtype, D bucket),
picked from ``scripts/sweep_contrastive_core.py`` (triton 3.9: ``triton.compile`` for
GPUTarget("cuda", 80 / 90, 32), Triton's ptxas -v, ``cuobjdump -res-usage``) on the
register-heaviest flag variant (every mask and both P terms). Every row below: 0 spill bytes,
shared memory within the limit (sm_80: 166,912 B; sm_90: 232,448 B), tensor cores (sm_80:
mma.sync; sm_90: wgmma.mma_async in every kernel), with triton 3.9 AND 3.6 (registers /
shared bytes below: 3.9). Re-measured with the rq / rc factors: benchmarks/results/
contrastive_core_tile_sweep_rqrc.jsonl (3.9), ..._rqrc_triton36.jsonl (3.6).

    arch  dtype      D     row_lse (regs, smem B)           softmax_grad (regs, smem B)
    sm_80 bf16/fp16  64    64x64x64   4/3 (224, 16384)      64x32x64   8/3 (255, 19200)
                     128   64x64x128  4/3 (168, 20480)      64x32x64ch 8/3 (255, 24576)
                     256   64x64x256  8/2 (168, 49152)      64x32x64ch 8/3 (255, 24576)
                     >256  64x64x64ch 8/3 (248, 16384)      64x32x64ch 8/3 (255, 24576)
    sm_80 fp32       64    64x32x64   4/2 (180, 24576)      64x16x64   8/2 (230, 21184)
                     >64   64x64x32ch 8/2 (255, 16384)      64x32x32ch 8/2 (236, 12288)
    sm_90 bf16/fp16  64    64x64x64   4/3 (128, 16384)      64x32x64   4/3 (254-5, 16384)
                     128   64x64x128  4/3 (147, 32768)      64x64x128  8/2 (255, 43776)
                     256   64x64x256  8/2 (142, 65536)      64x64x64ch 8/3 (255, 32768)
                     >256  128x64x64ch 8/3 (254, 24576)     64x64x64ch 8/3 (255, 32768)
    sm_90 fp32       64    64x32x64   4/2 (119, 32768)      64x32x64   8/2 (190, 42368)
                     128   64x32x128  8/2 (120, 65536)      64x16x128  8/2 (240, 53952)
                     256   64x16x256  8/2 (202, 98304)      64x64x32ch 8/2 (247, 32768)
                     >256  64x64x32ch 8/2 (205, 24576)      64x64x32ch 8/2 (247, 32768)

What the sweep rejected (spill bytes): sm_80 fp32 resident D = 128 (LSE 64x32x128 8 warps
144, gradient 64x16x128 92) and sm_90 16-bit resident gradient at D = 256 (64x32x256 8 warps
368, 64x64x256 708): those buckets use the chunked tiles. With the rq / rc factors the sm_80
16-bit resident gradient spilled too (D = 128: 64x32x128 8/2 36 B, 8/1 24-36, 4/2 12,
64x16x128 8/2 48, 64x64x128 8/2 36; D = 256: 64x32x256 8/2 12 B): sm_80 16-bit gradients
above D = 64 take the chunked tile (two / four 64-wide chunks: the output rows round-trip
through L2 per column tile, see "Width"). triton 3.6 with rq / rc also spilled in sm_80 16-bit
gradient 64x64x64 4/3 at D = 64 (156 B; 64x64x64 8/3: 12 B; 64x32x64 4/3: 72 B with 3.9)
and sm_90 fp32 LSE 64x32x256 8/2 (8 B; 8/1 too): now 64x32x64 8/3 and 64x16x256 8/2, 0 spills
with both versions. 4 warps spilled in most chunked
configurations (e.g. 16-bit gradient 64x64x64: 1,248 B sm_80, 1,912 B sm_90). fp32 uses
``FASTSSL_FP32_DOT``'s precision (default bf16x3: its operand halves double the register
footprint, hence the smaller tiles); the sweep compiled bf16x3. The table before rq / rc
compiled again with triton 3.6.0 (the GPU machine's): 0 spills, shared memory within the
limits, mma.sync / wgmma in all 48 (benchmarks/results/contrastive_core_tile_sweep*.jsonl).
Compiled only (no GPU here): the chunked-for-resident switches' speed is unmeasured. Other
sm_8x GPUs (86 / 89: 99 KiB shared per block) take the sm_80 table: its largest allocation is
49,152 B.
Under the interpreter: 16/32 x 32/16 x 64 tiles (BLOCK_M != BLOCK_N catches transposition
slips), ``num_sms`` = 16 so small test shapes take the column-split path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import aot_entry
from ._triton_utils import (INTERPRET, dot_in_fp32, dot_precision, merge_lse_partials, num_sms,
                            round_cast)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_CLASS = {torch.float32: "fp32", torch.bfloat16: "half", torch.float16: "half"}
# fp16 P pre-scale: max |P| <= |g| + |h| <= 2 max(|g|, |h|), so 2^14 keeps |P| <= 2^15 < 65504.
FP16_P_TARGET = 2.0 ** 14
COMBINE_BLOCK = 256   # rows per program of the LSE combine (memory-bound, O(splits M))
SUM_BLOCK_R = 8       # rows x SUM_BLOCK_D columns per program of the split sum
SUM_BLOCK_D = 128


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _load_rows(PTR, idx, inb, d0, D, stride, BLOCK_D: tl.constexpr, AS_FP32: tl.constexpr):
    """Rows ``idx`` of a (rows x D) matrix, columns [d0, d0 + BLOCK_D); 0 outside."""
    dd = d0 + tl.arange(0, BLOCK_D)
    x = tl.load(PTR + idx.to(tl.int64)[:, None] * stride + dd[None, :],
                mask=inb[:, None] & (dd < D)[None, :], other=0.0)
    if AS_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _similarity_chunked(Q, C, rows, cols, rmask, cmask, D, stride_q, stride_c,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        AS_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # GEMM K-loop: reads (BLOCK_M + BLOCK_N) D elements, 2 BLOCK_M BLOCK_N D FLOPs.
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        qk = _load_rows(Q, rows, rmask, d0, D, stride_q, BLOCK_D, AS_FP32)
        ck = _load_rows(C, cols, cmask, d0, D, stride_c, BLOCK_D, AS_FP32)
        acc = tl.dot(qk, tl.trans(ck), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _index_range(idx):
    """(min over entries >= 0, max) of an index vector; (2^31 - 1, -1) when all are -1."""
    lo = tl.min(tl.where(idx >= 0, idx, 2147483647), axis=0)
    hi = tl.max(idx, axis=0)
    return lo, hi


@triton.jit
def _load_index(IDX, pos, inb):
    """Indices ``IDX[pos]`` as int32 (-1 outside ``inb``) and their :func:`_index_range`.

    int32 compares in the tiles (indices < M, NC < 2^31): half the registers of int64; the
    range lets a tile skip the compare when no index falls in it."""
    idx = tl.load(IDX + pos, mask=inb, other=-1).to(tl.int32)
    lo, hi = _index_range(idx)
    return idx, lo, hi


@triton.jit
def _similarity_tile(q, Q, C, RC, row_fac, rows, cols, rmask, cmask, D, stride_q, stride_c,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     D_RESIDENT: tl.constexpr, DOT_FP32: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr):
    """[Similarity] the tile S = row_fac_i (Q C^T)_ij rc_j in fp32 (fp32 accumulation on the
    tensor cores), the column tile ``c`` (resident D only: the backward's P @ C reuses it;
    0.0 otherwise) and ``rc``. One expression for the forward and the backward's recompute:
    bit-identical logits."""
    if D_RESIDENT:
        c = _load_rows(C, cols, cmask, 0, D, stride_c, BLOCK_D, DOT_FP32)
        s = tl.dot(q, tl.trans(c), input_precision=INPUT_PRECISION)
    else:
        c = 0.0
        s = _similarity_chunked(Q, C, rows, cols, rmask, cmask, D, stride_q, stride_c,
                                BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, INPUT_PRECISION)
    rc = tl.load(RC + cols, mask=cmask, other=1.0)
    return s * row_fac[:, None] * rc[None, :], c, rc


@triton.jit
def _row_lse_kernel(Q, C, SCALE, RQ, RC, TARGET, SELF_IDX, MPART, LPART, PPART, M, NC, D,
                    stride_q, stride_c, TILES_PER_SPLIT,
                    HAS_TARGET: tl.constexpr, HAS_SELF: tl.constexpr,
                    MASK_TARGET: tl.constexpr, MASK_DIAG: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    D_RESIDENT: tl.constexpr, DOT_FP32: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    # reads BLOCK_M D (once if resident, per column tile if not) + the split's columns x D;
    # writes 3 BLOCK_M fp32 partials.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    i0 = pid_m * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    rmask = rows < M
    scale = tl.load(SCALE).to(tl.float32)
    # per-row factors of S in fp32 (scale folded into the row side: one multiply per row)
    row_fac = scale * tl.load(RQ + rows, mask=rmask, other=1.0)
    if HAS_TARGET:
        tgt, t_lo, t_hi = _load_index(TARGET, rows, rmask)
    if HAS_SELF:
        sidx, s_lo, s_hi = _load_index(SELF_IDX, rows, rmask)
    if D_RESIDENT:
        q = _load_rows(Q, rows, rmask, 0, D, stride_q, BLOCK_D, DOT_FP32)
    else:
        q = 0.0  # the chunked similarity reloads Q's chunks per column tile
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    j_begin = pid_s * TILES_PER_SPLIT * BLOCK_N
    j_end = tl.minimum(j_begin + TILES_PER_SPLIT * BLOCK_N, NC)
    for j0 in range(j_begin, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        # 1. [Similarity] S = scale (Q C^T).
        s, _c, _rc = _similarity_tile(q, Q, C, RC, row_fac, rows, cols, rmask, cmask, D,
                                      stride_q, stride_c, BLOCK_M, BLOCK_N, BLOCK_D, D_RESIDENT,
                                      DOT_FP32, INPUT_PRECISION)
        # 2. [Target] the positive logit from this very tile (the loss is lse - pos: both
        #    must come from the same rounding of S), before any mask.
        if HAS_TARGET:
            if (t_lo < j0 + BLOCK_N) & (t_hi >= j0):
                is_t = tgt[:, None] == cols[None, :]
                pos += tl.sum(tl.where(is_t, s, 0.0), axis=1)
                if MASK_TARGET:
                    s = tl.where(is_t, float("-inf"), s)
        # 3. [Masks] only the tiles they touch pay for them.
        if j0 + BLOCK_N > NC:
            s = tl.where(cmask[None, :], s, float("-inf"))
        if MASK_DIAG:
            if (j0 < i0 + BLOCK_M) & (i0 < j0 + BLOCK_N):
                s = tl.where(rows[:, None] == cols[None, :], float("-inf"), s)
        if HAS_SELF:
            if (s_lo < j0 + BLOCK_N) & (s_hi >= j0):
                s = tl.where(sidx[:, None] == cols[None, :], float("-inf"), s)
        # 4. [Online softmax] running max and sum; a row with nothing valid yet keeps -inf.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        m_i = m_new
    out = pid_s * M + rows
    tl.store(MPART + out, m_i, mask=rmask)
    tl.store(LPART + out, l_i, mask=rmask)
    tl.store(PPART + out, pos, mask=rmask)


@triton.jit
def _lse_combine_kernel(MPART, LPART, PPART, LSE, POS, M, SPLITS, BLOCK: tl.constexpr):
    # reads 3 SPLITS M fp32, writes 2 M fp32; split order fixed: deterministic.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = rows < M
    shift, total, pos = merge_lse_partials(MPART, LPART, PPART, rows, inb, M, SPLITS, False)
    lse = tl.where(total > 0, shift + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(LSE + rows, lse, mask=inb)
    tl.store(POS + rows, pos, mask=inb)


@triton.jit
def _softmax_grad_kernel(Q, C, SCALE, RQ, RC, PSCALE, G, LSE, TARGET, H, CLSE, CTARGET, SELF_IDX,
                         CSELF_IDX, OUT, M, NC, D, stride_q, stride_c, TILES_PER_SPLIT,
                         HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
                         HAS_TARGET: tl.constexpr, HAS_CTARGET: tl.constexpr,
                         HAS_SELF: tl.constexpr, HAS_CSELF: tl.constexpr,
                         MASK_TARGET: tl.constexpr, MASK_DIAG: tl.constexpr,
                         SCALE_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, D_RESIDENT: tl.constexpr,
                         DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # OUT: (splits, M, D) fp32, split s at OUT + s M D. Per column tile: reads BLOCK_N D
    # (twice if not resident) + BLOCK_M D (q, if not resident) elements, and if not resident
    # reads + writes BLOCK_M D fp32 of the program's own output rows.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    i0 = pid_m * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    rmask = rows < M
    out_base = OUT + pid_s.to(tl.int64) * M * D
    scale = tl.load(SCALE).to(tl.float32)
    row_fac = scale * tl.load(RQ + rows, mask=rmask, other=1.0)
    if SCALE_P:
        p_scale = tl.load(PSCALE).to(tl.float32)
    else:
        p_scale = 1.0
    if HAS_ROW:
        # A row with lse = -inf (no valid column) gets g = 0 and lse = +inf: exp(S - lse) = 0
        # and its target term 0, with no per-element test (never 0 * exp(+inf)).
        lse = tl.load(LSE + rows, mask=rmask, other=float("-inf"))
        row_ok = lse > float("-inf")
        g = tl.where(row_ok, tl.load(G + rows, mask=rmask, other=0.0) * p_scale, 0.0)
        lse = tl.where(row_ok, lse, float("inf"))
    if HAS_TARGET:
        tgt, t_lo, t_hi = _load_index(TARGET, rows, rmask)
    if HAS_SELF:
        sidx, s_lo, s_hi = _load_index(SELF_IDX, rows, rmask)
    if D_RESIDENT:
        q = _load_rows(Q, rows, rmask, 0, D, stride_q, BLOCK_D, DOT_FP32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    else:
        q = 0.0  # the chunked similarity reloads Q's chunks per column tile
    j_begin = pid_s * TILES_PER_SPLIT * BLOCK_N
    j_end = tl.minimum(j_begin + TILES_PER_SPLIT * BLOCK_N, NC)
    for j0 in range(j_begin, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        # 1. [Similarity] recompute the S tile (bit-identical to the forward's).
        s, c, rc = _similarity_tile(q, Q, C, RC, row_fac, rows, cols, rmask, cmask, D,
                                    stride_q, stride_c, BLOCK_M, BLOCK_N, BLOCK_D, D_RESIDENT,
                                    DOT_FP32, INPUT_PRECISION)
        # 2. [Masks] valid_ij, shared by both terms.
        valid = rmask[:, None] & cmask[None, :]
        if MASK_DIAG:
            if (j0 < i0 + BLOCK_M) & (i0 < j0 + BLOCK_N):
                valid = valid & (rows[:, None] != cols[None, :])
        if HAS_SELF:
            if (s_lo < j0 + BLOCK_N) & (s_hi >= j0):
                valid = valid & (sidx[:, None] != cols[None, :])
        if HAS_COL:
            clse = tl.load(CLSE + cols, mask=cmask, other=float("-inf"))
            col_ok = clse > float("-inf")
            h = tl.where(col_ok, tl.load(H + cols, mask=cmask, other=0.0) * p_scale, 0.0)
            clse = tl.where(col_ok, clse, float("inf"))
        if HAS_CSELF:
            csidx, cs_lo, cs_hi = _load_index(CSELF_IDX, cols, cmask)
            if (cs_lo < i0 + BLOCK_M) & (cs_hi >= i0):
                valid = valid & (csidx[None, :] != rows[:, None])
        if HAS_TARGET:
            t_hit = (t_lo < j0 + BLOCK_N) & (t_hi >= j0)
            if MASK_TARGET:
                if t_hit:
                    valid = valid & (tgt[:, None] != cols[None, :])
        if HAS_CTARGET:
            ctgt, ct_lo, ct_hi = _load_index(CTARGET, cols, cmask)
            ct_hit = (ct_lo < i0 + BLOCK_M) & (ct_hi >= i0)
            if MASK_TARGET:
                if ct_hit:
                    valid = valid & (ctgt[None, :] != rows[:, None])
        # 3. [P in fp32] masked entries are exp(-inf) = 0 (no inf is ever formed), then the
        #    targets' -g / -h folded in before any rounding.
        p = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_ROW:
            p += g[:, None] * tl.exp(tl.where(valid, s - lse[:, None], float("-inf")))
        if HAS_TARGET:
            if t_hit:
                p -= tl.where(tgt[:, None] == cols[None, :], g[:, None], 0.0)
        if HAS_COL:
            p += h[None, :] * tl.exp(tl.where(valid, s - clse[None, :], float("-inf")))
        if HAS_CTARGET:
            if ct_hit:
                p -= tl.where(ctgt[None, :] == rows[:, None], h[None, :], 0.0)
        # the output is sum_j (P_ij rc_j) c_j with the raw c: rc folded in fp32 before the
        # one rounding of P (rounding normalised rows instead would cost 16-bit error in S).
        p = p * rc[None, :]
        # 4. [P @ C] P rounded once to the dot dtype (RNE, as the GPU does, also under the
        #    interpreter); bf16 operands go to the interpreter's dot as (exact) fp32.
        pd = round_cast(p, C.dtype.element_ty)
        if DOT_FP32:
            pd = pd.to(tl.float32)
        if D_RESIDENT:
            acc = tl.dot(pd, c, acc, input_precision=INPUT_PRECISION)
        else:
            # the program owns these output rows: read-modify-write per D-chunk, no atomics;
            # the split's first tile starts from 0 instead of reading.
            last = j0 + BLOCK_N >= j_end
            # (a row vector, not a scalar: the interpreter's `2-D mask & scalar` is int32)
            not_first = (rows * 0 + j0) > j_begin
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                ck = _load_rows(C, cols, cmask, d0, D, stride_c, BLOCK_D, DOT_FP32)
                optr = out_base + rows.to(tl.int64)[:, None] * D + dd[None, :]
                omask = rmask[:, None] & (dd < D)[None, :]
                prev = tl.load(optr, mask=omask & not_first[:, None], other=0.0)
                o = tl.dot(pd, ck, prev, input_precision=INPUT_PRECISION)
                if SCALE_P:
                    o = o * tl.where(last, 1.0 / p_scale, 1.0)
                tl.store(optr, o, mask=omask)
            # the next tile's loads of these rows may run on other threads of the CTA.
            tl.debug_barrier()
    if D_RESIDENT:
        if SCALE_P:
            acc = acc * (1.0 / p_scale)  # a power of two: exact
        dd = tl.arange(0, BLOCK_D)
        tl.store(out_base + rows.to(tl.int64)[:, None] * D + dd[None, :], acc,
                 mask=rmask[:, None] & (dd < D)[None, :])


@triton.jit
def _sum_splits_kernel(PART, OUT, M, D, SPLITS, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # reads SPLITS BLOCK_R BLOCK_D fp32, writes BLOCK_R BLOCK_D; split order fixed.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < M)[:, None] & (dd < D)[None, :]
    off = rows.to(tl.int64)[:, None] * D + dd[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    part = PART + off  # advanced by one (M, D) split per step: 64-bit pointer arithmetic
    for _ in range(SPLITS):
        acc += tl.load(part, mask=mask, other=0.0)
        part += M * D
    tl.store(OUT + off, acc, mask=mask)


# ---------------------------------------------------------------------------------------
# Tiles and grid
# ---------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) per (arch, dtype class, D bucket) and
# kernel; the D bucket is the largest D the configuration serves with the accumulator resident
# (D <= BLOCK_D), "chunked" serves every larger D. Chosen by the sweep in the module docstring.
_CHUNKED = {
    (80, "half"): {"lse": (64, 64, 64, 8, 3), "grad": (64, 32, 64, 8, 3)},
    (90, "half"): {"lse": (128, 64, 64, 8, 3), "grad": (64, 64, 64, 8, 3)},
    (80, "fp32"): {"lse": (64, 64, 32, 8, 2), "grad": (64, 32, 32, 8, 2)},
    (90, "fp32"): {"lse": (64, 64, 32, 8, 2), "grad": (64, 64, 32, 8, 2)},
}
TILES = {
    "interpret": {"lse": (16, 32, 64, 4, 1), "grad": (32, 16, 64, 4, 1)},
    (80, "half", 64): {"lse": (64, 64, 64, 4, 3), "grad": _CHUNKED[80, "half"]["grad"]},
    (80, "half", 128): {"lse": (64, 64, 128, 4, 3), "grad": _CHUNKED[80, "half"]["grad"]},
    (80, "half", 256): {"lse": (64, 64, 256, 8, 2), "grad": _CHUNKED[80, "half"]["grad"]},
    (90, "half", 64): {"lse": (64, 64, 64, 4, 3), "grad": (64, 32, 64, 4, 3)},
    (90, "half", 128): {"lse": (64, 64, 128, 4, 3), "grad": (64, 64, 128, 8, 2)},
    (90, "half", 256): {"lse": (64, 64, 256, 8, 2), "grad": _CHUNKED[90, "half"]["grad"]},
    (80, "fp32", 64): {"lse": (64, 32, 64, 4, 2), "grad": (64, 16, 64, 8, 2)},
    (80, "fp32", 128): _CHUNKED[80, "fp32"],
    (80, "fp32", 256): _CHUNKED[80, "fp32"],
    (90, "fp32", 64): {"lse": (64, 32, 64, 4, 2), "grad": (64, 32, 64, 8, 2)},
    (90, "fp32", 128): {"lse": (64, 32, 128, 8, 2), "grad": (64, 16, 128, 8, 2)},
    (90, "fp32", 256): {"lse": (64, 16, 256, 8, 2), "grad": _CHUNKED[90, "fp32"]["grad"]},
    **{(arch, klass, "chunked"): cfg for (arch, klass), cfg in _CHUNKED.items()},
}
D_BUCKETS = (64, 128, 256)
SWEEP_D = (64, 128, 256, 512, 768, 1024)


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    # sm_90 and later: the sm_90 table (wgmma); sm_8x: the sm_80 table (its configs fit 99 KiB
    # of shared memory too, see the table).
    return 90 if major >= 9 else 80


def _bucket(d: int):
    for b in D_BUCKETS:
        if d <= b:
            return b
    return "chunked"


def tiles(kernel: str, dtype: torch.dtype, d: int, arch: int | None) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) of ``kernel`` ("lse" / "grad")
    for ``dtype`` at width ``d`` on ``sm_<arch>`` (None: the interpreter)."""
    if arch is None:
        return TILES["interpret"][kernel]
    return TILES[(arch, _DTYPE_CLASS[dtype], _bucket(d))][kernel]


def plan(m: int, nc: int, d: int, kernel: str, dtype: torch.dtype, sms: int,
         arch: int | None) -> dict:
    """Tiles and grid of ``kernel`` for M = ``m`` rows against ``nc`` columns of width ``d``
    on a GPU with ``sms`` SMs; the grid is ``(row_blocks, splits)``."""
    bm, bn, bd, warps, stages = tiles(kernel, dtype, d, arch)
    row_blocks, n_tiles = triton.cdiv(m, bm), max(1, triton.cdiv(nc, bn))
    splits = 1 if row_blocks >= sms else min(n_tiles, triton.cdiv(sms, row_blocks))
    per = triton.cdiv(n_tiles, splits)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, D_RESIDENT=d <= bd, num_warps=warps,
                num_stages=stages, row_blocks=row_blocks, splits=triton.cdiv(n_tiles, per),
                tiles_per_split=per)


# ---------------------------------------------------------------------------------------
# Launchers (plain functions: no autograd; the op files register the ops)
# ---------------------------------------------------------------------------------------


def _check_operands(q: torch.Tensor, c: torch.Tensor, scale: torch.Tensor) -> None:
    for name, t in (("q", q), ("c", c)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows x D), got shape {tuple(t.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if c.dtype != q.dtype:
        raise TypeError(f"q and c must have the same dtype, got {q.dtype} and {c.dtype}")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"q and c must have the same width D, got {tuple(q.shape)} and "
                         f"{tuple(c.shape)}")
    if q.device != c.device:
        raise ValueError(f"q and c must be on one device, got {q.device} and {c.device}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton contrastive core needs CUDA tensors (or TRITON_INTERPRET=1"
                         f" before import), got {q.device}")
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"scale must be a 1-element float32 tensor (read on the device, no host "
                        f"sync), got {type(scale).__name__}")
    if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != q.device:
        raise ValueError(f"scale must be a 0-dim or 1-element float32 tensor on {q.device}, got "
                         f"shape {tuple(scale.shape)} {scale.dtype} on {scale.device}")


def _check_vector(name: str, t, n: int, dtype: torch.dtype, device: torch.device):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t.contiguous()


def _no_index(device: torch.device) -> torch.Tensor:
    """An int64 stand-in for an absent index array (never read)."""
    return torch.empty(1, dtype=torch.int64, device=device)


def _launch_args(q: torch.Tensor, d: int, kernel: str, m: int, nc: int) -> dict:
    arch = _arch(q.device) if q.device.type == "cuda" else None
    return plan(m, nc, d, kernel, q.dtype, num_sms(q.device), arch)


def row_lse(q: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, *, rq=None, rc=None,
            target=None, self_idx=None, mask_target: bool = False, mask_diag: bool = False):
    r"""Row log-sum-exp and target logit of ``S_ij = scale rq_i rc_j (q_i . c_j)`` (S never
    stored).

    Args:
        q: (M, D) rows, fp32 / bf16 / fp16: L2-normalised, or raw rows with ``rq`` their
            fp32 inverse norms (then no 16-bit rounding of normalised rows enters S).
        c: (NC, D) columns, same dtype and device (``rc``: as ``rq``).
        scale: 0-dim or 1-element fp32 tensor on the device (read by the kernel).
        rq: (M,) fp32 row multipliers, applied in fp32 to the fp32 dot (None: all ones).
        rc: (NC,) fp32 column multipliers (None: all ones).
        target: (M,) int64 column of row i's target, -1 for none (or None).
        self_idx: (M,) int64 column masked out of row i (its own copy), -1 for none.
        mask_target: also mask the target column out of the log-sum-exp (decoupled loss).
        mask_diag: mask column j = i.

    Returns:
        ``(lse, pos)``, both (M,) fp32: ``lse_i = log sum_{valid j} exp(S_ij)`` (-inf when row
        i has no valid column), ``pos_i = S_{i, target_i}`` from the same tile arithmetic as
        the lse (0 where there is no target; extracted even when ``mask_target`` masks it).
    """
    _check_operands(q, c, scale)
    m, d = q.shape
    nc = c.shape[0]
    rq, rc = _row_factors(rq, rc, m, nc, q.device)
    target = _check_vector("target", target, m, torch.int64, q.device)
    self_idx = _check_vector("self_idx", self_idx, m, torch.int64, q.device)
    if mask_target and target is None:
        raise ValueError("mask_target=True needs a target")
    lse = torch.empty(m, dtype=torch.float32, device=q.device)
    pos = torch.empty(m, dtype=torch.float32, device=q.device)
    if m == 0:
        return lse, pos
    if nc == 0:
        return lse.fill_(float("-inf")), pos.zero_()
    q, c = q.contiguous(), c.contiguous()
    cfg = _launch_args(q, d, "lse", m, nc)
    splits = cfg["splits"]
    part = torch.empty((3, splits, m), dtype=torch.float32, device=q.device)
    no_index = _no_index(q.device)
    _row_lse_kernel[(cfg["row_blocks"], splits)](
        q, c, scale, rq, rc, target if target is not None else no_index,
        self_idx if self_idx is not None else no_index, part[0], part[1], part[2],
        m, nc, d, q.stride(0), c.stride(0), cfg["tiles_per_split"],
        HAS_TARGET=target is not None, HAS_SELF=self_idx is not None,
        MASK_TARGET=bool(mask_target), MASK_DIAG=bool(mask_diag),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        D_RESIDENT=cfg["D_RESIDENT"], DOT_FP32=dot_in_fp32(q.dtype),
        INPUT_PRECISION=dot_precision(q.dtype), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    _lse_combine_kernel[(triton.cdiv(m, COMBINE_BLOCK),)](
        part[0], part[1], part[2], lse, pos, m, splits, BLOCK=COMBINE_BLOCK)
    return lse, pos


def _row_factors(rq, rc, m: int, nc: int, device: torch.device):
    """Checked (rq, rc); an absent one becomes ones (the kernels always read both: one
    fp32 per row / column tile, no extra variants to compile)."""
    rq = _check_vector("rq", rq, m, torch.float32, device)
    rc = _check_vector("rc", rc, nc, torch.float32, device)
    if rq is None:
        rq = torch.ones(m, dtype=torch.float32, device=device)
    if rc is None:
        rc = torch.ones(nc, dtype=torch.float32, device=device)
    return rq, rc


def _fp16_p_scale(g, h, rc) -> torch.Tensor:
    """Power of two 2^floor(log2(2^14 / (max(|g|, |h|) max|rc|))) as a 1-element device
    tensor: the rounded entries are P_ij rc_j, |P_ij rc_j| <= 2 max(|g|, |h|) max|rc|."""
    amax = torch.stack([t.abs().amax().float() for t in (g, h) if t is not None]).amax()
    amax = amax * rc.abs().amax().clamp_min(2.0 ** -60)  # rc has NC >= 1 entries here
    return torch.exp2(torch.floor(torch.log2(FP16_P_TARGET / amax.clamp_min(2.0 ** -100))))


def softmax_grad(q: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, *, rq=None, rc=None,
                 row=None, col=None, self_idx=None, col_self_idx=None,
                 mask_target: bool = False, mask_diag: bool = False) -> torch.Tensor:
    r"""``sum_j (P_ij rc_j) c_j`` (M, D) fp32, NOT multiplied by the scale nor by rq_i
    (callers do). rc_j is folded into P in fp32 before P's one rounding to the dot dtype.

    Args:
        q, c, scale, rq, rc: as in :func:`row_lse` (S_ij = scale rq_i rc_j q_i . c_j).
        row: ``(g (M,), lse (M,), target (M,) or None)``, fp32 / fp32 / int64:
            ``P_ij += g_i (valid_ij exp(S_ij - lse_i) - [j = target_i])``.
        col: ``(h (NC,), clse (NC,), col_target (NC,) or None)`` (the transposed direction):
            ``P_ij += h_j (valid_ij exp(S_ij - clse_j) - [i = col_target_j])``.
        self_idx: (M,) int64, column j = self_idx[i] is not valid for row i (-1: none).
        col_self_idx: (NC,) int64, row i = col_self_idx[j] is not valid for column j.
        mask_target: targets of the present terms are not valid either.
        mask_diag: i = j is not valid.

    Rows (for ``row``) / columns (for ``col``) whose lse is -inf contribute exactly 0.
    """
    _check_operands(q, c, scale)
    if row is None and col is None:
        raise ValueError("softmax_grad needs row=(g, lse, target) and/or col=(h, clse, target)")
    m, d = q.shape
    nc = c.shape[0]
    dev = q.device
    rq, rc = _row_factors(rq, rc, m, nc, dev)
    g = lse = target = h = clse = col_target = None
    for name, term in (("row", row), ("col", col)):
        if term is not None and (not isinstance(term, (tuple, list)) or len(term) != 3
                                 or term[0] is None or term[1] is None):
            raise ValueError(f"{name} must be a tuple (weights, lse, target or None) with "
                             f"tensor weights and lse")
    if row is not None:
        g = _check_vector("row weights g", row[0], m, torch.float32, dev)
        lse = _check_vector("row lse", row[1], m, torch.float32, dev)
        target = _check_vector("row target", row[2], m, torch.int64, dev)
    if col is not None:
        h = _check_vector("col weights h", col[0], nc, torch.float32, dev)
        clse = _check_vector("col lse", col[1], nc, torch.float32, dev)
        col_target = _check_vector("col target", col[2], nc, torch.int64, dev)
    self_idx = _check_vector("self_idx", self_idx, m, torch.int64, dev)
    col_self_idx = _check_vector("col_self_idx", col_self_idx, nc, torch.int64, dev)
    if mask_target and target is None and col_target is None:
        raise ValueError("mask_target=True needs a target in row or col")
    if m == 0 or nc == 0 or d == 0:
        return torch.zeros((m, d), dtype=torch.float32, device=dev)
    out = torch.empty((m, d), dtype=torch.float32, device=dev)
    q, c = q.contiguous(), c.contiguous()
    cfg = _launch_args(q, d, "grad", m, nc)
    splits = cfg["splits"]
    part = out if splits == 1 else torch.empty((splits, m, d), dtype=torch.float32,
                                               device=dev)
    scale_p = q.dtype == torch.float16
    p_scale = _fp16_p_scale(g, h, rc) if scale_p else scale
    # stand-ins of the declared pointer types, never read (their HAS_* flag is False)
    no_value, no_index = out, _no_index(dev)
    _softmax_grad_kernel[(cfg["row_blocks"], splits)](
        q, c, scale, rq, rc, p_scale, g if g is not None else no_value,
        lse if lse is not None else no_value, target if target is not None else no_index,
        h if h is not None else no_value, clse if clse is not None else no_value,
        col_target if col_target is not None else no_index,
        self_idx if self_idx is not None else no_index,
        col_self_idx if col_self_idx is not None else no_index,
        part, m, nc, d, q.stride(0), c.stride(0), cfg["tiles_per_split"],
        HAS_ROW=row is not None, HAS_COL=col is not None, HAS_TARGET=target is not None,
        HAS_CTARGET=col_target is not None, HAS_SELF=self_idx is not None,
        HAS_CSELF=col_self_idx is not None, MASK_TARGET=bool(mask_target),
        MASK_DIAG=bool(mask_diag), SCALE_P=scale_p, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], D_RESIDENT=cfg["D_RESIDENT"],
        DOT_FP32=dot_in_fp32(q.dtype), INPUT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits > 1:
        _sum_splits_kernel[(triton.cdiv(m, SUM_BLOCK_R), triton.cdiv(d, SUM_BLOCK_D))](
            part, out, m, d, splits, BLOCK_R=SUM_BLOCK_R, BLOCK_D=SUM_BLOCK_D)
    return out


# ---------------------------------------------------------------------------------------
# Ahead-of-time entries (``fastssl gpu-report``)
# ---------------------------------------------------------------------------------------

_LSE_FLAGS = ("HAS_TARGET", "HAS_SELF", "MASK_TARGET", "MASK_DIAG")
_GRAD_FLAGS = ("HAS_ROW", "HAS_COL", "HAS_TARGET", "HAS_CTARGET", "HAS_SELF", "HAS_CSELF",
               "MASK_TARGET", "MASK_DIAG")
# The flag combinations each op's launch sites pass (see the lead's op files); "all" sets every
# flag: the register-heaviest variant, the one the tile sweep checks.
VARIANTS = {
    # in-batch / gathered InfoNCE and NT-Xent: targets, self index, decoupled or not; the column
    # gradient is the swapped call; MoCo's queue: no target, row term only.
    "info_nce": [("lse", dict(HAS_TARGET=True, HAS_SELF=True, MASK_TARGET=dcl))
                 for dcl in (False, True)] +
                [("grad", dict(HAS_ROW=True, HAS_TARGET=True, HAS_SELF=True, MASK_TARGET=dcl))
                 for dcl in (False, True)] +
                [("grad", dict(HAS_COL=True, HAS_CTARGET=True, HAS_CSELF=True,
                               MASK_TARGET=dcl)) for dcl in (False, True)] +
                [("lse", {}), ("grad", dict(HAS_ROW=True))],
    "clip_loss": [("lse", dict(HAS_TARGET=True)),
                  ("grad", dict(HAS_ROW=True, HAS_COL=True, HAS_TARGET=True,
                                HAS_CTARGET=True))],
    "supcon": [("lse", dict(MASK_DIAG=True)),
               ("grad", dict(HAS_ROW=True, HAS_COL=True, MASK_DIAG=True))],
    "all": [("lse", {f: True for f in _LSE_FLAGS}), ("grad", {f: True for f in _GRAD_FLAGS})],
}
VARIANTS["nt_xent"] = VARIANTS["info_nce"]


def kernel_entry(op: str, kernel: str, dtype: torch.dtype, d: int, tile: tuple, flags: dict,
                 arch: int | None = None, tag: str = "") -> dict:
    """One AOT entry of ``kernel`` ("lse" / "grad") with ``tile`` = (BLOCK_M, BLOCK_N,
    BLOCK_D, num_warps, num_stages) as :func:`row_lse` / :func:`softmax_grad` launch it for
    ``dtype`` at width ``d`` on a GPU."""
    bm, bn, bd, warps, stages = tile
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, D_RESIDENT=d <= bd, DOT_FP32=False,
                  INPUT_PRECISION="ieee" if dtype != torch.float32 else fp32_default())
    if kernel == "lse":
        fn, names = _row_lse_kernel, _LSE_FLAGS
        pointers = dict(Q=dtype, C=dtype, SCALE=torch.float32, RQ=torch.float32,
                        RC=torch.float32, TARGET=torch.int64,
                        SELF_IDX=torch.int64, MPART=torch.float32, LPART=torch.float32,
                        PPART=torch.float32)
        constexprs = {f: bool(flags.get(f, False)) for f in names}
    else:
        fn, names = _softmax_grad_kernel, _GRAD_FLAGS
        pointers = dict(Q=dtype, C=dtype, SCALE=torch.float32, RQ=torch.float32,
                        RC=torch.float32, PSCALE=torch.float32,
                        G=torch.float32, LSE=torch.float32, TARGET=torch.int64,
                        H=torch.float32, CLSE=torch.float32, CTARGET=torch.int64,
                        SELF_IDX=torch.int64, CSELF_IDX=torch.int64, OUT=torch.float32)
        constexprs = {f: bool(flags.get(f, False)) for f in names}
        constexprs["SCALE_P"] = dtype == torch.float16
    flag_tag = "".join(f[0] + f.split("_")[-1][:2].lower() for f in names if constexprs[f])
    tag = ",".join(t for t in (tag, f"{bm}x{bn}x{bd}w{warps}s{stages}", flag_tag) if t)
    return aot_entry(fn, op=op, dtype=dtype, D=d, pointers=pointers,
                     constexprs={**constexprs, **common}, tensor_cores=True,
                     num_warps=warps, num_stages=stages, arch=arch, tag=tag)


def fp32_default() -> str:
    """The fp32 dot precision the launchers use on a GPU (``FASTSSL_FP32_DOT``)."""
    from ._triton_utils import fp32_dot_precision
    return fp32_dot_precision()


def aot_entries(op: str) -> list:
    """Every (kernel, configuration, dtype, D) the launchers of ``op`` can compile on sm_80 /
    sm_90: the flag combinations of ``VARIANTS[op]`` x dtypes x ``SWEEP_D`` x the tile of
    each (arch, dtype, D) (``"arch"`` set: tiles are picked per arch), plus the two
    dtype-independent split reductions."""
    if op not in VARIANTS:
        raise ValueError(f"unknown op {op!r}; known: {sorted(VARIANTS)}")
    entries, seen = [], set()
    for kernel, flags in VARIANTS[op]:
        for dtype in _DTYPES:
            for d in SWEEP_D:
                for arch in (80, 90):
                    e = kernel_entry(op, kernel, dtype, d, tiles(kernel, dtype, d, arch),
                                     flags, arch)
                    if e["name"] not in seen:
                        seen.add(e["name"])
                        entries.append(e)
    entries.append(aot_entry(_lse_combine_kernel, op=op, dtype=torch.float32, D=None,
                             pointers=dict(MPART=torch.float32, LPART=torch.float32,
                                           PPART=torch.float32, LSE=torch.float32,
                                           POS=torch.float32),
                             constexprs=dict(BLOCK=COMBINE_BLOCK), tensor_cores=False,
                             num_warps=4, num_stages=1))
    entries.append(aot_entry(_sum_splits_kernel, op=op, dtype=torch.float32, D=None,
                             pointers=dict(PART=torch.float32, OUT=torch.float32),
                             constexprs=dict(BLOCK_R=SUM_BLOCK_R, BLOCK_D=SUM_BLOCK_D),
                             tensor_cores=False, num_warps=4, num_stages=1))
    return entries
