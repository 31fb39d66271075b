// Implementation of contrastive_core.h: staging, the tiled online-LSE forward and the
// one-recompute softmax backward shared by xent / info_nce / clip / supcon.
#include "contrastive_core.h"

#include <algorithm>

namespace fastssl::core {
namespace {

struct Tile {
  int64_t i0, bi, j0, bj;
};

Tile tile_at(int64_t I, int64_t J, int64_t m, int64_t nc) {
  const int64_t i0 = I * kTile, j0 = J * kTile;
  return {i0, std::min(kTile, m - i0), j0, std::min(kTile, nc - j0)};
}

// S_ij *= rinv_q[i] * rinv_c[j]: the raw-row GEMM becomes the cosine logits. Reads/writes bi*bj.
FASTSSL_SIMD_CLONES
void scale_tile(float* __restrict s, int64_t bi, int64_t bj, const float* __restrict rq,
                const float* __restrict rc) {
  for (int64_t i = 0; i < bi; ++i) {
    float* row = s + i * bj;
    const float ri = rq[i];
#pragma omp simd
    for (int64_t j = 0; j < bj; ++j) row[j] *= ri * rc[j];
  }
}

void mask_tile(float* s, const Tile& t, const Masks& masks) {
  for (const int64_t* mk : {masks.a, masks.b}) {
    if (mk == nullptr) continue;
    for (int64_t r = 0; r < t.bi; ++r) {
      const int64_t col = mk[t.i0 + r];
      if (col >= t.j0 && col < t.j0 + t.bj) s[r * t.bj + (col - t.j0)] = kNegInf;
    }
  }
}

// In place: S -> P'_ij = rq_i rc_j (g_i exp(S_ij - lse_i) + h_j exp(S_ij - clse_j)).
// The rq_i rc_j factor lets both tile GEMMs read the raw rows; the owner divides it back out
// (times alpha) once per row at the end. Masked entries (-inf) give ~0 (exp_f32's clamp).
FASTSSL_SIMD_CLONES
void bwd_tile(float* __restrict s, int64_t bi, int64_t bj, const float* __restrict rq,
              const float* __restrict rc, const float* __restrict g, const float* __restrict lse,
              const float* __restrict h, const float* __restrict clse) {
  for (int64_t i = 0; i < bi; ++i) {
    float* row = s + i * bj;
    const float gi = g[i] * rq[i], li = lse[i], ri = rq[i];
    if (h != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < bj; ++j)
        row[j] = rc[j] * (gi * exp_f32(row[j] - li) + ri * h[j] * exp_f32(row[j] - clse[j]));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < bj; ++j) row[j] = rc[j] * gi * exp_f32(row[j] - li);
    }
  }
}

// Online softmax with value accumulation, one tile: per row, the new max, the rescale of the
// running sum and of the running output row o (d floats), and the tile turned in place into
// E_ij = exp(S_ij - max_i) * rc_j, ready for o_I += E C_J (raw rows).
FASTSSL_SIMD_CLONES
void pv_tile(float* __restrict s, int64_t bi, int64_t bj, const float* __restrict rc,
             float* __restrict rmax, float* __restrict rsum, float* __restrict o, int64_t d) {
  for (int64_t i = 0; i < bi; ++i) {
    float* row = s + i * bj;
    float rm = kNegInf;
#pragma omp simd reduction(max : rm)
    for (int64_t j = 0; j < bj; ++j) rm = row[j] > rm ? row[j] : rm;
    const float nm = rmax[i] > rm ? rmax[i] : rm;
    const float sh = finite_or_zero(nm);
    const float corr = exp_f32(rmax[i] - sh);
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < bj; ++j) {
      const float e = exp_f32(row[j] - sh);
      acc += e;
      row[j] = e * rc[j];
    }
    rsum[i] = rsum[i] * corr + acc;
    rmax[i] = nm;
    float* oi = o + i * d;
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) oi[k] *= corr;
  }
}

FASTSSL_SIMD_CLONES
float sum_squares(const float* __restrict x, int64_t d) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t k = 0; k < d; ++k) ss += x[k] * x[k];
  return ss;
}

// Merges the per-thread (max, sum) of `n` entries at `off` inside each thread's block.
void merge_stats(const std::vector<float>& st, int nthreads, int64_t per, int64_t off, int64_t n,
                 float* out) {
  at::parallel_for(0, n, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float mx = kNegInf;
      for (int t = 0; t < nthreads; ++t) mx = std::max(mx, st[t * per + off + r]);
      double sum = 0.0;
      for (int t = 0; t < nthreads; ++t) {
        const float tm = st[t * per + off + r];
        if (tm != kNegInf) sum += st[t * per + off + n + r] * std::exp((double)(tm - mx));
      }
      out[r] = mx + static_cast<float>(std::log(sum));
    }
  });
}

}  // namespace

