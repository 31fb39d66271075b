// MAE's pixel reconstruction loss (He et al. 2022, https://arxiv.org/abs/2111.06377), fused
// (fastssl/ops/masked_patch_loss.py has the formula and the saved-tensor contract):
//
//   t = (x - mean) / sqrt(var_unbiased + eps) per patch,  l_bl = mean_k (pred_k - t_k)^2,
//   loss = sum_bl w_bl l_bl / sum_bl w_bl   (0 when the weights sum to 0).
//
// Work unit: one patch (b, l). Its n = p*p*C image values are gathered into a thread-local
// L1 buffer in pred's order ((u*p + v)*C + c: MAE's patchify), so the patchified target never
// exists in memory; pred's patch is contiguous. Patches of weight 0 are skipped (never read).
// Per-patch sums use 16 fixed float lanes added in a fixed order, and the per-patch results
// are combined serially in double, so every result is independent of the thread count.
#include <torch/library.h>

#include "common.h"

namespace fastssl {
namespace {

constexpr int64_t kLanes = 16;
// Patches per parallel_for grain: ~60 KB of fp32 image + pred per grain at p = 16, C = 3.
constexpr int64_t kGrain = 8;

struct Geometry {
  int64_t B, C, H, W, p, wp, L, n;
};

Geometry geometry(const at::Tensor& pred, const at::Tensor& images, int64_t p) {
  TORCH_CHECK(images.dim() == 4, "fastssl::masked_patch_loss: images must be (B, C, H, W)");
  TORCH_CHECK(p >= 1, "fastssl::masked_patch_loss: patch_size must be >= 1");
  Geometry g{images.size(0), images.size(1), images.size(2), images.size(3), p, 0, 0, 0};
  TORCH_CHECK(g.H % p == 0 && g.W % p == 0,
              "fastssl::masked_patch_loss: H and W must be multiples of patch_size");
  g.wp = g.W / p;
  g.L = (g.H / p) * g.wp;
  g.n = p * p * g.C;
  TORCH_CHECK(pred.dim() == 3 && pred.size(0) == g.B && pred.size(1) == g.L &&
                  pred.size(2) == g.n,
              "fastssl::masked_patch_loss: pred must be (B, L, p*p*C) for these images");
  return g;
}

template <typename T>
inline float as_float(T v) {
  return static_cast<float>(v);
}

// Patch l of image `img` (C x H x W) into t[0, n), in pred's order. The C = 1 and C = 3
// instantiations let the compiler see the interleave stride.
template <typename TI, int64_t kC>
inline void gather_patch_c(const TI* __restrict img, const Geometry& g, int64_t l,
                           float* __restrict t) {
  const int64_t plane = g.H * g.W, p = g.p;
  const TI* corner = img + (l / g.wp) * p * g.W + (l % g.wp) * p;
  for (int64_t c = 0; c < kC; ++c)
    for (int64_t u = 0; u < p; ++u) {
      const TI* src = corner + c * plane + u * g.W;
      float* dst = t + u * p * kC + c;
      for (int64_t v = 0; v < p; ++v) dst[v * kC] = as_float(src[v]);
    }
}

template <typename TI>
inline void gather_patch(const TI* img, const Geometry& g, int64_t l, float* t) {
  if (g.C == 3) return gather_patch_c<TI, 3>(img, g, l, t);
  if (g.C == 1) return gather_patch_c<TI, 1>(img, g, l, t);
  const int64_t plane = g.H * g.W, p = g.p, C = g.C;
  const TI* corner = img + (l / g.wp) * p * g.W + (l % g.wp) * p;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t u = 0; u < p; ++u) {
      const TI* src = corner + c * plane + u * g.W;
      float* dst = t + u * p * C + c;
      for (int64_t v = 0; v < p; ++v) dst[v * C] = as_float(src[v]);
    }
}

// Sum of x[0, n) over 16 fixed lanes (element k in lane k % 16), lanes added in order.
FASTSSL_SIMD_CLONES
double lane_sum(const float* __restrict x, int64_t n) {
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += x[k + j];
  for (int64_t j = 0; k + j < n; ++j) acc[j] += x[k + j];
  double s = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// sum_k (x_k - m)^2, lanes as lane_sum.
FASTSSL_SIMD_CLONES
double lane_sq_dev(const float* __restrict x, float m, int64_t n) {
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const float d = x[k + j] - m;
      acc[j] += d * d;
    }
  for (int64_t j = 0; k + j < n; ++j) {
    const float d = x[k + j] - m;
    acc[j] += d * d;
  }
  double s = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// sum_k (y_k - (t_k - m) r)^2, lanes as lane_sum.
FASTSSL_SIMD_CLONES
double lane_sq_err(const float* __restrict y, const float* __restrict t, float m, float r,
                   int64_t n) {
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const float d = y[k + j] - (t[k + j] - m) * r;
      acc[j] += d * d;
    }
  for (int64_t j = 0; k + j < n; ++j) {
    const float d = y[k + j] - (t[k + j] - m) * r;
    acc[j] += d * d;
  }
  double s = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// dst_k = coef (y_k - (t_k - m) r), the same expression as lane_sq_err's d.
FASTSSL_SIMD_CLONES
void scaled_err(const float* __restrict y, const float* __restrict t, float m, float r,
                float coef, float* __restrict dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = coef * (y[k] - (t[k] - m) * r);
}

template <typename T>
inline const float* pred_as_float(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<float>(src[k]);
    return buf;
  }
}

template <typename TP, typename TI>
void forward_impl(const at::Tensor& pred, const at::Tensor& images, const float* w,
                  const Geometry& g, bool norm_pix, double eps, float* patch_loss,
                  float* stats) {
  const TP* P = pred.data_ptr<TP>();
  const TI* I = images.data_ptr<TI>();
  const int64_t n = g.n;
  at::parallel_for(0, g.B * g.L, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> tbuf(n), ybuf(n);
    for (int64_t i = begin; i < end; ++i) {
      if (w[i] == 0.0f) {
        patch_loss[i] = 0.0f;
        stats[2 * i] = 0.0f;
        stats[2 * i + 1] = 0.0f;
        continue;
      }
      const int64_t b = i / g.L, l = i % g.L;
      gather_patch<TI>(I + b * g.C * g.H * g.W, g, l, tbuf.data());
      float mean = 0.0f, rstd = 1.0f;
      if (norm_pix) {
        mean = static_cast<float>(lane_sum(tbuf.data(), n) / static_cast<double>(n));
        const double var = lane_sq_dev(tbuf.data(), mean, n) / static_cast<double>(n - 1);
        rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
      }
      const float* y = pred_as_float<TP>(P + i * n, ybuf.data(), n);
      patch_loss[i] =
          static_cast<float>(lane_sq_err(y, tbuf.data(), mean, rstd, n) / static_cast<double>(n));
      stats[2 * i] = mean;
      stats[2 * i + 1] = rstd;
    }
  });
}

