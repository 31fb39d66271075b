// BYOL / SimSiam negative cosine (fastssl/ops/negative_cosine.py has the op's contract):
//
//   loss_i = 2 - 2 (p_i . z_i) / (max(|p_i|, eps) max(|z_i|, eps)),   eps = 1e-12,
//   dp_i   = -2 g_i (z_i / (m_p m_z) - [|p_i| > eps] cos_i p_i / |p_i|^2),  no gradient to z.
//
// Memory-bound: one pass over the rows of p and z in the forward, two in the backward (the
// sums, then dp). The three row sums (p.z, |p|^2, |z|^2) are accumulated in double: the product
// of two fp32 values is exact in double and cannot overflow below fp32's max (the squared norm
// of a raw fp32 row overflows fp32 at |x| ~ 1.8e19), so no row scaling is needed; 2 - 2 cos is
// formed in double too, so a cos near 1 (late BYOL training) keeps its relative precision.
// Eight fixed accumulator lanes make the double sums vectorise without reassociation
// (-ffp-contract=off, no fast-math); each row is owned by one thread, so results are the same
// at any thread count.
#include <torch/library.h>

#include "common.h"

namespace fastssl {
namespace {

constexpr double kEps = 1e-12;  // F.normalize's
constexpr int kLanes = 8;
constexpr int64_t kRowGrain = 16;

struct RowSums {
  double pz, pp, zz;
};

FASTSSL_SIMD_CLONES
RowSums row_sums(const float* __restrict p, const float* __restrict z, int64_t d) {
  double pz[kLanes] = {}, pp[kLanes] = {}, zz[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double a = p[k + l], b = z[k + l];
      pz[l] += a * b;
      pp[l] += a * a;
      zz[l] += b * b;
    }
  }
  for (int l = 0; k < d; ++k, ++l) {
    const double a = p[k], b = z[k];
    pz[l] += a * b;
    pp[l] += a * a;
    zz[l] += b * b;
  }
  RowSums s{0.0, 0.0, 0.0};
  for (int l = 0; l < kLanes; ++l) {
    s.pz += pz[l];
    s.pp += pp[l];
    s.zz += zz[l];
  }
  return s;
}

FASTSSL_SIMD_CLONES
void axpby_row(const float* __restrict p, const float* __restrict z, int64_t d, double cp,
               double cz, float* __restrict out) {
  for (int64_t k = 0; k < d; ++k) out[k] = static_cast<float>(cz * z[k] + cp * p[k]);
}

struct Cosine {
  double cos, norm_p, m_p, m_z;
};

inline Cosine cosine(const RowSums& s) {
  const double np = std::sqrt(s.pp), nz = std::sqrt(s.zz);
  const double mp = np > kEps ? np : kEps, mz = nz > kEps ? nz : kEps;
  // NaN or inf anywhere in the row: NaN sums (inf - inf, inf / inf), hence a NaN loss.
  return {s.pz / (mp * mz), np, mp, mz};
}

// Rows [r0, r1) of x as fp32 pointers: the tensor's own memory for fp32, else converted into
// `buf` (rows x d).
template <typename T>
const float* rows_f32(const at::Tensor& x, int64_t r0, int64_t r1, std::vector<float>& buf) {
  const int64_t d = x.size(1);
  const T* src = x.data_ptr<T>() + r0 * d;
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    buf.resize(static_cast<size_t>((r1 - r0) * d));
    for (int64_t k = 0; k < (r1 - r0) * d; ++k) buf[k] = static_cast<float>(src[k]);
    return buf.data();
  }
}

void check_inputs(const at::Tensor& p, const at::Tensor& z) {
  TORCH_CHECK(p.dim() == 2 && p.size(0) >= 1 && p.size(1) >= 1,
              "fastssl::negative_cosine: p must be (N, D) with N, D >= 1");
  TORCH_CHECK(z.sizes() == p.sizes(), "fastssl::negative_cosine: p and z must have the same "
              "shape");
  TORCH_CHECK(z.scalar_type() == p.scalar_type(),
              "fastssl::negative_cosine: p and z must have the same dtype");
  TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kHalf ||
                  p.scalar_type() == at::kBFloat16,
              "fastssl::negative_cosine: the kernel takes float32, float16 or bfloat16 "
              "(fastssl.negative_cosine runs float64 on the reference)");
}

}  // namespace

