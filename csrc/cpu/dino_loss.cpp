// DINO / iBOT prototype head, streamed over tiles of the K prototypes (fastssl/ops/dino_loss.py
// states the math and the saved-tensor contract).
//
//   x_rk = s_s * hhat_r . vhat_k            student logits (s_s = 1 / student_temp)
//   y_tk = s_t * that_t . uhat_k - shift_k  teacher logits (centering: shift = center * s_t;
//                                           Sinkhorn: shift = -c, the column log-scalings)
//   loss = sum_r W_r LSE_k(x_r) - sum_t omega_t sum_k P_t,tk U_tk,
//   U_t  = sum of the student logit rows paired with teacher row t (cross view: the other
//          crops of the same sample, sum_v x_vb - x_ib; same row: x_t), W_r = sum of the pair
//          weights omega of student row r.
//
// Never stores [rows, K]: a K tile holds every row (student [S, kt], teacher [T, kt]), so the
// teacher-student pairing is an element-wise epilogue of the two tile GEMMs; per row only the
// running (max, sum) of the student and (max, sum, sum e * U) of the teacher are kept.
// The backward recomputes both tiles, forms G = W_r P_s - sum_pairs omega P_t, and takes
// dhhat += G vhat (per-chunk partial rows) and dvhat = G^T hhat (its own tile of K: no sharing).
//
// Threads: the K tiles are split into a fixed number of contiguous chunks (a function of K and
// the tile width only); each chunk runs its tiles in order, and per-row partials are merged in
// chunk order, so results are bitwise independent of the thread count.
// Cost in row-GEMMs of K x d: forward S + T, backward 3 S + T (recompute, dhhat, dvhat).
#include <torch/library.h>

#include "contrastive_core.h"

namespace fastssl {
namespace {

constexpr int64_t kMaxChunks = 32;

// Tile width in prototypes: a student + teacher tile of ~64K floats (256 KiB, L2-resident
// beside a kt x d panel of prototypes), between 16 and 256, a multiple of 16.
int64_t tile_width(int64_t rows) {
  int64_t kt = 65536 / std::max<int64_t>(rows, 1);
  kt = std::max<int64_t>(16, std::min<int64_t>(256, kt));
  return kt / 16 * 16;
}

struct Plan {
  int64_t S, T, K, d, B, kt, ntiles, nchunks;
  int64_t n_global;
  bool cross;
  int64_t chunk_begin(int64_t c) const { return c * ntiles / nchunks * kt; }
  int64_t chunk_end(int64_t c) const { return std::min(K, (c + 1) * ntiles / nchunks * kt); }
};

Plan make_plan(int64_t S, int64_t T, int64_t K, int64_t d, int64_t n_global, bool cross) {
  Plan p;
  p.S = S;
  p.T = T;
  p.K = K;
  p.d = d;
  p.cross = cross;
  p.n_global = cross ? n_global : 1;
  p.B = cross ? T / n_global : T;
  p.kt = tile_width(S + T);
  p.ntiles = (K + p.kt - 1) / p.kt;
  p.nchunks = std::min<int64_t>(p.ntiles, kMaxChunks);
  return p;
}

// Student weight W_r: sum of the pair weights of the teacher rows paired with student row r.
std::vector<double> student_weights(const Plan& p, const float* omega) {
  std::vector<double> w(p.S, 0.0);
  if (!p.cross) {
    for (int64_t r = 0; r < p.S; ++r) w[r] = omega[r];
    return w;
  }
  for (int64_t r = 0; r < p.S; ++r) {
    const int64_t v = r / p.B, b = r % p.B;
    for (int64_t i = 0; i < p.n_global; ++i)
      if (i != v) w[r] += omega[i * p.B + b];
  }
  return w;
}

// The element-wise epilogues below run once or twice per logit, with `omp simd` reductions.
// Not FASTSSL_SIMD_CLONES: measured, exp_f32 was then no longer inlined into the clones (a
// scalar call per element: the forward at B = 64, K = 65,536 went from ~0.5x to 1.1x eager's
// time).

// buf[r, j] = (raw GEMM) * rinv_rows[r] * rinv_cols[j] * scale.
void scale_tile(float* __restrict buf, int64_t rows, int64_t kt,
                const float* __restrict rinv_rows, const float* __restrict rinv_cols,
                float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = buf + r * kt;
    const float f = rinv_rows[r] * scale;
#pragma omp simd
    for (int64_t j = 0; j < kt; ++j) row[j] *= f * rinv_cols[j];
  }
}

// [Online softmax, teacher] y = s_t cos - shift in place; the running sum of e^{y - max} and of
// e^{y - max} U (U: the paired student logits, all - own in cross view, own otherwise) are
// rescaled whenever the row maximum moves.
void teacher_tile(float* __restrict y, const float* __restrict shift, float ts, int64_t n,
                  const float* __restrict all, const float* __restrict own, float* tm,
                  float* tl, float* ta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = y[j] * ts - shift[j];
  float rm = kNegInf;
#pragma omp simd reduction(max : rm)
  for (int64_t j = 0; j < n; ++j) rm = y[j] > rm ? y[j] : rm;
  const float nm = *tm > rm ? *tm : rm;
  const float sh = finite_or_zero(nm);
  float el = 0.0f, ea = 0.0f;
  if (all != nullptr) {
#pragma omp simd reduction(+ : el, ea)
    for (int64_t j = 0; j < n; ++j) {
      const float e = exp_f32(y[j] - sh);
      el += e;
      ea += e * (all[j] - own[j]);
    }
  } else {
#pragma omp simd reduction(+ : el, ea)
    for (int64_t j = 0; j < n; ++j) {
      const float e = exp_f32(y[j] - sh);
      el += e;
      ea += e * own[j];
    }
  }
  const float resc = exp_f32(*tm - sh);
  *tl = *tl * resc + el;
  *ta = *ta * resc + ea;
  *tm = nm;
}

// y <- omega exp(s_t y - shift - lse): the teacher's pair-weighted probabilities.
void teacher_probs(float* __restrict y, const float* __restrict shift, float lse, float om,
                   int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = om * exp_f32(y[j] - shift[j] - lse);
}

// x <- gs (w exp(x - lse) - (q_all - q_own)) (q_own may be null): G' of one student row.
void student_grad(float* __restrict x, float lse, float w, float gs,
                  const float* __restrict q_all, const float* __restrict q_own, int64_t n) {
  if (q_own != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] = gs * (w * exp_f32(x[j] - lse) - (q_all[j] - q_own[j]));
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] = gs * (w * exp_f32(x[j] - lse) - q_all[j]);
  }
}

