// The engine of the redundancy-reduction losses: see redundancy.h.
#include "redundancy.h"

namespace fastssl {
namespace redundancy {

at::Tensor as_f32(const at::Tensor& z) { return z.to(at::kFloat).contiguous(); }

void column_stats(const float* z, int64_t n, int64_t d, float* mean, float* var) {
  constexpr int64_t kCols = 64;
  const int64_t units = (d + kCols - 1) / kCols;
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t c0 = u * kCols, cw = std::min(kCols, d - c0);
      double sum[kCols] = {0}, sq[kCols] = {0};
      for (int64_t i = 0; i < n; ++i) {
        const float* row = z + i * d + c0;
        for (int64_t c = 0; c < cw; ++c) sum[c] += row[c];
      }
      double mu[kCols];
      for (int64_t c = 0; c < cw; ++c) mu[c] = sum[c] / static_cast<double>(n);
      for (int64_t i = 0; i < n; ++i) {
        const float* row = z + i * d + c0;
        for (int64_t c = 0; c < cw; ++c) {
          const double x = row[c] - mu[c];
          sq[c] += x * x;
        }
      }
      for (int64_t c = 0; c < cw; ++c) {
        mean[c0 + c] = static_cast<float>(mu[c]);
        var[c0 + c] = n > 1 ? static_cast<float>(sq[c] / static_cast<double>(n - 1))
                            : std::numeric_limits<float>::quiet_NaN();
      }
    }
  });
}

void load_block(const float* z, int64_t n, int64_t d, int64_t k0, int64_t kb,
                const float* shift, const float* scale, float* out) {
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float* src = z + i * d + k0;
      float* dst = out + i * kb;
      for (int64_t c = 0; c < kb; ++c) {
        const float m = shift != nullptr ? shift[k0 + c] : 0.0f;
        const float s = scale != nullptr ? scale[k0 + c] : 1.0f;
        dst[c] = (src[c] - m) * s;
      }
    }
  });
}

void packed_gram(const float* x, int64_t n, int64_t kb, bool accumulate, bool second,
                 float* packed, float* diag) {
  const int64_t strips = (n + kStrip - 1) / kStrip;
  TileBuffers buf(kStrip * kStrip);
  at::parallel_for(0, strips, 1, [&](int64_t s0, int64_t s1) {
    float* block = buf.get();
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t r0 = s * kStrip, rows = std::min(kStrip, n - r0), r1 = r0 + rows;
      const float beta = accumulate ? 1.0f : 0.0f;
      // Off the diagonal block: straight into this Gram's triangle.
      if (!second) {
        gemm_rm(false, true, rows, r0, kb, 1.0f, x + r0 * kb, kb, x, kb, beta, packed + r0 * n, n);
      } else {
        gemm_rm(false, true, rows, n - r1, kb, 1.0f, x + r0 * kb, kb, x + r1 * kb, kb, beta,
                packed + r0 * n + r1, n);
      }
      // The diagonal block shares its square with the other Gram: through scratch.
      gemm_rm(false, true, rows, rows, kb, 1.0f, x + r0 * kb, kb, x + r0 * kb, kb, 0.0f, block,
              kStrip);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < rows; ++j) {
          const float v = block[i * kStrip + j];
          float* dst = i == j ? diag + r0 + i
                       : ((i > j) != second) ? packed + (r0 + i) * n + r0 + j : nullptr;
          if (dst != nullptr) *dst = accumulate ? *dst + v : v;
          if (i == j) packed[(r0 + i) * n + r0 + i] = 0.0f;  // unused: defined, not garbage
        }
      }
    }
  });
}

namespace {

// sum over rows of f(i) in double, fixed 64-row chunks added in order.
template <typename F>
double row_sum(int64_t n, F f) {
  const int64_t chunks = (n + 63) / 64;
  std::vector<double> part(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double acc = 0.0;
      for (int64_t i = c * 64; i < std::min(n, (c + 1) * 64); ++i) acc += f(i);
      part[c] = acc;
    }
  });
  double total = 0.0;
  for (double p : part) total += p;
  return total;
}

}  // namespace

double packed_inner(const float* packed, const float* diag, int64_t n) {
  return row_sum(n, [&](int64_t i) {
    double acc = static_cast<double>(diag[i]) * diag[n + i];
    for (int64_t j = 0; j < i; ++j)
      acc += 2.0 * static_cast<double>(packed[i * n + j]) * packed[j * n + i];
    return acc;
  });
}

double packed_frob(const float* packed, const float* diag, int64_t n, bool second) {
  const float* dg = diag + (second ? n : 0);
  return row_sum(n, [&](int64_t i) {
    double acc = static_cast<double>(dg[i]) * dg[i];
    const int64_t j0 = second ? i + 1 : 0, j1 = second ? n : i;
    for (int64_t j = j0; j < j1; ++j) acc += 2.0 * static_cast<double>(packed[i * n + j]) * packed[i * n + j];
    return acc;
  });
}

