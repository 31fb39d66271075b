// Multi-tensor EMA (momentum) update on the CPU: for every pair (t, o) of a model's tensors,
//     t <- lerp(t, o, w),   w = 1 - momentum              (csrc/common/moco_math.h)
// in ONE pass over all tensors, which is what a memory-bound op needs.
//
// Why this is as fast as one lerp_ on a single flat buffer (the bandwidth floor):
//  * Traffic: read t, read o, write t: 3 x 4 bytes per fp32 parameter (307 MB for a
//    ResNet-50); nothing else is read or written, no temporaries.
//  * One at::parallel_for over the *concatenated* element range [0, sum numel): each thread
//    gets an equal contiguous share (sliced across tensor boundaries), so both cores stream
//    the whole time. Per-tensor parallel_for launches (torch._foreach_lerp_ on CPU, or a
//    Python loop) pay a fork/join per tensor and leave a core idle on the small BatchNorm
//    vectors, 2/3 of ResNet-50's 161 tensors.
//  * The inner loops are FASTSSL_SIMD_CLONES (AVX-512 / AVX2+FMA / baseline) with the
//    w < 0.5 branch hoisted out, so they vectorise to load, sub, fma, store.
//
// Dtypes (target, online): (f32, f32|bf16|f16), (bf16, bf16), (f16, f16), (f64, f64|f32):
// the online value is widened exactly, so the result equals
// torch._foreach_lerp_(target, [o.to(target.dtype)], w). Low-precision targets compute in
// fp32 and round once. Tensors that are not dense, or whose strides differ between target and
// online, are updated afterwards with at::lerp_ (same math, per tensor).
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/moco_math.h"
#include "common.h"

