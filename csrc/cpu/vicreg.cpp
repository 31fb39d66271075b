// VICReg (Bardes et al. 2022, https://arxiv.org/abs/2105.04906) with lightly's conventions,
// without the D x D covariance matrices; math, paths and cost model: fastssl/ops/redundancy.py.
//
//   L = sim mean((Z1 - Z2)^2) + var (V1 + V2) / 2 + cov (Q1 + Q2), per view X = Z - mu,
//   v_d the unbiased variance, s_d = sqrt(v_d + eps), V = mean_d relu(1 - s_d),
//   Q = (||X^T X||^2 / (N - 1)^2 - sum_d v_d^2) / D.
//
// Gram path: ||X^T X||^2 = ||X X^T||^2 from 256-column blocks of X (both views' Grams saved
// packed in one N x N buffer, redundancy.h); backward
// dX = 4 cov ((X X^T) X - X diag((N - 1) v)) / (D (N - 1)^2) per block.
// Tiled path: X centred in full (N >= 5 D / 3: no larger than the input), K = X^T X in
// 128 x 128 tiles, the upper triangle of tiles in the forward (K is symmetric), every tile
// recomputed in the backward by the owner of its output column tile.
// Each view is done in turn, so one view's scratch is live at a time.
#include <torch/library.h>

#include "redundancy.h"