void packed_gram_times(const float* packed, const float* diag, int64_t n, bool second,
                       const float* x, int64_t kb, float alpha, float* out) {
  // Row strip [r0, r1) of G x as three GEMMs straight from the packed triangles, no copy of
  // the Gram: left of the strip's diagonal block and right of it, one side is this Gram's own
  // triangle read row-wise, the other its mirror read as a transposed operand (lda = n);
  // only the rows x rows diagonal block, whose two triangles belong to the two Grams, goes
  // through scratch. (Expanding each strip to full rows before one GEMM, as this did before,
  // cost more than the GEMMs at N = 2048, D = 8192: 18% of the samples vs 33% in MKL.)
  const int64_t strips = (n + kStrip - 1) / kStrip;
  const float* dg = diag + (second ? n : 0);
  TileBuffers buf(kStrip * kStrip);
  at::parallel_for(0, strips, 1, [&](int64_t s0, int64_t s1) {
    float* blk = buf.get();
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t r0 = s * kStrip, rows = std::min(kStrip, n - r0), r1 = r0 + rows;
      float* o = out + r0 * kb;
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < rows; ++j) {
          blk[i * kStrip + j] = i == j ? dg[r0 + i]
                                : ((i > j) != second) ? packed[(r0 + i) * n + r0 + j]
                                                      : packed[(r0 + j) * n + r0 + i];
        }
      }
      gemm_rm(false, false, rows, kb, rows, alpha, blk, kStrip, x + r0 * kb, kb, 0.0f, o, kb);
      if (r0 > 0) {  // columns [0, r0): first Gram row-wise; second Gram's G[j][r] transposed
        if (!second)
          gemm_rm(false, false, rows, kb, r0, alpha, packed + r0 * n, n, x, kb, 1.0f, o, kb);
        else
          gemm_rm(true, false, rows, kb, r0, alpha, packed + r0, n, x, kb, 1.0f, o, kb);
      }
      if (r1 < n) {  // columns [r1, n): the mirror image of the above
        if (!second)
          gemm_rm(true, false, rows, kb, n - r1, alpha, packed + r1 * n + r0, n, x + r1 * kb,
                  kb, 1.0f, o, kb);
        else
          gemm_rm(false, false, rows, kb, n - r1, alpha, packed + r0 * n + r1, n, x + r1 * kb,
                  kb, 1.0f, o, kb);
      }
    }
  });
}

double tiled_cross_frob(const float* a, const float* b, int64_t n, int64_t d, bool symmetric) {
  const int64_t T = kTile, tiles = (d + T - 1) / T;
  std::vector<double> part(tiles, 0.0);
  TileBuffers buf(T * T);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    float* c = buf.get();
    for (int64_t i = t0; i < t1; ++i) {
      const int64_t i0 = i * T, ti = std::min(T, d - i0);
      double acc = 0.0;
      for (int64_t j = symmetric ? i : 0; j < tiles; ++j) {
        const int64_t j0 = j * T, tj = std::min(T, d - j0);
        gemm_rm(true, false, ti, tj, n, 1.0f, a + i0, d, b + j0, d, 0.0f, c, tj);
        if (symmetric) {
          double sq = 0.0;
          for (int64_t e = 0; e < ti * tj; ++e) sq += static_cast<double>(c[e]) * c[e];
          acc += (j == i ? 1.0 : 2.0) * sq;
        } else {
          for (int64_t e = 0; e < ti * tj; ++e) acc += static_cast<double>(c[e]) * c[e];
        }
      }
      part[i] = acc;
    }
  });
  double total = 0.0;
  for (double p : part) total += p;
  return total;
}

double dot(const float* a, const float* b, int64_t count) {
  constexpr int64_t kChunk = 1 << 14;
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  std::vector<double> part(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kChunk, i1 = std::min(count, i0 + kChunk);
      double acc = 0.0;
      for (int64_t j = i0; j < i1; ++j) acc += static_cast<double>(a[j]) * b[j];
      part[c] = acc;
    }
  });
  double total = 0.0;
  for (double p : part) total += p;
  return total;
}

void column_dots(const float* x, const float* y, int64_t n, int64_t kb, double* out) {
  constexpr int64_t kCols = 64;
  const int64_t units = (kb + kCols - 1) / kCols;
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t c0 = u * kCols, cw = std::min(kCols, kb - c0);
      double acc[kCols] = {0};
      for (int64_t i = 0; i < n; ++i) {
        const float* xr = x + i * kb + c0;
        const float* yr = y + i * kb + c0;
        for (int64_t c = 0; c < cw; ++c) acc[c] += static_cast<double>(xr[c]) * yr[c];
      }
      for (int64_t c = 0; c < cw; ++c) out[c0 + c] = acc[c];
    }
  });
}

}  // namespace redundancy
}  // namespace fastssl
