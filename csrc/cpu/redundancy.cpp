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

void gram_lower(const float* x, int64_t n, int64_t kb, bool accumulate, float* g) {
  const int64_t strips = (n + kStrip - 1) / kStrip;
  at::parallel_for(0, strips, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t r0 = s * kStrip, rows = std::min(kStrip, n - r0);
      const int64_t cols = r0 + rows;  // columns 0 .. end of the strip: lower triangle
      gemm_rm(false, true, rows, cols, kb, 1.0f, x + r0 * kb, kb, x, kb,
              accumulate ? 1.0f : 0.0f, g + r0 * n, n);
    }
  });
}

void mirror_lower(float* g, int64_t n) {
  // Row i holds columns [0, end of its strip); the rest is row j's entry i for j beyond it.
  at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t end = std::min(n, (i / kStrip + 1) * kStrip);
      for (int64_t j = end; j < n; ++j) g[i * n + j] = g[j * n + i];
    }
  });
}

void gram_times(const float* g, const float* x, int64_t n, int64_t kb, float alpha, float* out) {
  const int64_t strips = (n + kStrip - 1) / kStrip;
  at::parallel_for(0, strips, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t r0 = s * kStrip, rows = std::min(kStrip, n - r0);
      gemm_rm(false, false, rows, kb, n, alpha, g + r0 * n, n, x, kb, 0.0f, out + r0 * kb, kb);
    }
  });
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