namespace fastssl {
namespace {

constexpr int64_t kGram = 1;  // ops/redundancy.py PATH_GRAM

// ||X^T X||_F^2 of the centred view, in double; on the Gram path it fills view `second`'s half
// of the packed pair of Grams (redundancy.h).
double gram_or_tiles_norm(const float* z, int64_t n, int64_t d, const float* mu, bool gram,
                          bool second, float* packed, float* diag) {
  if (gram) {
    const int64_t kb_max = std::min(redundancy::kBlock, d);
    std::vector<float> x(n * kb_max);
    for (int64_t k0 = 0; k0 < d; k0 += redundancy::kBlock) {
      const int64_t kb = std::min(redundancy::kBlock, d - k0);
      redundancy::load_block(z, n, d, k0, kb, mu, nullptr, x.data());
      redundancy::packed_gram(x.data(), n, kb, k0 > 0, second, packed, diag + (second ? n : 0));
    }
    return redundancy::packed_frob(packed, diag, n, second);
  }
  std::vector<float> x(n * d);
  redundancy::load_block(z, n, d, 0, d, mu, nullptr, x.data());
  return redundancy::tiled_cross_frob(x.data(), x.data(), n, d, true);
}

// dz (n x d) of one view: the covariance and variance terms (scaled by the upstream gradient
// go), minus their column means (the centring's backward), plus the invariance term
// 2 sim (z - other) / (N D).
void view_backward(const float* z, const float* other, int64_t n, int64_t d, const float* mu,
                   const float* var, const float* packed, const float* diag, bool second,
                   bool gram, double go, double sim,
                   double var_w, double cov_w, double eps, float* dz) {
  const double nm1 = static_cast<double>(n - 1);
  // Covariance: dX = a ((X X^T) X - X diag(ss)), ss_d = sum_n x_nd^2 = (N - 1) v_d.
  const float a = static_cast<float>(go * cov_w * 4.0 / (static_cast<double>(d) * nm1 * nm1));
  // Variance hinge: dX = h_d X with h_d = -go var / (2 D s_d (N - 1)) where s_d < 1.
  std::vector<float> diag_coef(d);  // per column: -a ss_d + h_d
  for (int64_t c = 0; c < d; ++c) {
    const double s = std::sqrt(static_cast<double>(var[c]) + eps);
    const double h = s < 1.0 ? -go * var_w / (2.0 * static_cast<double>(d) * s * nm1) : 0.0;
    diag_coef[c] = static_cast<float>(-static_cast<double>(a) * nm1 * var[c] + h);
  }
  const float inv = static_cast<float>(go * sim * 2.0 / (static_cast<double>(n) * d));
  // Writes the block's dX + the diagonal terms into dx (n x kb), then the centring backward
  // and the invariance gradient into dz[:, k0:k0+kb].
  auto finish = [&](float* dx, const float* x, int64_t k0, int64_t kb, int64_t ld) {
    std::vector<double> sums(kb, 0.0);
    constexpr int64_t kCols = 64;
    const int64_t units = (kb + kCols - 1) / kCols;
    at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t c = 0; c < kb; ++c) dx[i * ld + c] += diag_coef[k0 + c] * x[i * ld + c];
    });
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t c0 = u * kCols, cw = std::min(kCols, kb - c0);
        double s[kCols] = {0};
        for (int64_t i = 0; i < n; ++i)
          for (int64_t c = 0; c < cw; ++c) s[c] += dx[i * ld + c0 + c];
        for (int64_t c = 0; c < cw; ++c) sums[c0 + c] = s[c];
      }
    });
    std::vector<float> mean(kb);
    for (int64_t c = 0; c < kb; ++c) mean[c] = static_cast<float>(sums[c] / n);
    at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float* zr = z + i * d + k0;
        const float* orow = other + i * d + k0;
        float* out = dz + i * d + k0;
        for (int64_t c = 0; c < kb; ++c)
          out[c] = (dx[i * ld + c] - mean[c]) + inv * (zr[c] - orow[c]);
      }
    });
  };
  if (gram) {
    const int64_t kb_max = std::min(redundancy::kBlock, d);
    std::vector<float> x(n * kb_max), dx(n * kb_max);
    for (int64_t k0 = 0; k0 < d; k0 += redundancy::kBlock) {
      const int64_t kb = std::min(redundancy::kBlock, d - k0);
      redundancy::load_block(z, n, d, k0, kb, mu, nullptr, x.data());
      redundancy::packed_gram_times(packed, diag, n, second, x.data(), kb, a, dx.data());
      finish(dx.data(), x.data(), k0, kb, kb);
    }
    return;
  }
  std::vector<float> x(n * d), dx(n * d);
  redundancy::load_block(z, n, d, 0, d, mu, nullptr, x.data());
  const int64_t T = redundancy::kTile, tiles = (d + T - 1) / T;
  TileBuffers buf(T * T);
  // Units = column tiles i of dX: dX_i = a sum_j X_j (X_j^T X_i) (full tiles: the diagonal of K
  // comes back out through diag_coef's -a ss_d).
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    float* k = buf.get();
    for (int64_t i = t0; i < t1; ++i) {
      const int64_t i0 = i * T, ti = std::min(T, d - i0);
      for (int64_t j = 0; j < tiles; ++j) {
        const int64_t j0 = j * T, tj = std::min(T, d - j0);
        gemm_rm(true, false, tj, ti, n, 1.0f, x.data() + j0, d, x.data() + i0, d, 0.0f, k, ti);
        gemm_rm(false, false, n, ti, tj, a, x.data() + j0, d, k, ti, j > 0 ? 1.0f : 0.0f,
                dx.data() + i0, d);
      }
    }
  });
  finish(dx.data(), x.data(), 0, d, d);
}

}  // namespace

