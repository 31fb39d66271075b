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
  the backward, and the gradients are N x N by N x D products.
* **tiled C** (``PATH_TILED``): C (VICReg: K) is computed tile by tile and reduced in the
  tile's epilogue; the backward recomputes each tile instead of reading a stored C.

Cost model (fp32 multiply-adds counted as 2 FLOPs; the elementwise O(N D) passes are common to
both paths and left out):

=================  ============================  ===============================================
path               FLOPs (forward + backward)    extra memory (bytes)
=================  ============================  ===============================================
Barlow, Gram       2 N^2 D + 4 N^2 D = 6 N^2 D   8 N^2 (the two Grams, saved) + a column block
Barlow, tiled C    2 N D^2 + 8 N D^2 = 10 N D^2  8 N D (standardised copies) + a tile / thread
VICReg, Gram       2 (N^2 D + 2 N^2 D) = 6 N^2 D 8 N^2 + a column block
VICReg, tiled C    2 (N D^2 + 4 N D^2) = 10 N D^2  8 N D (centred copies) + a tile / thread
=================  ============================  ===============================================

(Gram forward: symmetric, only the lower half of each Gram is multiplied. Barlow tiled
backward: every tile of C is recomputed twice, once for dA (tiles owned by A's column block)
and once for dB, so that each output block has one writer and a fixed summation order. VICReg
tiled forward: K is symmetric, half its tiles.) Both ratios give the same rule: the Gram path
when 6 N^2 D < 10 N D^2, i.e. **N < 5 D / 3**, else tiled C. At N = 2048, D = 8192 (the paper's
projector): 2.1e11 FLOPs vs 6 N D^2 = 8.2e11 for the eager reference (C, then dA, dB from the
stored D x D dC), and 32 MB of Grams instead of several 268 MB D x D matrices.

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
