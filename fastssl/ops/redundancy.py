r"""The redundancy-reduction engine of ``barlow_twins`` and ``vicreg``: their losses without a
D x D matrix in memory.

Notation: Z1, Z2 (N, D) the two views; per feature (column) d the batch mean mu_d and the
unbiased variance v_d = sum_n (z_nd - mu_d)^2 / (N - 1).

Barlow Twins (ops/barlow_twins.py). A = (Z1 - mu1) / sqrt(v1), B likewise (or A = Z1, B = Z2
with normalize="none"), C = A^T B / N (D x D), c_d = C_dd:

    L = sum_d (1 - c_d)^2 + lambda (||C||_F^2 - sum_d c_d^2)

    ||C||_F^2 = ||A^T B||_F^2 / N^2 = <A A^T, B B^T>_F / N^2      (trace identity)

and the diagonal c_d = sum_n A_nd B_nd / N is O(N D). Gradient (dL/dC = 2 lambda C + diag(g),
g_d = -2 (1 - c_d) - 2 lambda c_d):

    dL/dA = B diag(g) / N + (2 lambda / N^2) (B B^T) A      (B C^T = B B^T A / N)
    dL/dB = A diag(g) / N + (2 lambda / N^2) (A A^T) B

then the standardisation backward, per column, with r = 1/sqrt(v) and dA its gradient:

    dZ = r (dA - mean_n dA - A sum_n (dA A) / (N - 1))

(x = z - mu, A = r x, dr/dx_n = -r^3 x_n / (N - 1); the mean's backward subtracts mean_n of
dL/dx, and sum_n A_n = 0 turns that into mean_n dA).

VICReg (ops/vicreg.py), per view X = Z - mu (N x D), K = X^T X / (N - 1), s_d = sqrt(v_d + eps):

    L = sim mean((Z1 - Z2)^2) + var (V(Z1) + V(Z2)) / 2 + cov (Q(Z1) + Q(Z2))
    V = mean_d relu(1 - s_d),   Q = (||K||_F^2 - sum_d v_d^2) / D,   ||K||_F^2 = ||X X^T||_F^2 / (N-1)^2

    dQ/dX = 4 X K_off / (D (N - 1)) = 4 ((X X^T) X - X diag(X^T X)) / (D (N - 1)^2)
    dV/dX = -[s_d < 1] X / (D s_d (N - 1)),   dZ = dX - mean_n dX,   d mean(..)/dZ1 = 2 (Z1 - Z2) / (N D)

Two paths, neither stores a D x D matrix:

* **Gram** (``PATH_GRAM``): the N x N Grams A A^T, B B^T (VICReg: X X^T per view) are formed
  from column blocks of the standardised operands (never all of A in memory on CPU), saved for
  the backward -- both symmetric, so packed into one N x N buffer (the first's strictly-lower
  triangle, the second's strictly-upper one) plus their (2, N) diagonals -- and the gradients
  are N x N by N x D products (the CPU kernel multiplies straight from the packed buffer:
  three GEMMs per 64-row strip, the mirrored half read as a transposed operand).
* **tiled C** (``PATH_TILED``): C (VICReg: K) is computed tile by tile and reduced in the
  tile's epilogue; the backward recomputes each tile instead of reading a stored C.

Cost model (fp32 multiply-adds counted as 2 FLOPs; the elementwise O(N D) passes are common to
both paths and left out):

=================  ============================  ===============================================
path               FLOPs (forward + backward)    extra memory (bytes)
=================  ============================  ===============================================
Barlow, Gram       2 N^2 D + 4 N^2 D = 6 N^2 D   4 N^2 (the packed Grams, saved) + a column block
Barlow, tiled C    2 N D^2 + 8 N D^2 = 10 N D^2  8 N D (standardised copies) + a tile / thread
VICReg, Gram       2 (N^2 D + 2 N^2 D) = 6 N^2 D 4 N^2 (packed) + a column block
VICReg, tiled C    2 (N D^2 + 4 N D^2) = 10 N D^2  8 N D (centred copies) + a tile / thread
=================  ============================  ===============================================

(Gram forward: symmetric, only the lower half of each Gram is multiplied. Barlow tiled
backward: every tile of C is recomputed twice, once for dA (tiles owned by A's column block)
and once for dB, so that each output block has one writer and a fixed summation order. VICReg
tiled forward: K is symmetric, half its tiles.) Both ratios give the same rule: the Gram path
when 6 N^2 D < 10 N D^2, i.e. **N < 5 D / 3**, else tiled C. At N = 2048, D = 8192 (the paper's
projector): 2.1e11 FLOPs vs 6 N D^2 = 8.2e11 for the eager reference (C, then dA, dB from the
stored D x D dC), and 16 MB of packed Grams instead of several 268 MB D x D matrices.

Numerics: the kernels accumulate in fp32 (sums over the batch of the O(N D) statistics in
fp64 on CPU); ``||C||^2 - sum c_d^2`` subtracts the diagonal from the Gram inner product, which
loses relative precision only where the off-diagonal mass is below fp32 epsilon times D.
"""
from __future__ import annotations