Operand stage(const at::Tensor& t, bool normalize) {
  Operand o;
  o.n = t.size(0);
  o.d = t.size(1);
  o.normalize = normalize;
  o.storage = (t.scalar_type() == at::kFloat && t.is_contiguous())
                  ? t
                  : t.to(at::kFloat, /*non_blocking=*/false, /*copy=*/false,
                         at::MemoryFormat::Contiguous).contiguous();
  auto f32 = t.options().dtype(at::kFloat);
  o.rinv_t = at::empty({o.n}, f32);
  o.nrm_t = at::empty({o.n}, f32);
  o.x = o.storage.data_ptr<float>();
  float* rinv = o.rinv_t.data_ptr<float>();
  float* nrm = o.nrm_t.data_ptr<float>();
  const int64_t d = o.d;
  std::vector<char> bad(o.n, 0);
  at::parallel_for(0, o.n, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = o.x + r * d;
      // fp32 sum of squares (vectorised; MoCo stages a 65536 x 128 queue per call); if it
      // overflows, redo it in double so that only NaN/inf inputs count as non-finite.
      double ss = sum_squares(row, d);
      if (!std::isfinite(ss)) {
        ss = 0.0;
        for (int64_t k = 0; k < d; ++k) ss += (double)row[k] * row[k];
      }
      bad[r] = !std::isfinite(ss);
      const float n = static_cast<float>(std::sqrt(ss));
      const float nc = std::max(n, kNormEps);
      rinv[r] = normalize ? 1.0f / nc : 1.0f;
      nrm[r] = normalize ? nc : 1.0f;
    }
  });
  o.rinv = rinv;
  o.nrm = nrm;
  for (char b : bad) o.finite = o.finite && !b;
  return o;
}

void forward_lse(const Operand& q, const Operand& c, float alpha, Masks masks, float* row_lse,
                 float* col_lse) {
  const int64_t m = q.n, nc = c.n, d = q.d;
  const int64_t nti = (m + kTile - 1) / kTile, ntj = (nc + kTile - 1) / kTile;
  const int nthreads = at::get_num_threads();
  const bool cols = col_lse != nullptr;
  const int64_t per = 2 * m + (cols ? 2 * nc : 0);
  // Private running stats: [rmax (m), rsum (m), cmax (nc), csum (nc)] per thread.
  std::vector<float> st(nthreads * per, 0.0f);
  for (int t = 0; t < nthreads; ++t) {
    std::fill_n(st.begin() + t * per, m, kNegInf);
    if (cols) std::fill_n(st.begin() + t * per + 2 * m, nc, kNegInf);
  }
  const bool scaled = q.normalize || c.normalize;
  // Row-major pair order: a thread streams column panels against one row panel; with one row
  // tile (MoCo: 256 queries vs 65536 queue entries) the threads split the columns.
  at::parallel_for(0, nti * ntj, 1, [&](int64_t p0, int64_t p1) {
    float* rmax = st.data() + at::get_thread_num() * per;
    float* rsum = rmax + m;
    float* cmax = cols ? rsum + m : nullptr;
    float* csum = cols ? cmax + nc : nullptr;
    std::vector<float> tile(kTile * kTile), tmp(kTile);
    for (int64_t p = p0; p < p1; ++p) {
      const Tile t = tile_at(p / ntj, p % ntj, m, nc);
      // S_IJ = alpha Q_I C_J^T: reads (bi + bj) d floats, 2 bi bj d flops; S never leaves L2.
      gemm_rm(false, true, t.bi, t.bj, d, alpha, q.x + t.i0 * d, d, c.x + t.j0 * d, d, 0.0f,
              tile.data(), t.bj);
      if (scaled) scale_tile(tile.data(), t.bi, t.bj, q.rinv + t.i0, c.rinv + t.j0);
      mask_tile(tile.data(), t, masks);
      online_lse_tile(tile.data(), t.bi, t.bj, rmax + t.i0, rsum + t.i0, cols ? cmax + t.j0 : nullptr,
               cols ? csum + t.j0 : nullptr, tmp.data());
    }
  });
  merge_stats(st, nthreads, per, 0, m, row_lse);
  if (cols) merge_stats(st, nthreads, per, 2 * m, nc, col_lse);
}

