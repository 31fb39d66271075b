// Fused NT-Xent (SimCLR) loss on the CPU, forward and backward, in O(N·D) memory.
//
// Notation (DESIGN.md): Z = normalize([z1; z2]) is M x D with M = 2N, S = Z Z^T / tau,
// row i's target is t(i) = (i + N) mod M, the diagonal is masked (and, for the decoupled
// variant, the target too). loss_i = LSE_j S_ij - S_i,t(i).
//
// Design (chosen by measurement, see README's benchmark table):
//  * S is symmetric, so only the upper-triangle tile pairs (I <= J) are computed, each once:
//    a B x B tile feeds the running (max, sum) of the rows of block I (row-wise) *and* of
//    the rows of block J (column-wise). Forward = 0.5 matmul-equivalents of M^2 D.
//  * Backward recomputes each upper tile once (0.5 eq) and turns it in place into the
//    symmetric K = G + G^T, G_ij = g_i softmax_ij, from which both dZ_I += K Z_J and
//    dZ_J += K^T Z_I follow (2 x 0.5 eq). Total fwd+bwd = 2 matmul-equivalents, the floor
//    named in DESIGN.md. The "-1 at the target" of G is rank-one-per-row and is applied in
//    the O(M D) epilogue, exactly, in fp32.
//  * Tile GEMMs go to the BLAS that torch ships (single-threaded per tile inside
//    at::parallel_for); exp/max/sum run in FASTSSL_SIMD_CLONES loops (AVX-512 / AVX2).
//  * Threads own disjoint tile-pair ranges and private (max, sum) / dZ accumulators, merged in
//    a fixed order afterwards: deterministic for a given thread count, no atomics.
//  * Memory: Z in fp32 (M D), the row LSE (M), per-thread accumulators (T M D in backward)
//    and one B x B tile per thread. Never M x M.
//  * Non-finite inputs: detected while staging Z; the loss rows (and gradients) are NaN.
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace fastssl {
namespace {

// Tile edge. 256 x 256 fp32 = 256 KiB: the tile plus two 256 x D panels stay in L2 (1 MiB on
// Zen 4).
constexpr int64_t kTile = 256;
constexpr float kNormEps = 1e-12f;  // F.normalize's eps; the norm is computed in fp32

struct TilePair {
  int64_t i0, bi, j0, bj;
};

std::vector<TilePair> upper_tile_pairs(int64_t m) {
  std::vector<TilePair> pairs;
  for (int64_t i0 = 0; i0 < m; i0 += kTile)
    for (int64_t j0 = i0; j0 < m; j0 += kTile)
      pairs.push_back({i0, std::min(kTile, m - i0), j0, std::min(kTile, m - j0)});
  return pairs;
}

// Masks the self-similarity (diagonal tiles) and, for the decoupled loss, the target pair.
void mask_tile(float* s, const TilePair& p, int64_t n, bool decoupled) {
  const int64_t m = 2 * n;
  if (p.i0 == p.j0)
    for (int64_t r = 0; r < p.bi; ++r) s[r * p.bj + r] = kNegInf;
  if (decoupled)
    for (int64_t r = 0; r < p.bi; ++r) {
      const int64_t t = (p.i0 + r + n) % m;
      if (t >= p.j0 && t < p.j0 + p.bj) s[r * p.bj + (t - p.j0)] = kNegInf;
    }
}

// In place: S tile -> K tile, K_ij = g_i exp(S_ij - lse_i) + g_j exp(S_ij - lse_j), i.e. the
// block of G + G^T without the target term. Masked entries (-inf) give exactly 0.
FASTSSL_SIMD_CLONES
void ntxent_bwd_tile(float* __restrict s, int64_t bi, int64_t bj, const float* __restrict lse_i,
                     const float* __restrict g_i, const float* __restrict lse_j,
                     const float* __restrict g_j) {
  for (int64_t i = 0; i < bi; ++i) {
    float* row = s + i * bj;
    const float li = lse_i[i], gi = g_i[i];
#pragma omp simd
    for (int64_t j = 0; j < bj; ++j)
      row[j] = gi * exp_f32(row[j] - li) + g_j[j] * exp_f32(row[j] - lse_j[j]);
  }
}

void check_inputs(const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& temperature) {
  TORCH_CHECK(z1.dim() == 2 && z2.dim() == 2, "fastssl::ntxent: z1 and z2 must be 2-D");
  TORCH_CHECK(z1.sizes() == z2.sizes(), "fastssl::ntxent: z1 and z2 must have the same shape");
  TORCH_CHECK(z1.size(0) >= 1 && z1.size(1) >= 1, "fastssl::ntxent: need N >= 1 and D >= 1");
  TORCH_CHECK(at::isFloatingType(z1.scalar_type()) && z1.scalar_type() == z2.scalar_type(),
              "fastssl::ntxent: z1 and z2 must share one floating dtype");
  TORCH_CHECK(temperature.numel() == 1, "fastssl::ntxent: temperature must have one element");
}

}  // namespace

// Returns (loss rows [M] in the input dtype, lse [M] fp32, Z [M, D] fp32, norms [M] fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ntxent_fwd_cpu(
    const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& temperature, bool normalize,
    bool decoupled) {
  check_inputs(z1, z2, temperature);
  const int64_t n = z1.size(0), d = z1.size(1), m = 2 * n;
  const float alpha = static_cast<float>(1.0 / temperature.item<double>());
  auto f32 = z1.options().dtype(at::kFloat);

  // Stage Z = [z1; z2] in fp32 (any strides, bf16/fp16 upcast) and L2-normalise each row.
  at::Tensor zhat = at::empty({m, d}, f32);
  at::Tensor norms = at::empty({m}, f32);
  float* z = zhat.data_ptr<float>();
  const bool finite = copy_rows_to_f32(z1, z, 0) && copy_rows_to_f32(z2, z, n);
  float* nrm = norms.data_ptr<float>();
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = z + r * d;
      float ss = 0.0f;
      for (int64_t k = 0; k < d; ++k) ss += row[k] * row[k];
      nrm[r] = std::sqrt(ss);
      if (normalize) {
        const float inv = 1.0f / std::max(nrm[r], kNormEps);
        for (int64_t k = 0; k < d; ++k) row[k] *= inv;
      }
    }
  });
  at::Tensor lse = at::empty({m}, f32);
  if (!finite) {
    lse.fill_(std::numeric_limits<float>::quiet_NaN());
    return {lse.to(z1.scalar_type()), lse, zhat, norms};
  }

  // Upper-triangle tiles, split across threads; private running stats per thread.
  const auto pairs = upper_tile_pairs(m);
  const int nthreads = at::get_num_threads();
  at::Tensor stats = at::empty({nthreads, 2, m}, f32);
  stats.select(1, 0).fill_(kNegInf);
  stats.select(1, 1).zero_();
  float* st = stats.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t p0, int64_t p1) {
    const int tid = at::get_thread_num();
    float* tmax = st + static_cast<int64_t>(tid) * 2 * m;
    float* tsum = tmax + m;
    std::vector<float> tile(kTile * kTile), tmp(kTile);
    for (int64_t p = p0; p < p1; ++p) {
      const TilePair& tp = pairs[p];
      // S_IJ = Z_I Z_J^T / tau: reads (bi + bj) D floats, 2 bi bj D flops.
      gemm_rm(false, true, tp.bi, tp.bj, d, alpha, z + tp.i0 * d, d, z + tp.j0 * d, d, 0.0f,
              tile.data(), tp.bj);
      mask_tile(tile.data(), tp, n, decoupled);
      // A diagonal tile's columns are its own rows: update them once, as rows.
      const bool diagonal = tp.i0 == tp.j0;
      online_lse_tile(tile.data(), tp.bi, tp.bj, tmax + tp.i0, tsum + tp.i0,
                      diagonal ? nullptr : tmax + tp.j0, tsum + tp.j0, tmp.data());
    }
  });

  // Merge the per-thread (max, sum) in thread order, add the target logit.
  at::Tensor loss = at::empty({m}, f32);
  float* l = lse.data_ptr<float>();
  float* out = loss.data_ptr<float>();
  at::parallel_for(0, m, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float mx = kNegInf;
      for (int t = 0; t < nthreads; ++t) mx = std::max(mx, st[(int64_t)t * 2 * m + r]);
      double sum = 0.0;
      for (int t = 0; t < nthreads; ++t) {
        const float tm = st[(int64_t)t * 2 * m + r];
        if (tm != kNegInf) sum += st[(int64_t)t * 2 * m + m + r] * std::exp((double)(tm - mx));
      }
      l[r] = mx + static_cast<float>(std::log(sum));
      const float* zi = z + r * d;
      const float* zt = z + ((r + n) % m) * d;
      float dot = 0.0f;
      for (int64_t k = 0; k < d; ++k) dot += zi[k] * zt[k];
      out[r] = l[r] - alpha * dot;
    }
  });
  return {loss.to(z1.scalar_type()), lse, zhat, norms};
}