void check_inputs(const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& ws,
                  const at::Tensor& wt, const at::Tensor& shift, const at::Tensor& omega,
                  int64_t n_global, bool cross) {
  TORCH_CHECK(hs.dim() == 2 && ht.dim() == 2 && ws.dim() == 2 && wt.dim() == 2,
              "fastssl::dino_loss: student_h, teacher_h and the weights must be 2-D");
  TORCH_CHECK(hs.size(1) == ht.size(1) && ws.size(1) == hs.size(1) && wt.size(1) == hs.size(1),
              "fastssl::dino_loss: every input must have the same bottleneck width d");
  TORCH_CHECK(ws.size(0) == wt.size(0) && shift.numel() == ws.size(0),
              "fastssl::dino_loss: weights and teacher_shift must agree on K");
  TORCH_CHECK(omega.numel() == ht.size(0), "fastssl::dino_loss: pair_weight must be (T,)");
  if (cross) {
    TORCH_CHECK(n_global >= 1 && ht.size(0) % n_global == 0 && ht.size(0) > 0,
                "fastssl::dino_loss: teacher rows must be n_global * B");
    const int64_t B = ht.size(0) / n_global;
    TORCH_CHECK(hs.size(0) % B == 0 && hs.size(0) / B >= n_global,
                "fastssl::dino_loss: student rows must be n_crops * B with n_crops >= n_global");
  } else {
    TORCH_CHECK(hs.size(0) == ht.size(0),
                "fastssl::dino_loss: same-row pairing needs as many student as teacher rows");
  }
}

}  // namespace

