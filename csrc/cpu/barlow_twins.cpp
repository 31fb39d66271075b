// Barlow Twins (Zbontar et al. 2021, https://arxiv.org/abs/2103.03230) without the D x D
// cross-correlation matrix; math, paths and cost model: fastssl/ops/redundancy.py.
//
//   A = (Z1 - mu1) r1, B = (Z2 - mu2) r2 (r = 1 / unbiased std; mu = 0, r = 1 unstandardised),
//   C = A^T B / N, L = sum_d (1 - c_d)^2 + lambda (||C||^2 - sum_d c_d^2).
//
// Gram path: ||C||^2 = <A A^T, B B^T> / N^2 from 256-column blocks of A and B (never all of A in
// memory), the two symmetric Grams saved packed in one N x N buffer (redundancy.h); backward dA = B diag(g) / N + (2 lambda / N^2) (B B^T) A per block,
// then the per-column standardisation backward.
// Tiled path: A, B standardised in full (N >= 5 D / 3 here, so they are no larger than the
// inputs), C in 128 x 128 tiles reduced as computed; backward recomputes each tile, once for
// dA (units: column tiles of A) and once for dB (column tiles of B): one writer per output.
#include <torch/library.h>

#include "redundancy.h"

namespace fastssl {
namespace {

constexpr int64_t kGram = 1;  // ops/redundancy.py PATH_GRAM

// stats rows: 0 mu1, 1 r1, 2 mu2, 3 r2, 4 c.
void fill_stats(const float* z, int64_t n, int64_t d, bool standardize, float* mu, float* r) {
  if (!standardize) {
    std::fill(mu, mu + d, 0.0f);
    std::fill(r, r + d, 1.0f);
    return;
  }
  std::vector<float> var(d);
  redundancy::column_stats(z, n, d, mu, var.data());
  for (int64_t c = 0; c < d; ++c) r[c] = 1.0f / std::sqrt(var[c]);
}

// Per column d of the block: dz = r (dA - mean dA - A sum(dA A) / (N - 1)) when standardised,
// dz = dA otherwise; written to dz[:, k0:k0+kb] (n x d).
void standardize_backward(const float* da, const float* a, int64_t n, int64_t d, int64_t k0,
                          int64_t kb, const float* r, bool standardize, float* dz) {
  std::vector<double> sum_da(kb, 0.0), dot_da_a(kb, 0.0);
  if (standardize) {
    constexpr int64_t kCols = 64;
    const int64_t units = (kb + kCols - 1) / kCols;
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t c0 = u * kCols, cw = std::min(kCols, kb - c0);
        double s[kCols] = {0}, p[kCols] = {0};
        for (int64_t i = 0; i < n; ++i) {
          const float* g = da + i * kb + c0;
          const float* x = a + i * kb + c0;
          for (int64_t c = 0; c < cw; ++c) {
            s[c] += g[c];
            p[c] += static_cast<double>(g[c]) * x[c];
          }
        }
        for (int64_t c = 0; c < cw; ++c) {
          sum_da[c0 + c] = s[c];
          dot_da_a[c0 + c] = p[c];
        }
      }
    });
  }
  std::vector<float> mean(kb), proj(kb);
  for (int64_t c = 0; c < kb && standardize; ++c) {
    mean[c] = static_cast<float>(sum_da[c] / static_cast<double>(n));
    proj[c] = static_cast<float>(dot_da_a[c] / static_cast<double>(n - 1));
  }
  at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* g = da + i * kb;
      const float* x = a + i * kb;
      float* out = dz + i * d + k0;
      if (!standardize) {
        for (int64_t c = 0; c < kb; ++c) out[c] = g[c];
        continue;
      }
      for (int64_t c = 0; c < kb; ++c) out[c] = r[k0 + c] * (g[c] - mean[c] - x[c] * proj[c]);
    }
  });
}

}  // namespace