void forward_lse_pv(const Operand& q, const Operand& c, float alpha, float* row_lse,
                    float* pv) {
  const int64_t m = q.n, nc = c.n, d = q.d;
  const int64_t nti = (m + kTile - 1) / kTile, ntj = (nc + kTile - 1) / kTile;
  const int nthreads = at::get_num_threads();
  // Per thread: [rmax (m), rsum (m)] and the running output o (m x d).
  const int64_t per = 2 * m;
  std::vector<float> st(nthreads * per, 0.0f);
  for (int t = 0; t < nthreads; ++t) std::fill_n(st.begin() + t * per, m, kNegInf);
  std::vector<float> out(static_cast<size_t>(nthreads) * m * d, 0.0f);
  const bool scaled = q.normalize || c.normalize;
  at::parallel_for(0, nti * ntj, 1, [&](int64_t p0, int64_t p1) {
    const int tid = at::get_thread_num();
    float* rmax = st.data() + tid * per;
    float* rsum = rmax + m;
    float* o = out.data() + static_cast<int64_t>(tid) * m * d;
    std::vector<float> tile(kTile * kTile);
    for (int64_t p = p0; p < p1; ++p) {
      const Tile t = tile_at(p / ntj, p % ntj, m, nc);
      gemm_rm(false, true, t.bi, t.bj, d, alpha, q.x + t.i0 * d, d, c.x + t.j0 * d, d, 0.0f,
              tile.data(), t.bj);
      if (scaled) scale_tile(tile.data(), t.bi, t.bj, q.rinv + t.i0, c.rinv + t.j0);
      pv_tile(tile.data(), t.bi, t.bj, c.rinv + t.j0, rmax + t.i0, rsum + t.i0, o + t.i0 * d, d);
      // o_I += E C_J: the softmax-weighted columns, 2 bi bj d flops.
      gemm_rm(false, false, t.bi, d, t.bj, 1.0f, tile.data(), t.bj, c.x + t.j0 * d, d, 1.0f,
              o + t.i0 * d, d);
    }
  });
  merge_stats(st, nthreads, per, 0, m, row_lse);
  // pv_i = sum_t exp(max_t,i - lse_i) o_t,i (thread order: deterministic).
  at::parallel_for(0, m, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* dst = pv + r * d;
      for (int64_t k = 0; k < d; ++k) dst[k] = 0.0f;
      for (int t = 0; t < nthreads; ++t) {
        const float tm = st[t * per + r];
        if (tm == kNegInf) continue;
        const float w = std::exp(finite_or_zero(tm) - row_lse[r]);
        const float* src = out.data() + (static_cast<int64_t>(t) * m + r) * d;
        for (int64_t k = 0; k < d; ++k) dst[k] += w * src[k];
      }
    }
  });
}