// Returns (loss 0-dim fp32, student_lse [S] fp32, teacher_lse [T] fp32 (LSE of y),
// teacher_logit_sum [K] fp32 (column sums of the teacher cosines, for the centre)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dino_loss_fwd_cpu(
    const at::Tensor& student_h, const at::Tensor& teacher_h, const at::Tensor& weight_student,
    const at::Tensor& weight_teacher, const at::Tensor& teacher_shift,
    const at::Tensor& student_scale, const at::Tensor& teacher_scale,
    const at::Tensor& pair_weight, int64_t n_global, bool cross_view) {
  check_inputs(student_h, teacher_h, weight_student, weight_teacher, teacher_shift, pair_weight,
               n_global, cross_view);
  const Plan p = make_plan(student_h.size(0), teacher_h.size(0), weight_student.size(0),
                           student_h.size(1), n_global, cross_view);
  const float ss = student_scale.item<float>(), ts = teacher_scale.item<float>();
  auto f32 = student_h.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32), slse = at::empty({p.S}, f32), tlse = at::empty({p.T}, f32);
  at::Tensor lsum = at::empty({p.K}, f32);
  const core::Operand HS = core::stage(student_h, true), HT = core::stage(teacher_h, true);
  const core::Operand WS = core::stage(weight_student, true);
  const bool same_w = weight_teacher.is_same(weight_student);
  const core::Operand WT = same_w ? WS : core::stage(weight_teacher, true);
  if (!(HS.finite && HT.finite && WS.finite && WT.finite)) {
    for (auto* t : {&loss, &slse, &tlse, &lsum}) t->fill_(std::numeric_limits<float>::quiet_NaN());
    return {loss, slse, tlse, lsum};
  }
  at::Tensor shift_t = teacher_shift.to(at::kFloat).contiguous();
  at::Tensor omega_t = pair_weight.to(at::kFloat).contiguous();
  const float* shift = shift_t.data_ptr<float>();
  const float* omega = omega_t.data_ptr<float>();
  float* colsum = lsum.data_ptr<float>();
  const int64_t S = p.S, T = p.T, B = p.B, d = p.d, kt = p.kt, nch = p.nchunks;
  // Per-chunk running statistics: student (max, sum), teacher (max, sum, sum e * U).
  std::vector<float> smax(nch * S, kNegInf), ssum(nch * S, 0.0f);
  std::vector<float> tmax(nch * T, kNegInf), tsum(nch * T, 0.0f), tacc(nch * T, 0.0f);
  TileBuffers bufs((S + T + (p.cross ? B : 0)) * kt);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    float* sbuf = bufs.get();
    float* tbuf = sbuf + S * kt;
    float* xsum = tbuf + T * kt;
    for (int64_t c = c0; c < c1; ++c) {
      float* sm = smax.data() + c * S;
      float* sl = ssum.data() + c * S;
      float* tm = tmax.data() + c * T;
      float* tl = tsum.data() + c * T;
      float* ta = tacc.data() + c * T;
      for (int64_t k0 = p.chunk_begin(c); k0 < p.chunk_end(c); k0 += kt) {
        const int64_t n = std::min(kt, p.K - k0);
        // 1. student logits x = s_s hhat vhat^T (read S d + n d, 2 S n d FLOPs).
        gemm_rm(false, true, S, n, d, 1.0f, HS.x, d, WS.x + k0 * d, d, 0.0f, sbuf, n);
        scale_tile(sbuf, S, n, HS.rinv, WS.rinv + k0, ss);
        online_lse_tile(sbuf, S, n, sm, sl, nullptr, nullptr, nullptr);
        // 2. teacher cosines; their column sums feed the centre.
        gemm_rm(false, true, T, n, d, 1.0f, HT.x, d, WT.x + k0 * d, d, 0.0f, tbuf, n);
        scale_tile(tbuf, T, n, HT.rinv, WT.rinv + k0, 1.0f);
        for (int64_t j = 0; j < n; ++j) {
          double acc = 0.0;
          for (int64_t t = 0; t < T; ++t) acc += tbuf[t * n + j];
          colsum[k0 + j] = static_cast<float>(acc);
        }
        // 3. sum over crops of the student logits of each sample (cross view).
        if (p.cross) {
          std::fill(xsum, xsum + B * n, 0.0f);
          for (int64_t r = 0; r < S; ++r) {
            float* dst = xsum + (r % B) * n;
            const float* src = sbuf + r * n;
            for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
          }
        }
        // 4. [Online softmax, teacher] y = s_t cos - shift; the running sum e * U is rescaled
        //    with the running sum whenever the row maximum moves.
        for (int64_t t = 0; t < T; ++t) {
          // cross view: student row i B + b is row t itself (crop i of sample b)
          teacher_tile(tbuf + t * n, shift + k0, ts, n, p.cross ? xsum + (t % B) * n : nullptr,
                       sbuf + t * n, tm + t, tl + t, ta + t);
        }
      }
    }
  });
  // Merge the chunks in order: LSE = M + log sum_c l_c exp(m_c - M).
  float* sl_out = slse.data_ptr<float>();
  float* tl_out = tlse.data_ptr<float>();
  const std::vector<double> W = student_weights(p, omega);
  double total = 0.0;
  for (int64_t r = 0; r < S; ++r) {
    float M = kNegInf;
    for (int64_t c = 0; c < nch; ++c) M = std::max(M, smax[c * S + r]);
    double l = 0.0;
    for (int64_t c = 0; c < nch; ++c) l += ssum[c * S + r] * std::exp((double)smax[c * S + r] - M);
    const double lse = M + std::log(l);
    sl_out[r] = static_cast<float>(lse);
    total += W[r] * lse;
  }
  for (int64_t t = 0; t < T; ++t) {
    float M = kNegInf;
    for (int64_t c = 0; c < nch; ++c) M = std::max(M, tmax[c * T + t]);
    double l = 0.0, a = 0.0;
    for (int64_t c = 0; c < nch; ++c) {
      const double f = std::exp((double)tmax[c * T + t] - M);
      l += tsum[c * T + t] * f;
      a += tacc[c * T + t] * f;
    }
    tl_out[t] = static_cast<float>(M + std::log(l));
    total -= omega[t] * (a / l);
  }
  loss.fill_(total);
  return {loss, slse, tlse, lsum};
}