// Returns (loss 0-dim fp32, stats (5, D) fp32, grams, gram_diags: on the Gram path the packed
// pair of Grams (N x N: A A^T strictly lower, B B^T strictly upper) and their diagonals (2 x N),
// (0, 0) tensors on the tiled path).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> barlow_twins_fwd_cpu(
    const at::Tensor& z1_in, const at::Tensor& z2_in, double lambda, bool standardize,
    int64_t path) {
  TORCH_CHECK(z1_in.dim() == 2 && z1_in.sizes() == z2_in.sizes(),
              "fastssl::barlow_twins: z1 and z2 must be (N, D) of the same shape");
  TORCH_CHECK(!standardize || z1_in.size(0) >= 2,
              "fastssl::barlow_twins: N >= 2 rows needed for the unbiased std");
  const int64_t n = z1_in.size(0), d = z1_in.size(1);
  const at::Tensor z1 = redundancy::as_f32(z1_in), z2 = redundancy::as_f32(z2_in);
  const float* p1 = z1.data_ptr<float>();
  const float* p2 = z2.data_ptr<float>();
  auto f32 = z1.options();
  at::Tensor stats = at::empty({5, d}, f32);
  float* st = stats.data_ptr<float>();
  float *mu1 = st, *r1 = st + d, *mu2 = st + 2 * d, *r2 = st + 3 * d, *cdiag = st + 4 * d;
  fill_stats(p1, n, d, standardize, mu1, r1);
  fill_stats(p2, n, d, standardize, mu2, r2);
  const double inv_n = 1.0 / static_cast<double>(n);
  double off = 0.0;  // ||A^T B||^2 (unscaled)
  at::Tensor g1, g2;  // Gram path: the packed pair (n x n) and its diagonals (2 x n)
  if (path == kGram) {
    g1 = at::empty({n, n}, f32);
    g2 = at::empty({2, n}, f32);
    float* packed = g1.data_ptr<float>();
    float* diag = g2.data_ptr<float>();
    const int64_t kb_max = std::min(redundancy::kBlock, d);
    std::vector<float> a(n * kb_max), b(n * kb_max);
    std::vector<double> dots(kb_max);
    for (int64_t k0 = 0; k0 < d; k0 += redundancy::kBlock) {
      const int64_t kb = std::min(redundancy::kBlock, d - k0);
      redundancy::load_block(p1, n, d, k0, kb, mu1, r1, a.data());
      redundancy::load_block(p2, n, d, k0, kb, mu2, r2, b.data());
      redundancy::column_dots(a.data(), b.data(), n, kb, dots.data());
      for (int64_t c = 0; c < kb; ++c) cdiag[k0 + c] = static_cast<float>(dots[c] * inv_n);
      redundancy::packed_gram(a.data(), n, kb, k0 > 0, false, packed, diag);
      redundancy::packed_gram(b.data(), n, kb, k0 > 0, true, packed, diag + n);
    }
    off = redundancy::packed_inner(packed, diag, n);
  } else {
    g1 = at::empty({0, 0}, f32);
    g2 = at::empty({0, 0}, f32);
    at::Tensor A = at::empty({n, d}, f32), B = at::empty({n, d}, f32);
    float* pa = A.data_ptr<float>();
    float* pb = B.data_ptr<float>();
    redundancy::load_block(p1, n, d, 0, d, mu1, r1, pa);
    redundancy::load_block(p2, n, d, 0, d, mu2, r2, pb);
    std::vector<double> dots(d);
    redundancy::column_dots(pa, pb, n, d, dots.data());
    for (int64_t c = 0; c < d; ++c) cdiag[c] = static_cast<float>(dots[c] * inv_n);
    off += redundancy::tiled_cross_frob(pa, pb, n, d, false);
  }
  double on = 0.0, diag_sq = 0.0;
  for (int64_t c = 0; c < d; ++c) {
    on += (1.0 - cdiag[c]) * (1.0 - cdiag[c]);
    diag_sq += static_cast<double>(cdiag[c]) * cdiag[c];
  }
  const double loss = on + lambda * (off * inv_n * inv_n - diag_sq);
  return {at::full({}, loss, f32), stats, g1, g2};
}