at::Tensor negative_cosine_fwd_cpu(const at::Tensor& p_in, const at::Tensor& z_in) {
  check_inputs(p_in, z_in);
  const at::Tensor p = p_in.contiguous(), z = z_in.contiguous();
  const int64_t n = p.size(0), d = p.size(1);
  at::Tensor loss = at::empty({n}, p.options().dtype(at::kFloat));
  float* out = loss.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "negcos_fwd", [&] {
    at::parallel_for(0, n, kRowGrain, [&](int64_t r0, int64_t r1) {
      std::vector<float> pbuf, zbuf;
      for (int64_t i0 = r0; i0 < r1; i0 += kRowGrain) {
        const int64_t i1 = std::min(r1, i0 + kRowGrain);
        const float* pr = rows_f32<scalar_t>(p, i0, i1, pbuf);
        const float* zr = rows_f32<scalar_t>(z, i0, i1, zbuf);
        for (int64_t i = i0; i < i1; ++i) {
          const Cosine c = cosine(row_sums(pr + (i - i0) * d, zr + (i - i0) * d, d));
          out[i] = static_cast<float>(2.0 - 2.0 * c.cos);
        }
      }
    });
  });
  return loss;
}

at::Tensor negative_cosine_bwd_cpu(const at::Tensor& grad, const at::Tensor& p_in,
                                   const at::Tensor& z_in) {
  check_inputs(p_in, z_in);
  TORCH_CHECK(grad.numel() == p_in.size(0), "fastssl::negative_cosine: grad must be (N,)");
  const at::Tensor p = p_in.contiguous(), z = z_in.contiguous();
  const at::Tensor g = grad.to(at::kFloat).contiguous();
  const int64_t n = p.size(0), d = p.size(1);
  at::Tensor dp = at::empty({n, d}, p.options().dtype(at::kFloat));
  const float* gp = g.data_ptr<float>();
  float* dpp = dp.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "negcos_bwd", [&] {
    at::parallel_for(0, n, kRowGrain, [&](int64_t r0, int64_t r1) {
      std::vector<float> pbuf, zbuf;
      for (int64_t i0 = r0; i0 < r1; i0 += kRowGrain) {
        const int64_t i1 = std::min(r1, i0 + kRowGrain);
        const float* pr = rows_f32<scalar_t>(p, i0, i1, pbuf);
        const float* zr = rows_f32<scalar_t>(z, i0, i1, zbuf);
        for (int64_t i = i0; i < i1; ++i) {
          const float* pi = pr + (i - i0) * d;
          const float* zi = zr + (i - i0) * d;
          const Cosine c = cosine(row_sums(pi, zi, d));
          const double g2 = -2.0 * static_cast<double>(gp[i]);
          double cz = g2 / (c.m_p * c.m_z);
          // Clamped |p| <= eps: the normalisation is the constant 1 / eps, no projection.
          const double cp = c.norm_p > kEps ? -g2 * c.cos / (c.norm_p * c.norm_p) : 0.0;
          // A NaN norm fails the comparisons above and would leave part of the row finite:
          // a non-finite row (cos NaN) gets an all-NaN gradient, as the reference does.
          if (std::isnan(c.cos)) cz = std::numeric_limits<double>::quiet_NaN();
          axpby_row(pi, zi, d, cp, cz, dpp + i * d);
        }
      }
    });
  });
  return p.scalar_type() == at::kFloat ? dp : dp.to(p.scalar_type());
}

}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("negative_cosine_fwd", &fastssl::negative_cosine_fwd_cpu);
  m.impl("negative_cosine_bwd", &fastssl::negative_cosine_bwd_cpu);
}