// Returns (dstudent_h in its dtype, dweight_student in its dtype).
std::tuple<at::Tensor, at::Tensor> dino_loss_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& student_h, const at::Tensor& teacher_h,
    const at::Tensor& weight_student, const at::Tensor& weight_teacher,
    const at::Tensor& teacher_shift, const at::Tensor& student_scale,
    const at::Tensor& teacher_scale, const at::Tensor& pair_weight,
    const at::Tensor& student_lse, const at::Tensor& teacher_lse, int64_t n_global,
    bool cross_view) {
  check_inputs(student_h, teacher_h, weight_student, weight_teacher, teacher_shift, pair_weight,
               n_global, cross_view);
  const Plan p = make_plan(student_h.size(0), teacher_h.size(0), weight_student.size(0),
                           student_h.size(1), n_global, cross_view);
  const float ss = student_scale.item<float>(), ts = teacher_scale.item<float>();
  const float g = grad.item<float>();
  auto f32 = student_h.options().dtype(at::kFloat);
  const int64_t S = p.S, T = p.T, B = p.B, d = p.d, K = p.K, kt = p.kt, nch = p.nchunks;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (!student_lse.isfinite().all().item<bool>() || !teacher_lse.isfinite().all().item<bool>())
    return {at::full({S, d}, nan, student_h.options()),
            at::full({K, d}, nan, weight_student.options())};
  const core::Operand HS = core::stage(student_h, true), HT = core::stage(teacher_h, true);
  const core::Operand WS = core::stage(weight_student, true);
  const bool same_w = weight_teacher.is_same(weight_student);
  const core::Operand WT = same_w ? WS : core::stage(weight_teacher, true);
  at::Tensor shift_t = teacher_shift.to(at::kFloat).contiguous();
  at::Tensor omega_t = pair_weight.to(at::kFloat).contiguous();
  at::Tensor slse_t = student_lse.to(at::kFloat).contiguous();
  at::Tensor tlse_t = teacher_lse.to(at::kFloat).contiguous();
  const float* shift = shift_t.data_ptr<float>();
  const float* omega = omega_t.data_ptr<float>();
  const float* slse = slse_t.data_ptr<float>();
  const float* tlse = tlse_t.data_ptr<float>();
  std::vector<float> W(S);
  {
    const std::vector<double> Wd = student_weights(p, omega);
    for (int64_t r = 0; r < S; ++r) W[r] = static_cast<float>(Wd[r]);
  }
  // hhat as fp32 rows (O(S d)): the left operand of dvhat = G^T hhat.
  at::Tensor hhat_t = at::empty({S, d}, f32);
  float* hhat = hhat_t.data_ptr<float>();
  for (int64_t r = 0; r < S; ++r)
    for (int64_t k = 0; k < d; ++k) hhat[r * d + k] = HS.hat(r, k);
  // dvhat (K x d): the output itself when it is fp32, else an fp32 buffer cast at the end.
  at::Tensor dw = at::empty({K, d}, f32);
  float* dwp = dw.data_ptr<float>();
  at::Tensor dh_part = at::empty({nch, S, d}, f32);
  float* dhp = dh_part.data_ptr<float>();
  TileBuffers bufs((S + T + (p.cross ? B : 0)) * kt);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    float* sbuf = bufs.get();
    float* tbuf = sbuf + S * kt;
    float* pt = tbuf + T * kt;
    for (int64_t c = c0; c < c1; ++c) {
      float* dh = dhp + c * S * d;
      bool first = true;
      for (int64_t k0 = p.chunk_begin(c); k0 < p.chunk_end(c); k0 += kt) {
        const int64_t n = std::min(kt, K - k0);
        // 1. recompute P_s = exp(x - lse_s) and P_t = exp(y - lse_t).
        gemm_rm(false, true, S, n, d, 1.0f, HS.x, d, WS.x + k0 * d, d, 0.0f, sbuf, n);
        scale_tile(sbuf, S, n, HS.rinv, WS.rinv + k0, ss);
        gemm_rm(false, true, T, n, d, 1.0f, HT.x, d, WT.x + k0 * d, d, 0.0f, tbuf, n);
        scale_tile(tbuf, T, n, HT.rinv, WT.rinv + k0, ts);
        for (int64_t t = 0; t < T; ++t) teacher_probs(tbuf + t * n, shift + k0, tlse[t], omega[t], n);
        if (p.cross) {
          std::fill(pt, pt + B * n, 0.0f);
          for (int64_t t = 0; t < T; ++t) {
            float* dst = pt + (t % B) * n;
            const float* src = tbuf + t * n;
            for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
          }
        }
        // 2. G' = g s_s (W_r P_s - Q_r), Q_r = sum over the teacher rows paired with r of
        //    omega P_t (cross view: all global crops of sample b except crop v itself).
        const float gs = g * ss;
        for (int64_t r = 0; r < S; ++r) {
          float* x = sbuf + r * n;
          const float ls = slse[r], wr = W[r];
          const int64_t v = r / B, b = r % B;
          const float* q_all = p.cross ? pt + b * n : tbuf + r * n;
          const float* q_own = (p.cross && v < p.n_global) ? tbuf + r * n : nullptr;
          student_grad(x, ls, wr, gs, q_all, q_own, n);
        }
        // 3. dvhat tile = G'^T hhat (its own rows of dw: no other chunk writes them).
        gemm_rm(true, false, n, d, S, 1.0f, sbuf, n, hhat, d, 0.0f, dwp + k0 * d, d);
        // 4. dhhat += (G' rinv_w) W_raw: this chunk's partial.
        for (int64_t r = 0; r < S; ++r) {
          float* x = sbuf + r * n;
          for (int64_t j = 0; j < n; ++j) x[j] *= WS.rinv[k0 + j];
        }
        gemm_rm(false, false, S, d, n, 1.0f, sbuf, n, WS.x + k0 * d, d, first ? 0.0f : 1.0f, dh,
                d);
        first = false;
      }
      if (first) std::fill(dh, dh + S * d, 0.0f);
    }
  });
  // Merge the partial dhhat in chunk order, then the normalisation backward of both operands
  // (the weight-norm chain rule is F.normalize's: dV = (dvhat - vhat (vhat . dvhat)) / ||V||).
  at::Tensor dh = at::empty({S, d}, f32);
  float* dho = dh.data_ptr<float>();
  at::parallel_for(0, S, core::row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* out = dho + r * d;
      std::copy(dhp + r * d, dhp + (r + 1) * d, out);
      for (int64_t c = 1; c < nch; ++c) {
        const float* src = dhp + (c * S + r) * d;
        for (int64_t k = 0; k < d; ++k) out[k] += src[k];
      }
    }
  });
  core::normalize_backward(HS, dho);
  core::normalize_backward(WS, dwp);
  return {core::to_dtype(dh, student_h.scalar_type()),
          core::to_dtype(dw, weight_student.scalar_type())};
}