namespace fastssl {
namespace {

using moco::lerp_coeff;
using moco::lerp_hoisted;
using moco::lerp_weight_is_small;

// Below this many elements in total one thread does it all (a fork/join costs ~5-10 us,
// i.e. streaming ~100 K fp32 elements).
constexpr int64_t kGrain = 1 << 16;

template <typename T>
struct Compute { using type = float; };
template <>
struct Compute<double> { using type = double; };

// Elements per unrolled step: 4 AVX-512 vectors of fp32 in flight per operand (a single
// vector per iteration ran ~10% below torch's lerp_ on one core: too few loads in flight).
constexpr int64_t kUnroll = 64;

template <typename T, typename O, bool kFromOnline>
inline __attribute__((always_inline)) void ema_loop(T* __restrict t, const O* __restrict o,
                                                    int64_t n, typename Compute<T>::type coeff) {
  using C = typename Compute<T>::type;
  int64_t i = 0;
  for (; i + kUnroll <= n; i += kUnroll) {
#pragma omp simd
    for (int64_t j = i; j < i + kUnroll; ++j)
      t[j] = static_cast<T>(
          lerp_hoisted<C>(static_cast<C>(t[j]), static_cast<C>(o[j]), coeff, kFromOnline));
  }
  for (; i < n; ++i)
    t[i] = static_cast<T>(
        lerp_hoisted<C>(static_cast<C>(t[i]), static_cast<C>(o[i]), coeff, kFromOnline));
}

template <typename T, typename O>
inline __attribute__((always_inline)) void ema_span(T* __restrict t, const O* __restrict o,
                                                    int64_t n, double weight) {
  using C = typename Compute<T>::type;
  const C w = static_cast<C>(weight);
  // Two copies of the loop so the select between the two ends is not per element.
  if (lerp_weight_is_small(w))
    ema_loop<T, O, false>(t, o, n, lerp_coeff(w));
  else
    ema_loop<T, O, true>(t, o, n, lerp_coeff(w));
}

// One vectorised clone set per supported dtype pair (target_clones does not apply to
// templates, so each pair gets a plain function around the inlined template body).
#define FASTSSL_EMA_SPAN(NAME, T, O)                                                  \
  FASTSSL_SIMD_CLONES void NAME(void* t, const void* o, int64_t n, double weight) {   \
    ema_span<T, O>(static_cast<T*>(t), static_cast<const O*>(o), n, weight);          \
  }
FASTSSL_EMA_SPAN(ema_f32_f32, float, float)
FASTSSL_EMA_SPAN(ema_f32_bf16, float, c10::BFloat16)
FASTSSL_EMA_SPAN(ema_f32_f16, float, c10::Half)
FASTSSL_EMA_SPAN(ema_bf16_bf16, c10::BFloat16, c10::BFloat16)
FASTSSL_EMA_SPAN(ema_f16_f16, c10::Half, c10::Half)
FASTSSL_EMA_SPAN(ema_f64_f64, double, double)
FASTSSL_EMA_SPAN(ema_f64_f32, double, float)
#undef FASTSSL_EMA_SPAN

using SpanFn = void (*)(void*, const void*, int64_t, double);

SpanFn span_fn(at::ScalarType t, at::ScalarType o) {
  using S = at::ScalarType;
  if (t == S::Float && o == S::Float) return ema_f32_f32;
  if (t == S::Float && o == S::BFloat16) return ema_f32_bf16;
  if (t == S::Float && o == S::Half) return ema_f32_f16;
  if (t == S::BFloat16 && o == S::BFloat16) return ema_bf16_bf16;
  if (t == S::Half && o == S::Half) return ema_f16_f16;
  if (t == S::Double && o == S::Double) return ema_f64_f64;
  if (t == S::Double && o == S::Float) return ema_f64_f32;
  return nullptr;
}

struct Span {
  char* t;
  const char* o;
  int64_t t_elem, o_elem;  // element sizes in bytes
  SpanFn fn;
};

void ema_update_cpu(at::TensorList target, at::TensorList online, double weight) {
  TORCH_CHECK(target.size() == online.size(), "ema_update_: got ", target.size(),
              " target tensors and ", online.size(), " online tensors");
  TORCH_CHECK(weight >= 0.0 && weight <= 1.0, "ema_update_: weight 1 - momentum must be in "
              "[0, 1], got ", weight);
  std::vector<Span> spans;
  std::vector<int64_t> start{0};  // start[k]: offset of span k in the concatenated range
  std::vector<size_t> strided;    // tensors left to at::lerp_
  spans.reserve(target.size());
  start.reserve(target.size() + 1);
  for (size_t i = 0; i < target.size(); ++i) {
    const at::Tensor& t = target[i];
    const at::Tensor& o = online[i];
    TORCH_CHECK(t.sizes() == o.sizes(), "ema_update_: tensor ", i, " has shape ", t.sizes(),
                " in target but ", o.sizes(), " in online");
    TORCH_CHECK(t.device().is_cpu() && o.device().is_cpu(),
                "ema_update_: CPU kernel got a tensor on ", t.device(), " / ", o.device());
    SpanFn fn = span_fn(t.scalar_type(), o.scalar_type());
    TORCH_CHECK(fn != nullptr, "ema_update_: unsupported dtypes (target ", t.scalar_type(),
                ", online ", o.scalar_type(), ") for tensor ", i);
    if (t.numel() == 0) continue;
    // Dense tensors with identical strides map element k of t to element k of o in memory
    // order, whatever the layout (contiguous, channels_last, ...).
    if (t.is_non_overlapping_and_dense() && t.strides() == o.strides()) {
      spans.push_back({static_cast<char*>(t.data_ptr()),
                       static_cast<const char*>(o.const_data_ptr()),
                       static_cast<int64_t>(t.element_size()),
                       static_cast<int64_t>(o.element_size()), fn});
      start.push_back(start.back() + t.numel());
    } else {
      strided.push_back(i);
    }
  }
  const int64_t total = start.back();
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    // First span that holds `begin`, then walk spans until `end`.
    size_t k = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (int64_t pos = begin; pos < end; ++k) {
      const Span& s = spans[k];
      const int64_t lo = pos - start[k];
      const int64_t hi = std::min(end, start[k + 1]) - start[k];
      s.fn(s.t + lo * s.t_elem, s.o + lo * s.o_elem, hi - lo, weight);
      pos = start[k] + hi;
    }
  });
  for (size_t i : strided) {
    at::Tensor t = target[i];
    t.lerp_(online[i].to(t.scalar_type()), weight);
  }
}

}  // namespace
}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) { m.impl("ema_update_", &fastssl::ema_update_cpu); }
