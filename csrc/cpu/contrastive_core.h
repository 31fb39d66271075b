// The generic contrastive core: rows Q (m x d) against columns C (nc x d), O((m + nc) d) memory.
//
// Notation (DESIGN.md): Qhat, Chat are the rows L2-normalised (or the raw rows), and
// S = alpha * Qhat Chat^T, with some entries masked (-inf) per row. The core computes, tile by
// tile and never storing S:
//  * forward_lse:       the row log-sum-exp of S (and, optionally, the column log-sum-exp: CLIP's
//                        second direction from the same tiles);
//  * backward_softmax:  with P_ij = g_i exp(S_ij - lse_i) + h_j exp(S_ij - clse_j), the softmax
//                        part of the gradients dQhat = alpha P Chat and dChat = alpha P^T Qhat,
//                        from one recompute of each tile.
// What is loss-specific (the target / positive terms, the extra MoCo positive logit, the
// normalisation backward, the gradient of alpha) lives in the thin per-op files (xent.cpp,
// info_nce.cpp, clip.cpp, supcon.cpp) as O((m + nc) d) epilogues.
//
// Normalisation never materialises Qhat: the tile GEMMs read the raw fp32 rows (the input
// itself when it is fp32 and contiguous) and the tile is scaled by rinv_q[i] * rinv_c[j]
// afterwards. That keeps the extra memory of CLIP at B = 16384, D = 256 at the gradients plus
// one private accumulator per extra thread (see backward_softmax).
//
// Threads: forward splits the tile pairs and keeps private (max, sum) per thread (O(T (m + nc))
// floats), merged in thread order; backward splits the dimension with more tiles (rows for
// CLIP, columns for MoCo's 256 x 65536), so the gradient of that side is written by its owner
// and the other side gets one private accumulator per extra thread. Deterministic for a given
// thread count; no atomics.
#pragma once

#include <vector>

#include "common.h"

namespace fastssl::core {

// 256 x 256 fp32 tile = 256 KiB: the tile plus two 256 x D panels stay in L2 (1 MiB on Zen 4).
constexpr int64_t kTile = 256;
constexpr float kNormEps = 1e-12f;  // F.normalize's eps; the norm is computed in fp32 (double sum)

// Grain (rows) of the O(n d) row loops: a parallel region only pays off above ~64K elements
// (measured: on this shared 2-core machine every fork of a region can wait a scheduler
// quantum for the second core, which made 256-row epilogues cost more than the whole op).
inline int64_t row_grain(int64_t d) { return std::max<int64_t>(64, 65536 / std::max<int64_t>(d, 1)); }

// An (n x d) operand staged for the core.
struct Operand {
  at::Tensor storage;  // fp32 contiguous rows; aliases the input when it is fp32 contiguous
  at::Tensor rinv_t;   // (n) 1 / max(||x_i||, eps) when normalising, else 1
  at::Tensor nrm_t;    // (n) 1 / rinv: the factor that turns a raw-row accumulator back
  const float* x = nullptr;
  const float* rinv = nullptr;
  const float* nrm = nullptr;
  int64_t n = 0, d = 0;
  bool normalize = false;
  bool clamped_any = false;
  bool finite = true;  // false if any input element is NaN/inf

  // xhat row i, element k
  float hat(int64_t i, int64_t k) const { return x[i * d + k] * rinv[i]; }
};

// Stages `t` (2-D, any float dtype, any strides) in fp32 and computes its row norms.
Operand stage(const at::Tensor& t, bool normalize);

// Per-row masked column (-1: none). Either pointer may be null.
struct Masks {
  const int64_t* a = nullptr;
  const int64_t* b = nullptr;
};

// row_lse (q.n floats) and, when col_lse != nullptr, col_lse (c.n floats) of the masked S.
void forward_lse(const Operand& q, const Operand& c, float alpha, Masks masks, float* row_lse,
                 float* col_lse);

// Flash-attention-style forward for losses whose columns get no gradient (MoCo's queue):
// row_lse as forward_lse (no masks) and pv (q.n x d) = sum_j softmax(S)_ij chat_j, accumulated
// online (rescaled as the row maxima grow; per-thread partials merged like split-K
// flash-decoding). The backward of such a loss is then dQhat_i = alpha g_i pv_i + O(d) terms:
// no recompute, 2 matmul-equivalents in total instead of 3.
void forward_lse_pv(const Operand& q, const Operand& c, float alpha, float* row_lse, float* pv);

// Softmax part of the backward. g, lse: per row (g may hold zeros); h, clse: per column, or
// both null (no column softmax). Writes (overwrites) dq (q.n x d) with alpha P Chat and, when
// dc != nullptr, dc (c.n x d) with alpha P^T Qhat: gradients w.r.t. the *normalised* rows.
void backward_softmax(const Operand& q, const Operand& c, float alpha, Masks masks,
                      const float* g, const float* lse, const float* h, const float* clse,
                      float* dq, float* dc);

// In place, row by row: dxhat -> dx through xhat = x / max(||x||, eps) (identity when the
// operand is not normalised). Returns nothing; see rows_dot for the scale gradient.
void normalize_backward(const Operand& x, float* dxhat);

// sum_i xhat_i . v_i in double, in row order (deterministic).
double rows_dot(const Operand& x, const float* v);

// alpha * xhat_i . yhat_j
float logit(const Operand& x, int64_t i, const Operand& y, int64_t j, float alpha);

// dst[i] = src, row-wise helper: out[k] += s * yhat_j[k]
void axpy_hat(float* out, float s, const Operand& y, int64_t j);

// A (n x d) fp32 result converted to `dtype` (no copy when dtype is fp32).
at::Tensor to_dtype(const at::Tensor& f32, at::ScalarType dtype);

}  // namespace fastssl::core