void backward_softmax(const Operand& q, const Operand& c, float alpha, Masks masks,
                      const float* g, const float* lse, const float* h, const float* clse,
                      float* dq, float* dc) {
  const int64_t m = q.n, nc = c.n, d = q.d;
  const int64_t nti = (m + kTile - 1) / kTile, ntj = (nc + kTile - 1) / kTile;
  const int nthreads = at::get_num_threads();
  // Split the dimension with more tiles: its gradient is written by the thread that owns the
  // tile row (column); the other side ("shared") is accumulated in the output by thread 0 and
  // in one private buffer per extra thread, summed at the end.
  const bool split_rows = nti >= ntj;
  const int64_t outer = split_rows ? nti : ntj, inner = split_rows ? ntj : nti;
  float* shared = split_rows ? dc : dq;
  const int64_t shared_n = split_rows ? nc : m;
  std::memset(dq, 0, sizeof(float) * m * d);
  if (dc != nullptr) std::memset(dc, 0, sizeof(float) * nc * d);
  // Untouched private pages cost no memory: a buffer is zeroed by its thread on first use.
  std::vector<at::Tensor> priv(nthreads);
  std::vector<char> used(nthreads, 0);
  if (shared != nullptr)
    for (int t = 1; t < nthreads; ++t)
      priv[t] = at::empty({shared_n, d}, q.storage.options().dtype(at::kFloat));
  const bool scaled = q.normalize || c.normalize;
  at::parallel_for(0, outer, 1, [&](int64_t o0, int64_t o1) {
    const int tid = at::get_thread_num();
    float* mine = nullptr;
    if (shared != nullptr) {
      mine = tid == 0 ? shared : priv[tid].data_ptr<float>();
      if (tid != 0 && !used[tid]) std::memset(mine, 0, sizeof(float) * shared_n * d);
      used[tid] = 1;
    }
    float* dqp = split_rows ? dq : mine;
    float* dcp = split_rows ? mine : dc;
    std::vector<float> tile(kTile * kTile);
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t in = 0; in < inner; ++in) {
        const Tile t = split_rows ? tile_at(o, in, m, nc) : tile_at(in, o, m, nc);
        // 1. Recompute S_IJ (1 matmul-equivalent over the whole backward).
        gemm_rm(false, true, t.bi, t.bj, d, alpha, q.x + t.i0 * d, d, c.x + t.j0 * d, d, 0.0f,
                tile.data(), t.bj);
        if (scaled) scale_tile(tile.data(), t.bi, t.bj, q.rinv + t.i0, c.rinv + t.j0);
        mask_tile(tile.data(), t, masks);
        // 2. S -> P' in place (both softmax directions from the one recompute).
        bwd_tile(tile.data(), t.bi, t.bj, q.rinv + t.i0, c.rinv + t.j0, g + t.i0, lse + t.i0,
                 h != nullptr ? h + t.j0 : nullptr, clse != nullptr ? clse + t.j0 : nullptr);
        // 3. dQ_I += P' C_J ; dC_J += P'^T Q_I (raw rows; 2 bi bj d flops each).
        gemm_rm(false, false, t.bi, d, t.bj, 1.0f, tile.data(), t.bj, c.x + t.j0 * d, d, 1.0f,
                dqp + t.i0 * d, d);
        if (dcp != nullptr)
          gemm_rm(true, false, t.bj, d, t.bi, 1.0f, tile.data(), t.bj, q.x + t.i0 * d, d, 1.0f,
                  dcp + t.j0 * d, d);
      }
    }
  });
  // Sum the private buffers into the shared side (fixed thread order), then undo the
  // rq_i rc_j factor of P' and apply alpha: gradients w.r.t. the normalised rows.
  if (shared != nullptr) {
    at::parallel_for(0, shared_n, row_grain(d), [&](int64_t r0, int64_t r1) {
      for (int t = 1; t < nthreads; ++t) {
        if (!used[t]) continue;
        const float* src = priv[t].data_ptr<float>();
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t k = 0; k < d; ++k) shared[r * d + k] += src[r * d + k];
      }
    });
  }
  auto rescale = [&](float* out, const Operand& x) {
    at::parallel_for(0, x.n, row_grain(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float f = alpha * x.nrm[r];
        for (int64_t k = 0; k < d; ++k) out[r * d + k] *= f;
      }
    });
  };
  rescale(dq, q);
  if (dc != nullptr) rescale(dc, c);
}

void normalize_backward(const Operand& x, float* dxhat) {
  if (!x.normalize) return;
  const int64_t d = x.d;
  at::parallel_for(0, x.n, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = dxhat + r * d;
      const float ri = x.rinv[r];
      if (x.nrm[r] <= kNormEps) {  // clamped norm: x / eps is linear in x
        for (int64_t k = 0; k < d; ++k) row[k] *= ri;
        continue;
      }
      float dot = 0.0f;
      for (int64_t k = 0; k < d; ++k) dot += x.hat(r, k) * row[k];
      for (int64_t k = 0; k < d; ++k) row[k] = (row[k] - x.hat(r, k) * dot) * ri;
    }
  });
}

double rows_dot(const Operand& x, const float* v) {
  std::vector<double> part(x.n);
  const int64_t d = x.d;
  at::parallel_for(0, x.n, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double acc = 0.0;
      for (int64_t k = 0; k < d; ++k) acc += (double)x.hat(r, k) * v[r * d + k];
      part[r] = acc;
    }
  });
  double total = 0.0;
  for (double p : part) total += p;
  return total;
}

float logit(const Operand& x, int64_t i, const Operand& y, int64_t j, float alpha) {
  const float* a = x.x + i * x.d;
  const float* b = y.x + j * y.d;
  float dot = 0.0f;
  for (int64_t k = 0; k < x.d; ++k) dot += a[k] * b[k];
  return alpha * x.rinv[i] * y.rinv[j] * dot;
}

void axpy_hat(float* out, float s, const Operand& y, int64_t j) {
  const float f = s * y.rinv[j];
  const float* b = y.x + j * y.d;
  for (int64_t k = 0; k < y.d; ++k) out[k] += f * b[k];
}

at::Tensor to_dtype(const at::Tensor& f32, at::ScalarType dtype) {
  return f32.scalar_type() == dtype ? f32 : f32.to(dtype);
}

}  // namespace fastssl::core
