// Implementation of contrastive_core.h: staging, the tiled online-LSE forward and the
// one-recompute softmax backward shared by xent / info_nce / clip / supcon.
#include "contrastive_core.h"

#include <algorithm>

#include "unit_schedule.h"

namespace fastssl::core {
namespace {

struct Tile {
  int64_t i0, bi, j0, bj;
};

Tile tile_at(int64_t I, int64_t J, int64_t m, int64_t nc) {
  const int64_t i0 = I * kTile, j0 = J * kTile;
  return {i0, std::min(kTile, m - i0), j0, std::min(kTile, nc - j0)};
}

int64_t num_tiles(int64_t n) { return (n + kTile - 1) / kTile; }

// Column chunks of a rows-only pass: enough units (nti x chunks >= kMinUnits) to feed the
// threads when there are few row tiles (MoCo: 1 row tile x 256 queue tiles), a function of the
// shape alone so that the chunks, and the order their partials merge in, never depend on the
// thread count.
int64_t col_chunks(int64_t nti, int64_t ntj) {
  return std::clamp<int64_t>((kMinUnits + nti - 1) / nti, 1, ntj);
}

// The column tiles [J0, J1) of chunk c.
std::pair<int64_t, int64_t> chunk_range(int64_t c, int64_t chunks, int64_t ntj) {
  const int64_t per = (ntj + chunks - 1) / chunks;
  return {std::min(ntj, c * per), std::min(ntj, (c + 1) * per)};
}

// The tiles of the nti x ntj grid in wavefront order, as UnitSchedule units (module comment):
// step s holds the tiles (I, (I + s) mod L) (L = the larger tile count), so no two tiles of a
// step share a row or a column block, and each block receives its tiles in step order. Lanes:
// row block I, and column block J when `columns` (the tile also updates column statistics or
// gradients in place). Calls visit(tile).
template <class Visit>
void wavefront(int64_t m, int64_t nc, bool columns, const Visit& visit) {
  const int64_t nti = num_tiles(m), ntj = num_tiles(nc);
  const int64_t span = std::max(nti, ntj), width = std::min(nti, ntj);
  std::vector<Tile> order;
  UnitSchedule schedule(nti + (columns ? ntj : 0));
  for (int64_t s = 0; s < span; ++s)
    for (int64_t k = 0; k < width; ++k) {
      const int64_t I = nti <= ntj ? k : (k + s) % span;
      const int64_t J = nti <= ntj ? (k + s) % span : k;
      order.push_back(tile_at(I, J, m, nc));
      schedule.add(I, columns ? nti + J : -1);
    }
  schedule.run([&](int64_t u) { visit(order[u]); });
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

// Picks::target: the logit of each row's target, if this tile holds it (read before masking:
// the decoupled loss masks the target out of the LSE but still subtracts it).
void pick_targets(const float* s, const Tile& t, const Picks& picks) {
  if (picks.target == nullptr) return;
  for (int64_t r = 0; r < t.bi; ++r) {
    const int64_t col = picks.target[t.i0 + r];
    if (col >= t.j0 && col < t.j0 + t.bj) picks.target_logit[t.i0 + r] = s[r * t.bj + col - t.j0];
  }
}

// Picks::row_class: adds this tile's same-class unmasked logits to sums[row] (double; read after
// masking, so the self column is out).
void pick_class_sums(const float* s, const Tile& t, const Picks& picks, double* sums) {
  if (picks.row_class == nullptr) return;
  for (int64_t r = 0; r < t.bi; ++r) {
    const int64_t cls = picks.row_class[t.i0 + r];
    const float* row = s + r * t.bj;
    const int64_t* cc = picks.col_class + t.j0;
    double acc = 0.0;
    for (int64_t j = 0; j < t.bj; ++j)
      if (cc[j] == cls && row[j] != kNegInf) acc += row[j];
    sums[t.i0 + r] += acc;
  }
}

// In place: S -> P'_ij = rq_i rc_j (g_i exp(S_ij - lse_i) + h_j exp(S_ij - clse_j)
// - w_i [class_i == class_j, S_ij unmasked]).
// The rq_i rc_j factor lets both tile GEMMs read the raw rows; the owner divides it back out
// (times alpha) once per row at the end. Masked entries (-inf) give ~0 (exp_f32's clamp).
FASTSSL_SIMD_CLONES
void bwd_tile(float* __restrict s, int64_t bi, int64_t bj, const float* __restrict rq,
              const float* __restrict rc, const float* __restrict g, const float* __restrict lse,
              const float* __restrict h, const float* __restrict clse,
              const int64_t* __restrict row_class, const int64_t* __restrict col_class,
              const float* __restrict w) {
  for (int64_t i = 0; i < bi; ++i) {
    float* row = s + i * bj;
    const float gi = g[i] * rq[i], li = lse[i], ri = rq[i];
    if (h != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < bj; ++j)
        row[j] = rc[j] * (gi * exp_f32(row[j] - li) + ri * h[j] * exp_f32(row[j] - clse[j]));
    } else if (row_class != nullptr) {
      const int64_t ci = row_class[i];
      const float wi = w[i] * ri;
#pragma omp simd
      for (int64_t j = 0; j < bj; ++j) {
        const float pos = (col_class[j] == ci && row[j] != kNegInf) ? wi : 0.0f;
        row[j] = rc[j] * (gi * exp_f32(row[j] - li) - pos);
      }
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

// lse = max + log(sum) from running statistics. Every row sum holds exp_f32(max - max) = 1
// exactly, so sum >= 1 and log(sum) >= 0: a loss (max - S_i,t) + log_sum with S_i,t read from
// the tiles (Picks) is a sum of two non-negative fp32 numbers, never negative.
// Writes lse[r] and, when asked for, its parts (max, log_sum).
void finish_lse(int64_t r, float mx, double sum, float* lse, float* max_out, float* log_sum) {
  const float ls = static_cast<float>(std::log(sum));
  lse[r] = mx + ls;
  if (max_out != nullptr) max_out[r] = mx;
  if (log_sum != nullptr) log_sum[r] = ls;
}

// Merges `chunks` partial (max, sum) blocks (each: [max (n), sum (n)], `stride` floats apart)
// in chunk order.
void merge_stats(const float* part, int64_t chunks, int64_t stride, int64_t n, float* out,
                 float* max_out = nullptr, float* log_sum = nullptr) {
  at::parallel_for(0, n, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float mx = kNegInf;
      for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, part[c * stride + r]);
      double sum = 0.0;
      for (int64_t c = 0; c < chunks; ++c) {
        const float tm = part[c * stride + r];
        if (tm != kNegInf) sum += part[c * stride + n + r] * std::exp((double)(tm - mx));
      }
      finish_lse(r, mx, sum, out, max_out, log_sum);
    }
  });
}

// Rows-only tile units: for unit u = (row tile I, column chunk c), visit(u, I, c, tile) for
// each tile of the chunk, in column order.
// Each unit writes only its own partial: no lanes, claimed by whichever thread is free.
template <class Visit>
void row_units(int64_t m, int64_t nc, int64_t chunks, const Visit& visit) {
  const int64_t nti = num_tiles(m), ntj = num_tiles(nc);
  UnitSchedule schedule(0);
  for (int64_t u = 0; u < nti * chunks; ++u) schedule.add(-1);
  schedule.run([&](int64_t u) {
    const int64_t I = u / chunks, c = u % chunks;
    const auto [J0, J1] = chunk_range(c, chunks, ntj);
    for (int64_t J = J0; J < J1; ++J) visit(c, tile_at(I, J, m, nc));
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
  o.grad_rinv_t = at::empty({o.n}, f32);
  o.clamped.assign(o.n, 0);
  float* rinv = o.rinv_t.data_ptr<float>();
  float* nrm = o.nrm_t.data_ptr<float>();
  float* grinv = o.grad_rinv_t.data_ptr<float>();
  const int64_t d = o.d;
  std::vector<char> bad(o.n, 0);
  std::vector<int> shift(o.n, 0);
  const float* x = o.storage.data_ptr<float>();
  at::parallel_for(0, o.n, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const RowNorm rn = row_norm(x + r * d, d);
      bad[r] = !std::isfinite(rn.norm);
      // Without normalisation the rows are used as they are (no scaling: S itself may overflow,
      // as it does in the reference).
      shift[r] = normalize ? rn.shift : 0;
      const double nc = std::max(rn.norm, static_cast<double>(kNormEps));
      o.clamped[r] = rn.norm < kNormEps;
      // For the staged row ldexp(x, shift): its norm-with-eps is ldexp(nc, shift).
      rinv[r] = normalize ? static_cast<float>(std::ldexp(1.0 / nc, -shift[r])) : 1.0f;
      nrm[r] = normalize ? static_cast<float>(std::ldexp(nc, shift[r])) : 1.0f;
      grinv[r] = normalize ? static_cast<float>(1.0 / nc) : 1.0f;
    }
  });
  for (char b : bad) o.finite = o.finite && !b;
  if (o.finite && std::any_of(shift.begin(), shift.end(), [](int s) { return s != 0; })) {
    // Some rows would overflow (or underflow) fp32 products: stage them scaled by 2^shift, in a
    // private copy when the storage aliases the caller's tensor.
    if (o.storage.data_ptr() == t.data_ptr()) o.storage = o.storage.clone();
    float* xs = o.storage.data_ptr<float>();
    at::parallel_for(0, o.n, row_grain(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (shift[r] == 0) continue;
        const float f = std::ldexp(1.0f, shift[r]);
        for (int64_t k = 0; k < d; ++k) xs[r * d + k] *= f;
      }
    });
  }
  o.x = o.storage.data_ptr<float>();
  o.rinv = rinv;
  o.nrm = nrm;
  o.grad_rinv = grinv;
  return o;
}

void forward_lse(const Operand& q, const Operand& c, float alpha, Masks masks, float* row_lse,
                 float* col_lse, const Picks& picks) {
  const int64_t m = q.n, nc = c.n, d = q.d;
  const bool scaled = q.normalize || c.normalize;
  const bool cols = col_lse != nullptr;
  TORCH_CHECK(!cols || picks.row_class == nullptr,
              "fastssl: class sums are a rows-only forward feature");
  TileBuffers tiles(kTile * kTile + kTile);
  // S_IJ = alpha Q_I C_J^T: reads (bi + bj) d floats, 2 bi bj d flops; S never leaves L2.
  auto logits = [&](const Tile& t, float* s) {
    gemm_rm(false, true, t.bi, t.bj, d, alpha, q.x + t.i0 * d, d, c.x + t.j0 * d, d, 0.0f, s,
            t.bj);
    if (scaled) scale_tile(s, t.bi, t.bj, q.rinv + t.i0, c.rinv + t.j0);
    pick_targets(s, t, picks);
    mask_tile(s, t, masks);
  };
  if (cols) {
    // Wavefront: each tile updates its rows' and columns' running statistics in place.
    std::vector<float> rmax(m, kNegInf), rsum(m, 0.0f), cmax(nc, kNegInf), csum(nc, 0.0f);
    wavefront(m, nc, /*columns=*/true, [&](const Tile& t) {
      float* s = tiles.get();
      logits(t, s);
      online_lse_tile(s, t.bi, t.bj, rmax.data() + t.i0, rsum.data() + t.i0,
                      cmax.data() + t.j0, csum.data() + t.j0, s + kTile * kTile);
    });
    for (int64_t r = 0; r < m; ++r)
      finish_lse(r, rmax[r], rsum[r], row_lse, picks.row_max, picks.row_log_sum);
    for (int64_t r = 0; r < nc; ++r)
      finish_lse(r, cmax[r], csum[r], col_lse, picks.col_max, picks.col_log_sum);
    return;
  }
  const int64_t chunks = col_chunks(num_tiles(m), num_tiles(nc));
  // Per chunk: [rmax (m), rsum (m)], and the class sums (m doubles) when asked for.
  std::vector<float> part(chunks * 2 * m, 0.0f);
  for (int64_t ch = 0; ch < chunks; ++ch) std::fill_n(part.begin() + ch * 2 * m, m, kNegInf);
  const bool sums = picks.row_class != nullptr;
  std::vector<double> class_part(sums ? chunks * m : 0, 0.0);
  row_units(m, nc, chunks, [&](int64_t ch, const Tile& t) {
    float* s = tiles.get();
    logits(t, s);
    if (sums) pick_class_sums(s, t, picks, class_part.data() + ch * m);
    float* rmax = part.data() + ch * 2 * m;
    online_lse_tile(s, t.bi, t.bj, rmax + t.i0, rmax + m + t.i0, nullptr, nullptr, nullptr);
  });
  merge_stats(part.data(), chunks, 2 * m, m, row_lse, picks.row_max, picks.row_log_sum);
  if (sums)
    for (int64_t r = 0; r < m; ++r) {
      double acc = 0.0;
      for (int64_t ch = 0; ch < chunks; ++ch) acc += class_part[ch * m + r];
      picks.class_logit_sum[r] = acc;
    }
}

void forward_lse_pv(const Operand& q, const Operand& c, float alpha, float* row_lse,
                    float* pv) {
  const int64_t m = q.n, nc = c.n, d = q.d;
  const int64_t chunks = col_chunks(num_tiles(m), num_tiles(nc));
  // Per chunk: [rmax (m), rsum (m)] and the running output o (m x d).
  std::vector<float> part(chunks * 2 * m, 0.0f);
  for (int64_t ch = 0; ch < chunks; ++ch) std::fill_n(part.begin() + ch * 2 * m, m, kNegInf);
  at::Tensor out = at::zeros({chunks, m, d}, q.storage.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const bool scaled = q.normalize || c.normalize;
  TileBuffers tiles(kTile * kTile);
  row_units(m, nc, chunks, [&](int64_t ch, const Tile& t) {
    float* s = tiles.get();
    float* rmax = part.data() + ch * 2 * m;
    float* o = op + ch * m * d;
    gemm_rm(false, true, t.bi, t.bj, d, alpha, q.x + t.i0 * d, d, c.x + t.j0 * d, d, 0.0f, s,
            t.bj);
    if (scaled) scale_tile(s, t.bi, t.bj, q.rinv + t.i0, c.rinv + t.j0);
    pv_tile(s, t.bi, t.bj, c.rinv + t.j0, rmax + t.i0, rmax + m + t.i0, o + t.i0 * d, d);
    // o_I += E C_J: the softmax-weighted columns, 2 bi bj d flops.
    gemm_rm(false, false, t.bi, d, t.bj, 1.0f, s, t.bj, c.x + t.j0 * d, d, 1.0f, o + t.i0 * d,
            d);
  });
  merge_stats(part.data(), chunks, 2 * m, m, row_lse);
  // pv_i = sum_c exp(max_c,i - lse_i) o_c,i, in chunk order (split-K flash-decoding merge).
  at::parallel_for(0, m, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* dst = pv + r * d;
      for (int64_t k = 0; k < d; ++k) dst[k] = 0.0f;
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const float tm = part[ch * 2 * m + r];
        if (tm == kNegInf) continue;
        const float w = std::exp(finite_or_zero(tm) - row_lse[r]);
        const float* src = op + (ch * m + r) * d;
        for (int64_t k = 0; k < d; ++k) dst[k] += w * src[k];
      }
    }
  });
}