import contextlib

PATH_GRAM, PATH_TILED = 1, 2
PATHS = {"gram": PATH_GRAM, "tiled": PATH_TILED}

_forced: int | None = None


def choose_path(n: int, d: int) -> int:
    """The cost model above: Gram when 6 N^2 D < 10 N D^2 (N < 5 D / 3)."""
    if _forced is not None:
        return _forced
    return PATH_GRAM if 3 * n < 5 * d else PATH_TILED


@contextlib.contextmanager
def force_path(name: str):
    """Tests and benchmarks: run ``barlow_twins`` / ``vicreg`` on one path ("gram" or
    "tiled") inside the block, whatever the cost model says."""
    global _forced
    if name not in PATHS:
        raise ValueError(f"path must be one of {tuple(PATHS)}, got {name!r}")
    prev, _forced = _forced, PATHS[name]
    try:
        yield
    finally:
        _forced = prev


# ---------------------------------------------------------------------------------------
# CUDA kernels (Triton): the GEMMs of both paths, standardisation fused into the operand loads
# ---------------------------------------------------------------------------------------
#
# Every operand tile is loaded in the input dtype, standardised in fp32, (x - mu) * r, and
# multiplied in fp32 (``tl.dot`` with the project's fp32 precision: bf16x3 on a GPU by
# default, exact under the interpreter), accumulating in fp32. Kernels:
#
# * ``_gram_kernel``: G = X^ X^T (N x N), X^ = (X - mu) r.            2 N^2 D FLOPs
# * ``_gram_times_kernel``: OUT = s G X^ + diag(coef) Y^ (N x D)      2 N^2 D
# * ``_tile_sq_kernel``: per tile (i, j) of C = A^T B^, sum of C_ij^2  2 N D^2 (all tiles)
# * ``_tile_bwd_kernel``: program u owns columns u of OUT = s sum_v B^_v (A^_u^T B^_v)^T
#   + diag(coef) B^_u: recomputes C_uv (2 N T^2) and applies it (2 N T^2) per v.  4 N D^2
#
# The O(N D) parts (column statistics, the diagonal c, the standardisation / centring
# backward) run as PyTorch ops in the launchers. Nothing here reads a value on the host.

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ._triton_utils import dot_precision  # noqa: E402

GRAM_BLOCK, GRAM_K = 64, 32       # Gram / Gram-times tiles (rows x reduction)
TILE, TILE_ROWS = 64, 32          # a tile of C is TILE x TILE, reduced over TILE_ROWS rows
NUM_WARPS = 4
# The backward tile kernel holds C_uv (TILE x TILE fp32) beside its operands. gpu-report,
# triton 3.9: fp32 inputs spilled at 4 warps x 32 rows (760 B sm_80, 440 B sm_90) and at
# 8 x 32 (16 B sm_80); 8 x 16 holds them. 16-bit inputs: 0 spills at 8 x 32, 8 B (sm_80) at 8 x 16.
TILE_BWD_WARPS = 8


def _tile_bwd_rows(dtype: torch.dtype) -> int:
    return 16 if dtype == torch.float32 else 32


