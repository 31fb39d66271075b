// The generic contrastive core: rows Q (m x d) against columns C (nc x d), O((m + nc) d) memory.
//
// Notation (docs/DESIGN.md, section 4.1): Qhat, Chat are the rows L2-normalised (or the raw rows), and
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
// afterwards. Rows too large or too small for fp32 products (max-abs outside [2^-24, 2^24]) are
// staged scaled by a power of two (exact), so |x| up to 1e30 neither overflows the GEMM nor the
// squared norm; for other rows nothing changes.
//
// Threads (results bitwise independent of the thread count, extra memory independent of it):
//  * forward_lse, rows only (xent, supcon): units = (row tile, fixed column chunk); each unit
//    keeps its rows' running (max, sum) over its chunk in a partial, merged in chunk order. The
//    number of chunks depends on the shape only (col_chunks), so partials are O(m) floats.
//  * forward_lse with columns (CLIP) and backward_softmax: the tile grid in wavefront order.
//    Step s holds the tiles (I, (I + s) mod L) (L = the larger tile count): no two tiles of a
//    step share a row or a column block. Each tile updates its row and column statistics
//    (gradients) in place, with no partials and no atomics, and every block receives its tiles
//    in step order whatever thread ran them. No barrier between steps: a thread runs any tile
//    whose blocks have received all their earlier tiles (UnitSchedule, unit_schedule.h).
//  * Units that write only their own partials (rows-only forward, forward_lse_pv) are claimed
//    dynamically too, by whichever thread is free.
//  * forward_lse_pv (MoCo): units as forward_lse; a unit's running output o is a partial of
//    m x d floats per column chunk, with col_chunks * m <= m + kMinUnits * kTile rows.
#pragma once

#include <vector>

#include "common.h"

namespace fastssl::core {

// 256 x 256 fp32 tile = 256 KiB: the tile plus two 256 x D panels stay in L2 (1 MiB on Zen 4).
constexpr int64_t kTile = 256;
constexpr float kNormEps = 1e-12f;  // F.normalize's eps (applied to the norm of the input row)
// Work units a rows-only forward aims for (row tiles x column chunks): enough for 64 threads,
// and a fixed function of the shape, never of the thread count.
constexpr int64_t kMinUnits = 64;

// Grain (rows) of the O(n d) row loops: a parallel region only pays off above ~64K elements
// (measured: on this shared 2-core machine every fork of a region can wait a scheduler
// quantum for the second core, which made 256-row epilogues cost more than the whole op).
inline int64_t row_grain(int64_t d) { return std::max<int64_t>(64, 65536 / std::max<int64_t>(d, 1)); }

// An (n x d) operand staged for the core.
struct Operand {
  at::Tensor storage;  // fp32 contiguous rows; aliases the input when it is fp32 contiguous
  at::Tensor rinv_t;   // (n) xhat_i = x_i * rinv_i (x: the staged, maybe power-of-2-scaled rows)
  at::Tensor nrm_t;    // (n) 1 / rinv: the factor that turns a raw-row accumulator back
  at::Tensor grad_rinv_t;  // (n) 1 / max(||input row||, eps): normalize_backward's factor
  const float* x = nullptr;
  const float* rinv = nullptr;
  const float* nrm = nullptr;
  const float* grad_rinv = nullptr;
  std::vector<char> clamped;  // the input row's norm fell below eps (x / eps is linear)
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

// Logits read from the forward tiles themselves, so that a loss is computed from the very
// S_i,t that entered LSE_i: (max_i - S_i,t) + log_sum_i is then a sum of two exactly
// non-negative fp32 numbers. A separately computed dot product rounds differently and can make
// a loss that is >= 0 in exact arithmetic come out negative.
struct Picks {
  const int64_t* target = nullptr;  // per row: the column whose logit to keep (before masking)
  float* target_logit = nullptr;    // out (q.n)
  // Per row: sum of the unmasked S_ij over columns j of the row's class (SupCon's positives).
  // Rows-only forward (col_lse == nullptr) only.
  const int64_t* row_class = nullptr;
  const int64_t* col_class = nullptr;
  double* class_logit_sum = nullptr;  // out (q.n)
  // Out (optional): each LSE in two parts, lse = max + log_sum. A loss written as
  // (max - S_i,t) + log_sum keeps the relative precision of a small loss, as log_softmax does;
  // lse - S_i,t loses everything below ulp(lse) (~1e-5 at tau = 0.01).
  float* row_max = nullptr;
  float* row_log_sum = nullptr;
  float* col_max = nullptr;
  float* col_log_sum = nullptr;
};

// row_lse (q.n floats) and, when col_lse != nullptr, col_lse (c.n floats) of the masked S.
void forward_lse(const Operand& q, const Operand& c, float alpha, Masks masks, float* row_lse,
                 float* col_lse, const Picks& picks = {});

// Flash-attention-style forward for losses whose columns get no gradient (MoCo's queue):
// row_lse as forward_lse (no masks) and pv (q.n x d) = sum_j softmax(S)_ij chat_j, accumulated
// online (rescaled as the row maxima grow; per-thread partials merged like split-K
// flash-decoding). The backward of such a loss is then dQhat_i = alpha g_i pv_i + O(d) terms:
// no recompute, 2 matmul-equivalents in total instead of 3.
void forward_lse_pv(const Operand& q, const Operand& c, float alpha, float* row_lse, float* pv);

// A term -w_i [class(i) == class(j)] of dS_ij over the unmasked columns (SupCon's positives),
// folded into the backward tiles so that it takes the same GEMMs as the softmax part.
struct ClassTerm {
  const int64_t* row_class = nullptr;
  const int64_t* col_class = nullptr;
  const float* w = nullptr;  // per row
};

// Softmax part of the backward. g, lse: per row (g may hold zeros); h, clse: per column, or
// both null (no column softmax). Writes (overwrites) dq (q.n x d) with alpha P Chat and, when
// dc != nullptr, dc (c.n x d) with alpha P^T Qhat: gradients w.r.t. the *normalised* rows.
void backward_softmax(const Operand& q, const Operand& c, float alpha, Masks masks,
                      const float* g, const float* lse, const float* h, const float* clse,
                      float* dq, float* dc, const ClassTerm& cls = {});

// In place, row by row: dxhat -> dx through xhat = x / max(||x||, eps) (identity when the
// operand is not normalised). Returns nothing; see rows_dot for the scale gradient.
void normalize_backward(const Operand& x, float* dxhat);

// sum_i xhat_i . v_i in double, in row order (deterministic).
double rows_dot(const Operand& x, const float* v);

// alpha * xhat_i . yhat_j (for logits outside any tile: MoCo's positive)
float logit(const Operand& x, int64_t i, const Operand& y, int64_t j, float alpha);

// dst[i] = src, row-wise helper: out[k] += s * yhat_j[k]
void axpy_hat(float* out, float s, const Operand& y, int64_t j);

// A (n x d) fp32 result converted to `dtype` (no copy when dtype is fp32).
at::Tensor to_dtype(const at::Tensor& f32, at::ScalarType dtype);

}  // namespace fastssl::core
