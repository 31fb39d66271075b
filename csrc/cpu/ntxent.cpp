// Fused NT-Xent (SimCLR) loss on the CPU, forward and backward, in O(N·D) memory.
//
// Notation (docs/DESIGN.md, section 4.2): Z = normalize([z1; z2]) is M x D with M = 2N, S = Z Z^T / tau,
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
//    named in docs/DESIGN.md (section 4.2). The "-1 at the target" of G is rank-one-per-row and is applied in
//    the O(M D) epilogue, exactly, in fp32.
//  * Tile GEMMs go to the BLAS that torch ships (single-threaded per tile inside
//    at::parallel_for); exp/max/sum run in FASTSSL_SIMD_CLONES loops (AVX-512 / AVX2).
//  * Threads: the upper tile pairs are ordered by the rounds of a round-robin tournament
//    (circle method) over the row blocks, after one round of diagonal tiles. Every block
//    receives its tiles in that order, so a tile updates the running (max, sum) and the dZ of
//    both its blocks in place (no private accumulators, no atomics) and the result is bitwise
//    the same at any thread count. No barrier between rounds: a thread claims any tile whose
//    two blocks have received all their earlier tiles (UnitSchedule, unit_schedule.h).
//  * The positive logit S_i,t(i) is read from the tile that feeds LSE_i (not recomputed as a
//    separate dot product), and loss_i = (max_i - S_i,t(i)) + log sum_i: never negative.
//  * Memory: Z in fp32 (M D), dZ (M D), the row statistics (M) and one B x B tile per thread.
//    Never M x M, nothing that grows with threads x M.
//  * Staging is overflow-safe: a row's squared norm is taken on the row scaled by a power of
//    two when its max-abs is outside [2^-24, 2^24] (row_norm), so |z| up to 1e30 normalises.
//  * Non-finite inputs: detected while staging Z; the loss rows (and gradients) are NaN.
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "unit_schedule.h"

namespace fastssl {
namespace {

// Tile edge. 256 x 256 fp32 = 256 KiB: the tile plus two 256 x D panels stay in L2 (1 MiB on
// Zen 4).
constexpr int64_t kTile = 256;
constexpr float kNormEps = 1e-12f;  // F.normalize's eps; the norm is computed in fp32

struct TilePair {
  int64_t i0, bi, j0, bj;
};

// The upper tile pairs (I <= J) of M rows in rounds: round 0 holds the diagonal tiles, each
// later round a perfect matching of the blocks (circle method: block nb - 1 of an even count
// stays, the others rotate; an odd count gets a dummy block). No block appears twice in a
// round. Depends on M alone.
std::vector<std::vector<TilePair>> tile_rounds(int64_t m) {
  const int64_t nb = (m + kTile - 1) / kTile;
  auto pair = [&](int64_t a, int64_t b) {
    const int64_t i = std::min(a, b), j = std::max(a, b);
    return TilePair{i * kTile, std::min(kTile, m - i * kTile), j * kTile,
                    std::min(kTile, m - j * kTile)};
  };
  std::vector<std::vector<TilePair>> rounds(1);
  for (int64_t b = 0; b < nb; ++b) rounds[0].push_back(pair(b, b));
  const int64_t players = nb + (nb % 2);  // with a dummy block nb when nb is odd
  for (int64_t r = 0; r + 1 < players; ++r) {
    std::vector<TilePair> round;
    auto add = [&](int64_t a, int64_t b) {
      if (a < nb && b < nb) round.push_back(pair(a, b));
    };
    add(players - 1, r);
    for (int64_t k = 1; k < players / 2; ++k)
      add((r + k) % (players - 1), (r - k + players - 1) % (players - 1));
    rounds.push_back(std::move(round));
  }
  return rounds;
}

// The tile pairs in round order, as units of a UnitSchedule whose lanes are the row blocks:
// each block receives its tiles in round order, on whichever thread, without a barrier
// between rounds.
struct TileSchedule {
  std::vector<TilePair> pairs;
  UnitSchedule schedule;

  explicit TileSchedule(int64_t m) : schedule((m + kTile - 1) / kTile) {
    for (auto& round : tile_rounds(m))
      for (const TilePair& p : round) {
        pairs.push_back(p);
        schedule.add(p.i0 / kTile, p.j0 / kTile);
      }
  }