@triton.jit
def _load_std(X, MU, R, rows, cols, N, D, stride):
    """(rows x cols) tile of (X - mu) * r in fp32, 0 outside the matrix."""
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    x = tl.load(X + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(MU + cols, mask=cols < D, other=0.0)
    r = tl.load(R + cols, mask=cols < D, other=0.0)
    return tl.where(mask, (x - mu[None, :]) * r[None, :], 0.0)


@triton.jit
def _gram_kernel(X, MU, R, G, N, D, stride, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                 PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK + tl.arange(0, BLOCK)
    rn = pid_n * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        a = _load_std(X, MU, R, rm, cols, N, D, stride)
        b = _load_std(X, MU, R, rn, cols, N, D, stride)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    mask = (rm[:, None] < N) & (rn[None, :] < N)
    tl.store(G + rm[:, None] * N + rn[None, :], acc, mask=mask)


@triton.jit
def _gram_times_kernel(G, X, MUX, RX, Y, MUY, RY, COEF, SCALE, OUT, N, D, stride,
                       BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_K):
        rj = j0 + tl.arange(0, BLOCK_K)
        g = tl.load(G + rm[:, None] * N + rj[None, :],
                    mask=(rm[:, None] < N) & (rj[None, :] < N), other=0.0)
        x = _load_std(X, MUX, RX, rj, cols, N, D, stride)
        acc = tl.dot(g, x, acc, input_precision=PREC)
    y = _load_std(Y, MUY, RY, rm, cols, N, D, stride)
    coef = tl.load(COEF + cols, mask=cols < D, other=0.0)
    out = tl.load(SCALE) * acc + coef[None, :] * y
    mask = (rm[:, None] < N) & (cols[None, :] < D)
    tl.store(OUT + rm[:, None] * D + cols[None, :], out, mask=mask)


@triton.jit
def _tile_sq_kernel(A, MUA, RA, B, MUB, RB, PART, N, D, stride, TILE: tl.constexpr,
                    ROWS: tl.constexpr, PREC: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    ci = pid_i * TILE + tl.arange(0, TILE)
    cj = pid_j * TILE + tl.arange(0, TILE)
    acc = tl.zeros((TILE, TILE), dtype=tl.float32)
    for n0 in range(0, N, ROWS):
        rn = n0 + tl.arange(0, ROWS)
        a = _load_std(A, MUA, RA, rn, ci, N, D, stride)
        b = _load_std(B, MUB, RB, rn, cj, N, D, stride)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)
    tl.store(PART + pid_i * tl.num_programs(1) + pid_j, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _tile_bwd_kernel(A, MUA, RA, B, MUB, RB, COEF, SCALE, OUT, N, D, stride,
                     TILE: tl.constexpr, ROWS: tl.constexpr, PREC: tl.constexpr):
    # OUT must hold zeros: this program accumulates its columns u over the tiles v in order.
    pid_u = tl.program_id(0)
    cu = pid_u * TILE + tl.arange(0, TILE)
    for v0 in range(0, D, TILE):
        cv = v0 + tl.arange(0, TILE)
        c = tl.zeros((TILE, TILE), dtype=tl.float32)  # C_uv = A^_u^T B^_v
        for n0 in range(0, N, ROWS):
            rn = n0 + tl.arange(0, ROWS)
            a = _load_std(A, MUA, RA, rn, cu, N, D, stride)
            b = _load_std(B, MUB, RB, rn, cv, N, D, stride)
            c = tl.dot(tl.trans(a), b, c, input_precision=PREC)
        for n0 in range(0, N, ROWS):
            rn = n0 + tl.arange(0, ROWS)
            b = _load_std(B, MUB, RB, rn, cv, N, D, stride)
            mask = (rn[:, None] < N) & (cu[None, :] < D)
            ptrs = OUT + rn[:, None] * D + cu[None, :]
            prev = tl.load(ptrs, mask=mask, other=0.0)
            tl.store(ptrs, tl.dot(b, tl.trans(c), prev, input_precision=PREC), mask=mask)
    scale = tl.load(SCALE)
    coef = tl.load(COEF + cu, mask=cu < D, other=0.0)
    for n0 in range(0, N, ROWS):
        rn = n0 + tl.arange(0, ROWS)
        b = _load_std(B, MUB, RB, rn, cu, N, D, stride)
        mask = (rn[:, None] < N) & (cu[None, :] < D)
        ptrs = OUT + rn[:, None] * D + cu[None, :]
        tl.store(ptrs, scale * tl.load(ptrs, mask=mask, other=0.0) + coef[None, :] * b,
                 mask=mask)


def _prec():
    return dot_precision(torch.float32)


def gram(x, mu, r):
    """(N, N) fp32 Gram of (x - mu) r."""
    n, d = x.shape
    g = torch.empty((n, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, GRAM_BLOCK), triton.cdiv(n, GRAM_BLOCK))
    _gram_kernel[grid](x, mu, r, g, n, d, x.stride(0), BLOCK=GRAM_BLOCK, BLOCK_K=GRAM_K,
                       PREC=_prec(), num_warps=NUM_WARPS)
    return g


def gram_times(g, x, mux, rx, y, muy, ry, coef, scale):
    """(N, D) fp32: scale * g (x - mux) rx + coef * (y - muy) ry (scale: a 1-element tensor)."""
    n, d = x.shape
    out = torch.empty((n, d), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, GRAM_BLOCK), triton.cdiv(d, GRAM_BLOCK))
    _gram_times_kernel[grid](g, x, mux, rx, y, muy, ry, coef, scale, out, n, d, x.stride(0),
                             BLOCK=GRAM_BLOCK, BLOCK_K=GRAM_K, PREC=_prec(),
                             num_warps=NUM_WARPS)
    return out


def tiles_sq(a, mua, ra, b, mub, rb):
    """||A^T B^||_F^2 (0-dim fp32 tensor; partial sums per tile added in fp64)."""
    n, d = a.shape
    tiles = triton.cdiv(d, TILE)
    part = torch.empty((tiles * tiles,), dtype=torch.float32, device=a.device)
    _tile_sq_kernel[(tiles, tiles)](a, mua, ra, b, mub, rb, part, n, d, a.stride(0), TILE=TILE,
                                    ROWS=TILE_ROWS, PREC=_prec(), num_warps=NUM_WARPS)
    return part.double().sum().float()


def tiles_bwd(a, mua, ra, b, mub, rb, coef, scale):
    """(N, D) fp32: scale * B^ (A^^T B^)^T + coef * B^, C recomputed per tile."""
    n, d = a.shape
    out = torch.zeros((n, d), dtype=torch.float32, device=a.device)
    _tile_bwd_kernel[(triton.cdiv(d, TILE),)](a, mua, ra, b, mub, rb, coef, scale, out, n, d,
                                              a.stride(0), TILE=TILE,
                                              ROWS=_tile_bwd_rows(a.dtype),
                                              PREC=_prec(), num_warps=TILE_BWD_WARPS)
    return out


def pack_grams(g1, g2):
    """The saved form of a pair of symmetric Grams, shared with the C++ kernels: (N, N) with
    g1's strictly-lower and g2's strictly-upper triangle (zero diagonal), and the (2, N)
    diagonals."""
    return g1.tril(-1) + g2.triu(1), torch.stack([g1.diagonal(), g2.diagonal()])


def unpack_grams(packed, diags):
    """The two full Grams of :func:`pack_grams`'s form."""
    lower, upper = packed.tril(-1), packed.triu(1)
    return (lower + lower.T + torch.diag_embed(diags[0]),
            upper + upper.T + torch.diag_embed(diags[1]))


def column_stats(z, standardize: bool = True):
    """(mean, r) fp32 (D,): batch mean and 1 / unbiased std (0 and 1 without standardize)."""
    d = z.shape[1]
    if not standardize:
        return (torch.zeros(d, dtype=torch.float32, device=z.device),
                torch.ones(d, dtype=torch.float32, device=z.device))
    zf = z.float()
    return zf.mean(dim=0), torch.rsqrt(zf.var(dim=0))


def standardize_backward(da, a_hat, r, n: int):
    """dZ from dA^ for A^ = (Z - mu) r (per column, unbiased std)."""
    return r * (da - da.mean(dim=0) - a_hat * ((da * a_hat).sum(dim=0) / (n - 1)))


def aot_entries(op: str) -> list:
    """``AOT_KERNELS`` of ``op`` ("barlow_twins" or "vicreg": both launch the same four kernels
    with the same tiles) for ``fastssl gpu-report``: every kernel for fp32, bf16 and fp16
    inputs (the z operands; statistics, Grams and outputs are fp32), at the fp32 dot
    precision the launchers use on a GPU. The tiles do not depend on N or D."""
    from ._aot import aot_entry
    from ._triton_utils import fp32_dot_precision
    prec = fp32_dot_precision()
    f32 = torch.float32
    entries = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gram_c = dict(BLOCK=GRAM_BLOCK, BLOCK_K=GRAM_K, PREC=prec)
        tile_c = dict(TILE=TILE, ROWS=TILE_ROWS, PREC=prec)
        std = lambda *names: {n: (dtype if n in ("X", "Y", "A", "B") else f32)  # noqa: E731
                              for n in names}
        kw = dict(op=op, dtype=dtype, D=None, tensor_cores=prec != "ieee", num_warps=NUM_WARPS,
                  num_stages=3)
        entries += [
            aot_entry(_gram_kernel, pointers=std("X", "MU", "R", "G"), constexprs=gram_c, **kw),
            aot_entry(_gram_times_kernel,
                      pointers=std("G", "X", "MUX", "RX", "Y", "MUY", "RY", "COEF", "SCALE",
                                   "OUT"), constexprs=gram_c, **kw),
            aot_entry(_tile_sq_kernel, pointers=std("A", "MUA", "RA", "B", "MUB", "RB", "PART"),
                      constexprs=tile_c, **kw),
            aot_entry(_tile_bwd_kernel,
                      pointers=std("A", "MUA", "RA", "B", "MUB", "RB", "COEF", "SCALE", "OUT"),
                      constexprs={**tile_c, "ROWS": _tile_bwd_rows(dtype)},
                      **{**kw, "num_warps": TILE_BWD_WARPS}),
        ]
    return entries