template <typename TP, typename TI>
void backward_impl(const at::Tensor& pred, const at::Tensor& images, const float* w,
                   const float* stats, const Geometry& g, double grad_scale, at::Tensor& dpred) {
  const TP* P = pred.data_ptr<TP>();
  const TI* I = images.data_ptr<TI>();
  TP* D = dpred.data_ptr<TP>();
  const int64_t n = g.n;
  at::parallel_for(0, g.B * g.L, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> tbuf(n), ybuf(n), dbuf(n);
    for (int64_t i = begin; i < end; ++i) {
      TP* dst = D + i * n;
      if (w[i] == 0.0f) {
        std::fill(dst, dst + n, TP(0));
        continue;
      }
      const int64_t b = i / g.L, l = i % g.L;
      gather_patch<TI>(I + b * g.C * g.H * g.W, g, l, tbuf.data());
      const float* y = pred_as_float<TP>(P + i * n, ybuf.data(), n);
      const float coef = static_cast<float>(grad_scale * w[i]);
      if constexpr (std::is_same_v<TP, float>) {
        scaled_err(y, tbuf.data(), stats[2 * i], stats[2 * i + 1], coef, dst, n);
      } else {
        scaled_err(y, tbuf.data(), stats[2 * i], stats[2 * i + 1], coef, dbuf.data(), n);
        for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<TP>(dbuf[k]);
      }
    }
  });
}