  template <class Visit>
  void run(const Visit& visit) const {
    schedule.run([&](int64_t u) { visit(pairs[u]); });
  }
};

// S_i,t(i) of the rows (and, off the diagonal, of the columns) of a tile, before masking.
void pick_positives(const float* s, const TilePair& p, int64_t n, float* pos) {
  const int64_t m = 2 * n;
  for (int64_t r = 0; r < p.bi; ++r) {
    const int64_t t = (p.i0 + r + n) % m;
    if (t >= p.j0 && t < p.j0 + p.bj) pos[p.i0 + r] = s[r * p.bj + (t - p.j0)];
  }
  if (p.i0 == p.j0) return;
  for (int64_t c = 0; c < p.bj; ++c) {
    const int64_t t = (p.j0 + c + n) % m;
    if (t >= p.i0 && t < p.i0 + p.bi) pos[p.j0 + c] = s[(t - p.i0) * p.bj + c];
  }
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
      const RowNorm rn = row_norm(row, d);
      nrm[r] = static_cast<float>(rn.norm);
      if (normalize) {
        // x / max(||x||, eps) as (x 2^shift) * (2^-shift / max(||x||, eps)): both factors stay
        // normal floats for |x| up to fp32's max.
        const float f = std::ldexp(1.0f, rn.shift);
        const float inv = static_cast<float>(
            std::ldexp(1.0 / std::max(rn.norm, static_cast<double>(kNormEps)), -rn.shift));
        for (int64_t k = 0; k < d; ++k) row[k] = (row[k] * f) * inv;
      }
    }
  });
  at::Tensor lse = at::empty({m}, f32);
  if (!finite) {
    lse.fill_(std::numeric_limits<float>::quiet_NaN());
    return {lse.to(z1.scalar_type()), lse, zhat, norms};
  }

  // Running (max, sum) per row, updated in place by the round-robin schedule.
  const TileSchedule tiles_in_order(m);
  std::vector<float> rmax(m, kNegInf), rsum(m, 0.0f), pos(m, 0.0f);
  TileBuffers tiles(kTile * kTile + kTile);
  tiles_in_order.run([&](const TilePair& tp) {
    float* tile = tiles.get();
    // S_IJ = Z_I Z_J^T / tau: reads (bi + bj) D floats, 2 bi bj D flops.
    gemm_rm(false, true, tp.bi, tp.bj, d, alpha, z + tp.i0 * d, d, z + tp.j0 * d, d, 0.0f, tile,
            tp.bj);
    pick_positives(tile, tp, n, pos.data());
    mask_tile(tile, tp, n, decoupled);
    // A diagonal tile's columns are its own rows: update them once, as rows.
    const bool diagonal = tp.i0 == tp.j0;
    online_lse_tile(tile, tp.bi, tp.bj, rmax.data() + tp.i0, rsum.data() + tp.i0,
                    diagonal ? nullptr : rmax.data() + tp.j0, rsum.data() + tp.j0,
                    tile + kTile * kTile);
  });

  // loss = (max - S_i,t(i)) + log(sum): without `decoupled` both terms are >= 0 exactly (the
  // positive is one of the row's logits, and the sum holds exp_f32(0) = 1 exactly), so no row
  // loss is negative; and a small loss keeps its relative precision (log_softmax's form), where
  // lse - S_i,t(i) would lose everything below ulp(lse).
  at::Tensor loss = at::empty({m}, f32);
  float* l = lse.data_ptr<float>();
  float* out = loss.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r) {
    const float log_sum = static_cast<float>(std::log(static_cast<double>(rsum[r])));
    l[r] = rmax[r] + log_sum;
    out[r] = (rmax[r] - pos[r]) + log_sum;
  }
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

  // dZ (before the epilogue), written in place by the round-robin schedule.
  at::Tensor acc = at::zeros({m, d}, zhat.options());
  float* ap = acc.data_ptr<float>();
  const TileSchedule tiles_in_order(m);
  TileBuffers tiles(kTile * kTile);
  tiles_in_order.run([&](const TilePair& tp) {
    float* tile = tiles.get();
    // 1. Recompute S_IJ (0.5 eq over the triangle).
    gemm_rm(false, true, tp.bi, tp.bj, d, alpha, z + tp.i0 * d, d, z + tp.j0 * d, d, 0.0f, tile,
            tp.bj);
    mask_tile(tile, tp, n, decoupled);
    // 2. S -> K = (G + G^T)_IJ in place.
    ntxent_bwd_tile(tile, tp.bi, tp.bj, lp + tp.i0, gp + tp.i0, lp + tp.j0, gp + tp.j0);
    // 3. dZ_I += K Z_J ; dZ_J += K^T Z_I (the diagonal tile's K is already symmetric and
    //    holds both directions, so it feeds dZ_I once).
    gemm_rm(false, false, tp.bi, d, tp.bj, 1.0f, tile, tp.bj, z + tp.j0 * d, d, 1.0f,
            ap + tp.i0 * d, d);
    if (tp.i0 != tp.j0)
      gemm_rm(true, false, tp.bj, d, tp.bi, 1.0f, tile, tp.bj, z + tp.i0 * d, d, 1.0f,
              ap + tp.j0 * d, d);
  });

  // Epilogue per row a (O(M D)): scale by 1/tau, subtract the target term
  // (g_a + g_t(a)) z_t(a) / tau, then the temperature and normalisation gradients.
  at::Tensor dzf = at::empty({m, d}, zhat.options());
  float* out = dzf.data_ptr<float>();
  std::vector<double> dot_partial(m);
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(d);
    for (int64_t a = r0; a < r1; ++a) {
      const int64_t t = (a + n) % m;
      const float gt = gp[a] + gp[t];
      const float* zt = z + t * d;
      const float* src = ap + a * d;
      for (int64_t k = 0; k < d; ++k) row[k] = src[k];
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