// Returns (dz1, dz2) in the inputs' dtype.
std::tuple<at::Tensor, at::Tensor> barlow_twins_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& z1_in, const at::Tensor& z2_in,
    const at::Tensor& stats_in, const at::Tensor& g1, const at::Tensor& g2, double lambda,
    bool standardize, int64_t path) {
  const int64_t n = z1_in.size(0), d = z1_in.size(1);
  const at::Tensor z1 = redundancy::as_f32(z1_in), z2 = redundancy::as_f32(z2_in);
  const at::Tensor stats = stats_in.contiguous();
  const float* st = stats.data_ptr<float>();
  const float *mu1 = st, *r1 = st + d, *mu2 = st + 2 * d, *r2 = st + 3 * d, *cdiag = st + 4 * d;
  const double go = grad.to(at::kDouble).item<double>();
  const double inv_n = 1.0 / static_cast<double>(n);
  // dL/dC = 2 lambda C + diag(gd): the diagonal part times B (for dA) or A (for dB), / N.
  std::vector<float> gd(d);
  for (int64_t c = 0; c < d; ++c)
    gd[c] = static_cast<float>(go * (-2.0 * (1.0 - cdiag[c]) - 2.0 * lambda * cdiag[c]) * inv_n);
  const float s = static_cast<float>(go * 2.0 * lambda * inv_n * inv_n);
  auto f32 = z1.options();
  at::Tensor dz1 = at::empty({n, d}, f32), dz2 = at::empty({n, d}, f32);
  const float* p1 = z1.data_ptr<float>();
  const float* p2 = z2.data_ptr<float>();
  // dA += B diag(gd) for columns [k0, k0 + kb) (a, b, da: n x ld blocks at column offset).
  auto add_diag = [&](float* da, const float* b, int64_t ld, int64_t k0, int64_t kb) {
    at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t c = 0; c < kb; ++c) da[i * ld + c] += b[i * ld + c] * gd[k0 + c];
    });
  };
  if (path == kGram) {
    const int64_t kb_max = std::min(redundancy::kBlock, d);
    std::vector<float> a(n * kb_max), b(n * kb_max), da(n * kb_max);
    for (int64_t k0 = 0; k0 < d; k0 += redundancy::kBlock) {
      const int64_t kb = std::min(redundancy::kBlock, d - k0);
      redundancy::load_block(p1, n, d, k0, kb, mu1, r1, a.data());
      redundancy::load_block(p2, n, d, k0, kb, mu2, r2, b.data());
      redundancy::packed_gram_times(g1.data_ptr<float>(), g2.data_ptr<float>(), n, true,
                                    a.data(), kb, s, da.data());
      add_diag(da.data(), b.data(), kb, k0, kb);
      standardize_backward(da.data(), a.data(), n, d, k0, kb, r1, standardize,
                           dz1.data_ptr<float>());
      redundancy::packed_gram_times(g1.data_ptr<float>(), g2.data_ptr<float>(), n, false,
                                    b.data(), kb, s, da.data());
      add_diag(da.data(), a.data(), kb, k0, kb);
      standardize_backward(da.data(), b.data(), n, d, k0, kb, r2, standardize,
                           dz2.data_ptr<float>());
    }
  } else {
    at::Tensor A = at::empty({n, d}, f32), B = at::empty({n, d}, f32);
    at::Tensor dA = at::empty({n, d}, f32), dB = at::empty({n, d}, f32);
    float* pa = A.data_ptr<float>();
    float* pb = B.data_ptr<float>();
    float* pda = dA.data_ptr<float>();
    float* pdb = dB.data_ptr<float>();
    redundancy::load_block(p1, n, d, 0, d, mu1, r1, pa);
    redundancy::load_block(p2, n, d, 0, d, mu2, r2, pb);
    const int64_t T = redundancy::kTile, tiles = (d + T - 1) / T;
    TileBuffers buf(T * T);
    // Pass 1, units = column tiles i of A: dA_i = s sum_j B_j (A_i^T B_j)^T.
    // Pass 2, units = column tiles j of B: dB_j = s sum_i A_i (A_i^T B_j).
    for (int pass = 0; pass < 2; ++pass) {
      at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
        float* c = buf.get();
        for (int64_t u = t0; u < t1; ++u) {
          const int64_t u0 = u * T, tu = std::min(T, d - u0);
          for (int64_t v = 0; v < tiles; ++v) {
            const int64_t v0 = v * T, tv = std::min(T, d - v0);
            if (pass == 0) {  // C_uv = A_u^T B_v (tu x tv); dA_u += s B_v C_uv^T
              gemm_rm(true, false, tu, tv, n, 1.0f, pa + u0, d, pb + v0, d, 0.0f, c, tv);
              gemm_rm(false, true, n, tu, tv, s, pb + v0, d, c, tv, v > 0 ? 1.0f : 0.0f,
                      pda + u0, d);
            } else {  // C_vu = A_v^T B_u (tv x tu); dB_u += s A_v C_vu
              gemm_rm(true, false, tv, tu, n, 1.0f, pa + v0, d, pb + u0, d, 0.0f, c, tu);
              gemm_rm(false, false, n, tu, tv, s, pa + v0, d, c, tu, v > 0 ? 1.0f : 0.0f,
                      pdb + u0, d);
            }
          }
        }
      });
    }
    add_diag(pda, pb, d, 0, d);
    add_diag(pdb, pa, d, 0, d);
    // The standardisation backward reads (n x kb) blocks; here one block of all d columns.
    standardize_backward(pda, pa, n, d, 0, d, r1, standardize, dz1.data_ptr<float>());
    standardize_backward(pdb, pb, n, d, 0, d, r2, standardize, dz2.data_ptr<float>());
  }
  return {dz1.to(z1_in.scalar_type()), dz2.to(z2_in.scalar_type())};
}

}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("barlow_twins_fwd", &fastssl::barlow_twins_fwd_cpu);
  m.impl("barlow_twins_bwd", &fastssl::barlow_twins_bwd_cpu);
}