// Returns (dz1, dz2 in `dtype`, dtemperature as a 0-dim tensor like `temperature`).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ntxent_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& zhat, const at::Tensor& norms,
    const at::Tensor& lse, const at::Tensor& temperature, bool normalize, bool decoupled,
    at::ScalarType dtype) {
  const int64_t m = zhat.size(0), d = zhat.size(1), n = m / 2;
  const double tau = temperature.item<double>();
  const float alpha = static_cast<float>(1.0 / tau);
  at::Tensor g = grad_loss.to(at::kFloat).contiguous();
  const float* gp = g.data_ptr<float>();
  const float* z = zhat.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  const float* nrm = norms.data_ptr<float>();

  // Non-finite forward: propagate NaN gradients without touching the tiles.
  if (!std::isfinite(lse.sum().item<float>())) {
    at::Tensor nan = at::full({m, d}, std::numeric_limits<float>::quiet_NaN(), zhat.options());
    auto dz = nan.to(dtype);
    return {dz.narrow(0, 0, n).clone(), dz.narrow(0, n, n).clone(),
            at::full_like(temperature, std::numeric_limits<double>::quiet_NaN())};
  }

  const auto pairs = upper_tile_pairs(m);
  const int nthreads = at::get_num_threads();
  // Private dZ accumulators: nthreads x M x D fp32 (16 MiB at 2N = 16384, D = 128, 2 threads).
  at::Tensor acc = at::zeros({nthreads, m, d}, zhat.options());
  float* ap = acc.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t p0, int64_t p1) {
    float* dz = ap + static_cast<int64_t>(at::get_thread_num()) * m * d;
    std::vector<float> tile(kTile * kTile);
    for (int64_t p = p0; p < p1; ++p) {
      const TilePair& tp = pairs[p];
      // 1. Recompute S_IJ (0.5 eq over the triangle).
      gemm_rm(false, true, tp.bi, tp.bj, d, alpha, z + tp.i0 * d, d, z + tp.j0 * d, d, 0.0f,
              tile.data(), tp.bj);
      mask_tile(tile.data(), tp, n, decoupled);
      // 2. S -> K = (G + G^T)_IJ in place.
      ntxent_bwd_tile(tile.data(), tp.bi, tp.bj, lp + tp.i0, gp + tp.i0, lp + tp.j0, gp + tp.j0);
      // 3. dZ_I += K Z_J ; dZ_J += K^T Z_I (the diagonal tile's K is already symmetric and
      //    holds both directions, so it feeds dZ_I once).
      gemm_rm(false, false, tp.bi, d, tp.bj, 1.0f, tile.data(), tp.bj, z + tp.j0 * d, d, 1.0f,
              dz + tp.i0 * d, d);
      if (tp.i0 != tp.j0)
        gemm_rm(true, false, tp.bj, d, tp.bi, 1.0f, tile.data(), tp.bj, z + tp.i0 * d, d, 1.0f,
                dz + tp.j0 * d, d);
    }
  });

  // Epilogue per row a (O(M D)): sum the thread partials, scale by 1/tau, subtract the
  // target term (g_a + g_t(a)) z_t(a) / tau, then the temperature and normalisation gradients.
  at::Tensor dzf = at::empty({m, d}, zhat.options());
  float* out = dzf.data_ptr<float>();
  std::vector<double> dot_partial(m);
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(d);
    for (int64_t a = r0; a < r1; ++a) {
      const int64_t t = (a + n) % m;
      const float gt = gp[a] + gp[t];
      const float* zt = z + t * d;
      for (int64_t k = 0; k < d; ++k) row[k] = 0.0f;
      for (int th = 0; th < nthreads; ++th) {
        const float* src = ap + (int64_t)th * m * d + a * d;
        for (int64_t k = 0; k < d; ++k) row[k] += src[k];
      }
      const float* za = z + a * d;
      float dot = 0.0f;
      for (int64_t k = 0; k < d; ++k) {
        row[k] = alpha * (row[k] - gt * zt[k]);
        dot += za[k] * row[k];
      }
      dot_partial[a] = dot;
      float* o = out + a * d;
      if (normalize) {
        const bool clamped = nrm[a] < kNormEps;
        const float inv = 1.0f / std::max(nrm[a], kNormEps);
        for (int64_t k = 0; k < d; ++k)
          o[k] = clamped ? row[k] * inv : (row[k] - za[k] * dot) * inv;
      } else {
        for (int64_t k = 0; k < d; ++k) o[k] = row[k];
      }
    }
  });
  // dL/dtau = -(1 / (2 tau)) sum_a z_a . dZ_a  (sum in a fixed order: deterministic).
  double total = 0.0;
  for (int64_t a = 0; a < m; ++a) total += dot_partial[a];
  at::Tensor dtemp = at::full_like(temperature, -total / (2.0 * tau));
  at::Tensor dz = dzf.to(dtype);
  return {dz.narrow(0, 0, n).clone(), dz.narrow(0, n, n).clone(), dtemp};
}

}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("ntxent_fwd", &fastssl::ntxent_fwd_cpu);
  m.impl("ntxent_bwd", &fastssl::ntxent_bwd_cpu);
}