void backward_softmax(const Operand& q, const Operand& c, float alpha, Masks masks,
                      const float* g, const float* lse, const float* h, const float* clse,
                      float* dq, float* dc, const ClassTerm& cls) {
  const int64_t m = q.n, nc = c.n, d = q.d;
  std::memset(dq, 0, sizeof(float) * m * d);
  if (dc != nullptr) std::memset(dc, 0, sizeof(float) * nc * d);
  const bool scaled = q.normalize || c.normalize;
  TileBuffers tiles(kTile * kTile);
  // Wavefront: dQ_I and dC_J are written in place by the one tile of the step that touches
  // them, no per-thread accumulators (extra memory: one tile per thread).
  wavefront(m, nc, /*columns=*/dc != nullptr, [&](const Tile& t) {
    float* s = tiles.get();
    // 1. Recompute S_IJ (1 matmul-equivalent over the whole backward).
    gemm_rm(false, true, t.bi, t.bj, d, alpha, q.x + t.i0 * d, d, c.x + t.j0 * d, d, 0.0f, s,
            t.bj);
    if (scaled) scale_tile(s, t.bi, t.bj, q.rinv + t.i0, c.rinv + t.j0);
    mask_tile(s, t, masks);
    // 2. S -> P' in place (both softmax directions, and SupCon's positives, from one recompute).
    bwd_tile(s, t.bi, t.bj, q.rinv + t.i0, c.rinv + t.j0, g + t.i0, lse + t.i0,
             h != nullptr ? h + t.j0 : nullptr, clse != nullptr ? clse + t.j0 : nullptr,
             cls.row_class != nullptr ? cls.row_class + t.i0 : nullptr,
             cls.col_class != nullptr ? cls.col_class + t.j0 : nullptr,
             cls.w != nullptr ? cls.w + t.i0 : nullptr);
    // 3. dQ_I += P' C_J ; dC_J += P'^T Q_I (raw rows; 2 bi bj d flops each).
    gemm_rm(false, false, t.bi, d, t.bj, 1.0f, s, t.bj, c.x + t.j0 * d, d, 1.0f, dq + t.i0 * d,
            d);
    if (dc != nullptr)
      gemm_rm(true, false, t.bj, d, t.bi, 1.0f, s, t.bj, q.x + t.i0 * d, d, 1.0f,
              dc + t.j0 * d, d);
  });
  // Undo the rq_i rc_j factor of P' and apply alpha: gradients w.r.t. the normalised rows.
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
      const float ri = x.grad_rinv[r];
      if (x.clamped[r]) {  // clamped norm: x / eps is linear in x
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