// Calls fn.template operator()<TP, TI>() for the (pred, images) dtype pair.
template <typename Fn>
void dispatch_pair(at::ScalarType tp, at::ScalarType ti, Fn&& fn) {
  auto with_ti = [&](auto tp_tag) {
    using TP = decltype(tp_tag);
    switch (ti) {
      case at::kFloat: return fn.template operator()<TP, float>();
      case at::kBFloat16: return fn.template operator()<TP, c10::BFloat16>();
      case at::kHalf: return fn.template operator()<TP, c10::Half>();
      default: TORCH_CHECK(false, "fastssl::masked_patch_loss: images must be fp32/bf16/fp16");
    }
  };
  switch (tp) {
    case at::kFloat: return with_ti(float{});
    case at::kBFloat16: return with_ti(c10::BFloat16{});
    case at::kHalf: return with_ti(c10::Half{});
    default: TORCH_CHECK(false, "fastssl::masked_patch_loss: pred must be fp32/bf16/fp16");
  }
}

at::Tensor weights_f32(const at::Tensor& mask, const Geometry& g) {
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == g.B && mask.size(1) == g.L,
              "fastssl::masked_patch_loss: mask must be (B, L)");
  return mask.to(at::kFloat).contiguous();
}

}  // namespace

// Returns (loss 0-dim fp32, stats (B, L, 2) fp32, inv_weight 0-dim fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_patch_loss_fwd_cpu(
    const at::Tensor& pred_in, const at::Tensor& images_in, const at::Tensor& mask,
    int64_t patch_size, bool norm_pix, double eps) {
  const Geometry g = geometry(pred_in, images_in, patch_size);
  TORCH_CHECK(!norm_pix || g.n >= 2,
              "fastssl::masked_patch_loss: norm_pix needs p*p*C >= 2 (unbiased variance)");
  const at::Tensor pred = pred_in.contiguous(), images = images_in.contiguous();
  const at::Tensor wt = weights_f32(mask, g);
  const float* w = wt.data_ptr<float>();
  auto f32 = pred.options().dtype(at::kFloat);
  at::Tensor stats = at::empty({g.B, g.L, 2}, f32);
  std::vector<float> patch_loss(g.B * g.L);
  dispatch_pair(pred.scalar_type(), images.scalar_type(), [&]<typename TP, typename TI>() {
    forward_impl<TP, TI>(pred, images, w, g, norm_pix, eps, patch_loss.data(),
                         stats.data_ptr<float>());
  });
  double num = 0.0, den = 0.0;
  for (int64_t i = 0; i < g.B * g.L; ++i) {
    den += w[i];
    if (w[i] != 0.0f) num += static_cast<double>(w[i]) * patch_loss[i];
  }
  const double inv = den != 0.0 ? 1.0 / den : 0.0;
  return {at::full({}, num * inv, f32), stats, at::full({}, inv, f32)};
}

// Returns dpred (pred's shape and dtype, contiguous).
at::Tensor masked_patch_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& pred_in,
                                     const at::Tensor& images_in, const at::Tensor& mask,
                                     const at::Tensor& stats_in, const at::Tensor& inv_weight,
                                     int64_t patch_size, bool norm_pix) {
  (void)norm_pix;  // the saved stats already hold (0, 1) without norm_pix
  const Geometry g = geometry(pred_in, images_in, patch_size);
  const at::Tensor pred = pred_in.contiguous(), images = images_in.contiguous();
  const at::Tensor wt = weights_f32(mask, g);
  const at::Tensor stats = stats_in.to(at::kFloat).contiguous();
  TORCH_CHECK(stats.numel() == 2 * g.B * g.L, "fastssl::masked_patch_loss: stats must be (B, L, 2)");
  // grad * (1 / sum w) * (2 / n): the per-patch factor before w_bl.
  const double grad_scale = grad.item<double>() * inv_weight.item<double>() * 2.0 /
                            static_cast<double>(g.n);
  at::Tensor dpred = at::empty(pred.sizes(), pred.options());
  dispatch_pair(pred.scalar_type(), images.scalar_type(), [&]<typename TP, typename TI>() {
    backward_impl<TP, TI>(pred, images, wt.data_ptr<float>(), stats.data_ptr<float>(), g,
                          grad_scale, dpred);
  });
  return dpred;
}

}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("masked_patch_loss_fwd", &fastssl::masked_patch_loss_fwd_cpu);
  m.impl("masked_patch_loss_bwd", &fastssl::masked_patch_loss_bwd_cpu);
}