// Returns (loss 0-dim fp32, stats (4, D) fp32 = [mu1, v1, mu2, v2], grams, gram_diags (the
// packed pair of Grams N x N and their diagonals 2 x N on the Gram path, (0, 0) on the tiled).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vicreg_fwd_cpu(
    const at::Tensor& z1_in, const at::Tensor& z2_in, double sim, double var_w, double cov_w,
    double eps, int64_t path) {
  TORCH_CHECK(z1_in.dim() == 2 && z1_in.sizes() == z2_in.sizes() && z1_in.size(0) >= 2,
              "fastssl::vicreg: z1 and z2 must be (N, D) of the same shape with N >= 2");
  const int64_t n = z1_in.size(0), d = z1_in.size(1);
  const at::Tensor z1 = redundancy::as_f32(z1_in), z2 = redundancy::as_f32(z2_in);
  const float* p[2] = {z1.data_ptr<float>(), z2.data_ptr<float>()};
  auto f32 = z1.options();
  const bool gram = path == kGram;
  at::Tensor stats = at::empty({4, d}, f32);
  // Gram path: the packed pair of Grams (view 1 strictly lower, view 2 strictly upper) and
  // their diagonals; (0, 0) tensors on the tiled path.
  at::Tensor grams = at::empty({gram ? n : 0, gram ? n : 0}, f32);
  at::Tensor diags = at::empty({gram ? 2 : 0, gram ? n : 0}, f32);
  float* st = stats.data_ptr<float>();
  const double nm1 = static_cast<double>(n - 1);
  double variance = 0.0, covariance = 0.0;
  for (int v = 0; v < 2; ++v) {
    float* mu = st + 2 * v * d;
    float* vr = st + (2 * v + 1) * d;
    redundancy::column_stats(p[v], n, d, mu, vr);
    double hinge = 0.0, diag_sq = 0.0;
    for (int64_t c = 0; c < d; ++c) {
      hinge += std::max(0.0, 1.0 - std::sqrt(static_cast<double>(vr[c]) + eps));
      diag_sq += static_cast<double>(vr[c]) * vr[c];
    }
    const double frob = gram_or_tiles_norm(p[v], n, d, mu, gram, v == 1,
                                           gram ? grams.data_ptr<float>() : nullptr,
                                           gram ? diags.data_ptr<float>() : nullptr);
    variance += hinge / d;
    covariance += (frob / (nm1 * nm1) - diag_sq) / d;
  }
  // Invariance: fixed row chunks, partial sums added in order.
  constexpr int64_t kRows = 64;
  const int64_t chunks = (n + kRows - 1) / kRows;
  std::vector<double> part(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double acc = 0.0;
      const int64_t e0 = c * kRows * d, e1 = std::min(n, (c + 1) * kRows) * d;
      for (int64_t e = e0; e < e1; ++e) {
        const double diff = static_cast<double>(p[0][e]) - p[1][e];
        acc += diff * diff;
      }
      part[c] = acc;
    }
  });
  double sq = 0.0;
  for (double x : part) sq += x;
  const double loss = sim * sq / (static_cast<double>(n) * d) + var_w * variance / 2 +
                      cov_w * covariance;
  return {at::full({}, loss, f32), stats, grams, diags};
}

// Returns (dz1, dz2) in the inputs' dtype.
std::tuple<at::Tensor, at::Tensor> vicreg_bwd_cpu(const at::Tensor& grad, const at::Tensor& z1_in,
                                                  const at::Tensor& z2_in,
                                                  const at::Tensor& stats_in, const at::Tensor& g1,
                                                  const at::Tensor& g2, double sim, double var_w,
                                                  double cov_w, double eps, int64_t path) {
  const int64_t n = z1_in.size(0), d = z1_in.size(1);
  const at::Tensor z1 = redundancy::as_f32(z1_in), z2 = redundancy::as_f32(z2_in);
  const at::Tensor stats = stats_in.contiguous();
  const float* st = stats.data_ptr<float>();
  const double go = grad.to(at::kDouble).item<double>();
  const bool gram = path == kGram;
  auto f32 = z1.options();
  at::Tensor dz1 = at::empty({n, d}, f32), dz2 = at::empty({n, d}, f32);
  const float* p1 = z1.data_ptr<float>();
  const float* p2 = z2.data_ptr<float>();
  const float* packed = gram ? g1.data_ptr<float>() : nullptr;
  const float* diag = gram ? g2.data_ptr<float>() : nullptr;
  view_backward(p1, p2, n, d, st, st + d, packed, diag, false, gram, go, sim, var_w, cov_w, eps,
                dz1.data_ptr<float>());
  view_backward(p2, p1, n, d, st + 2 * d, st + 3 * d, packed, diag, true, gram, go, sim, var_w,
                cov_w, eps, dz2.data_ptr<float>());
  return {dz1.to(z1_in.scalar_type()), dz2.to(z2_in.scalar_type())};
}

}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("vicreg_fwd", &fastssl::vicreg_fwd_cpu);
  m.impl("vicreg_bwd", &fastssl::vicreg_bwd_cpu);
}
