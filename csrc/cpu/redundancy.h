// The engine of the redundancy-reduction losses (barlow_twins.cpp, vicreg.cpp): column
// statistics over the batch, standardised column blocks, N x N Grams and D x D tiles on the
// BLAS torch ships (gemm_rm, single-threaded calls on fixed work units), so that no D x D
// matrix is ever stored. The math and the cost model of the two paths: fastssl/ops/redundancy.py.
//
// Determinism: every parallel loop runs over fixed units (row strips of a Gram, column tiles,
// fixed chunks of a sum), each unit sums in a fixed order, and partial sums are added in unit
// order, so results do not depend on the thread count.
#pragma once

#include "common.h"

namespace fastssl {
namespace redundancy {

constexpr int64_t kStrip = 64;   // rows of a Gram per work unit
constexpr int64_t kBlock = 256;  // columns of a standardised block (Gram path)
constexpr int64_t kTile = 128;   // side of a tile of C (tiled path)

// fp32 contiguous view of z (a copy only when z is not already fp32 and contiguous).
at::Tensor as_f32(const at::Tensor& z);

// Per column: mean and unbiased variance (sum of squared deviations / (n - 1); NaN for n = 1),
// accumulated in double, two passes.
void column_stats(const float* z, int64_t n, int64_t d, float* mean, float* var);

// out (n x kb, contiguous) = (z[:, k0:k0+kb] - shift) * scale (shift/scale: d-vectors, or
// nullptr for 0 / 1).
void load_block(const float* z, int64_t n, int64_t d, int64_t k0, int64_t kb,
                const float* shift, const float* scale, float* out);

// A pair of symmetric N x N Grams (the two views') in one n x n buffer: `packed` holds the
// first's strictly-lower and the second's strictly-upper triangle, `diag` (2 x n) their
// diagonals. Half the memory of two full Grams; the backward multiplies by a Gram straight from
// its triangle (packed_gram_times).
//
// packed_gram: the Gram of x (n x kb) into its half (second = false: lower, true: upper) and
// diag row, = for the first column block, += after (accumulate).
void packed_gram(const float* x, int64_t n, int64_t kb, bool accumulate, bool second,
                 float* packed, float* diag);
// <G1, G2>_F and ||G||_F^2 of one of them, in double (fixed row chunks added in order).
double packed_inner(const float* packed, const float* diag, int64_t n);
double packed_frob(const float* packed, const float* diag, int64_t n, bool second);
// out (n x kb) = alpha G x for G the first or second Gram of the pair.
void packed_gram_times(const float* packed, const float* diag, int64_t n, bool second,
                       const float* x, int64_t kb, float alpha, float* out);

// sum_i a_i b_i in double, fixed chunks added in order.
double dot(const float* a, const float* b, int64_t count);

// ||a^T b||_F^2 for a, b (n x d, row-major), tile by tile (kTile x kTile tiles of a^T b, never
// stored), in double; `symmetric` (b is a): the upper triangle of tiles only, off-diagonal
// tiles counted twice. Fixed tile rows per unit, added in order.
double tiled_cross_frob(const float* a, const float* b, int64_t n, int64_t d, bool symmetric);

// sum_{d} (column d of x) . (column d of y) for x, y (n x kb): per-column dots into out (kb).
void column_dots(const float* x, const float* y, int64_t n, int64_t kb, double* out);

}  // namespace redundancy
}  // namespace fastssl