// Sinkhorn-Knopp step: X_tk = s_t that_t . uhat_k + row_shift_t + col_shift_k.
// Returns (row LSE over k [T] fp32, column LSE over t [K] fp32) in one streamed pass.
std::tuple<at::Tensor, at::Tensor> dino_teacher_lse_cpu(const at::Tensor& teacher_h,
                                                        const at::Tensor& weight_teacher,
                                                        const at::Tensor& teacher_scale,
                                                        const at::Tensor& row_shift,
                                                        const at::Tensor& col_shift) {
  TORCH_CHECK(teacher_h.dim() == 2 && weight_teacher.dim() == 2 &&
                  teacher_h.size(1) == weight_teacher.size(1),
              "fastssl::dino_teacher_lse: teacher_h (T, d) and weight_teacher (K, d) expected");
  TORCH_CHECK(row_shift.numel() == teacher_h.size(0) && col_shift.numel() == weight_teacher.size(0),
              "fastssl::dino_teacher_lse: row_shift must be (T,) and col_shift (K,)");
  const int64_t T = teacher_h.size(0), K = weight_teacher.size(0), d = teacher_h.size(1);
  const float ts = teacher_scale.item<float>();
  auto f32 = teacher_h.options().dtype(at::kFloat);
  at::Tensor rl = at::empty({T}, f32), cl = at::empty({K}, f32);
  const core::Operand HT = core::stage(teacher_h, true), WT = core::stage(weight_teacher, true);
  if (!(HT.finite && WT.finite)) {
    rl.fill_(std::numeric_limits<float>::quiet_NaN());
    cl.fill_(std::numeric_limits<float>::quiet_NaN());
    return {rl, cl};
  }
  at::Tensor rs_t = row_shift.to(at::kFloat).contiguous(), cs_t = col_shift.to(at::kFloat).contiguous();
  const float* rs = rs_t.data_ptr<float>();
  const float* cs = cs_t.data_ptr<float>();
  float* clp = cl.data_ptr<float>();
  const int64_t kt = tile_width(T);
  const int64_t ntiles = (K + kt - 1) / kt, nch = std::min<int64_t>(ntiles, kMaxChunks);
  std::vector<float> rmax(nch * T, kNegInf), rsum(nch * T, 0.0f);
  TileBuffers bufs(T * kt + 2 * kt);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    float* buf = bufs.get();
    float* cmax = buf + T * kt;
    float* csum = cmax + kt;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t kb = c * ntiles / nch * kt, ke = std::min(K, (c + 1) * ntiles / nch * kt);
      for (int64_t k0 = kb; k0 < ke; k0 += kt) {
        const int64_t n = std::min(kt, K - k0);
        gemm_rm(false, true, T, n, d, 1.0f, HT.x, d, WT.x + k0 * d, d, 0.0f, buf, n);
        scale_tile(buf, T, n, HT.rinv, WT.rinv + k0, ts);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t j = 0; j < n; ++j) buf[t * n + j] += rs[t] + cs[k0 + j];
        // The tile holds every row: its column statistics are final.
        std::fill(cmax, cmax + n, kNegInf);
        std::fill(csum, csum + n, 0.0f);
        float scratch[256];
        online_lse_tile(buf, T, n, rmax.data() + c * T, rsum.data() + c * T, cmax, csum, scratch);
        for (int64_t j = 0; j < n; ++j) clp[k0 + j] = cmax[j] + std::log(csum[j]);
      }
    }
  });
  float* rlp = rl.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    float M = kNegInf;
    for (int64_t c = 0; c < nch; ++c) M = std::max(M, rmax[c * T + t]);
    double l = 0.0;
    for (int64_t c = 0; c < nch; ++c) l += rsum[c * T + t] * std::exp((double)rmax[c * T + t] - M);
    rlp[t] = static_cast<float>(M + std::log(l));
  }
  return {rl, cl};
}

}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("dino_loss_fwd", &fastssl::dino_loss_fwd_cpu);
  m.impl("dino_loss_bwd", &fastssl::dino_loss_bwd_cpu);
  m.impl("dino_teacher_lse", &fastssl::dino_teacher_lse_cpu);
}
