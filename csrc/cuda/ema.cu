// Multi-tensor EMA (momentum) update, CUDA C++: one launch for a whole model.
//
//   target_k <- lerp(target_k, online_k, w),  w = 1 - momentum       (csrc/common/moco_math.h)
//
// Same scheme as the Triton kernel (fastssl/ops/ema.py): every tensor is cut into chunks of
// kChunk elements; block b handles chunk b, whose tensor is chunk_owner[b]; per-tensor
// addresses / sizes / first chunk come from small device tables. Traffic per fp32 element:
// 8 bytes read + 4 written, the flat-buffer floor; fp32/fp32 pairs with 16-byte aligned
// chunks use float4 loads and stores.
//
// The top of this file needs only the CUDA toolkit (`nvcc -cubin -arch=sm_90 -Xptxas -v
// csrc/cuda/ema.cu` compiles it standalone, for `fastssl gpu-report`); the torch op
// registration below is compiled only inside the extension build (FASTSSL_WITH_CUDA).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "../common/moco_math.h"

namespace fastssl {
namespace cuda_ema {

constexpr int64_t kChunk = 16384;
constexpr int kThreads = 512;

template <typename T> struct Io;
template <> struct Io<float> {
  using C = float;
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};
template <> struct Io<double> {
  using C = double;
  static __device__ __forceinline__ double load(const double* p) { return *p; }
  static __device__ __forceinline__ void store(double* p, double v) { *p = v; }
};
template <> struct Io<__nv_bfloat16> {
  using C = float;
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};
template <> struct Io<__half> {
  using C = float;
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
};

// T: target dtype, O: online dtype (widened exactly to T's compute type C).
template <typename T, typename O>
__global__ void __launch_bounds__(kThreads)
ema_multi_tensor_kernel(const int64_t* __restrict__ target_ptrs,
                        const int64_t* __restrict__ online_ptrs,
                        const int64_t* __restrict__ numels,
                        const int64_t* __restrict__ first_chunk,
                        const int32_t* __restrict__ chunk_owner, double weight) {
  using C = typename Io<T>::C;
  // 1. Which tensor, which chunk.
  const int32_t k = chunk_owner[blockIdx.x];
  T* __restrict__ t = reinterpret_cast<T*>(target_ptrs[k]);
  const O* __restrict__ o = reinterpret_cast<const O*>(online_ptrs[k]);
  const int64_t n = numels[k];
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) - first_chunk[k]) * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  // 2. [PyTorch lerp, two-sided] one branch per block.
  const C w = static_cast<C>(weight);
  const C coeff = moco::lerp_coeff(w);
  const bool from_online = !moco::lerp_weight_is_small(w);
  // 3. Stream the chunk.
  int64_t i = begin + threadIdx.x;
  if constexpr (sizeof(T) == 4 && sizeof(O) == 4 && sizeof(C) == 4) {
    // fp32/fp32: 16-byte vectors when both bases are aligned (chunks start at multiples of
    // 4 elements, so alignment of the tensor is alignment of the chunk).
    if ((reinterpret_cast<uintptr_t>(t) | reinterpret_cast<uintptr_t>(o)) % 16 == 0) {
      float4* t4 = reinterpret_cast<float4*>(reinterpret_cast<float*>(t) + begin);
      const float4* o4 = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(o) + begin);
      const int64_t n4 = (end - begin) / 4;
      for (int64_t v = threadIdx.x; v < n4; v += kThreads) {
        float4 a = t4[v];
        const float4 b = o4[v];
        a.x = moco::lerp_hoisted(a.x, b.x, coeff, from_online);
        a.y = moco::lerp_hoisted(a.y, b.y, coeff, from_online);
        a.z = moco::lerp_hoisted(a.z, b.z, coeff, from_online);
        a.w = moco::lerp_hoisted(a.w, b.w, coeff, from_online);
        t4[v] = a;
      }
      i = begin + n4 * 4 + threadIdx.x;
    }
  }
  for (; i < end; i += kThreads) {
    const C tv = Io<T>::load(t + i);
    const C ov = static_cast<C>(Io<O>::load(o + i));
    Io<T>::store(t + i, moco::lerp_hoisted(tv, ov, coeff, from_online));
  }
}

// The dtype pairs the op accepts (fastssl/_validate.py: EMA_DTYPES).
#define FASTSSL_EMA_INSTANTIATE(T, O)                                                     \
  template __global__ void ema_multi_tensor_kernel<T, O>(                                 \
      const int64_t* __restrict__, const int64_t* __restrict__, const int64_t* __restrict__, \
      const int64_t* __restrict__, const int32_t* __restrict__, double);
FASTSSL_EMA_INSTANTIATE(float, float)
FASTSSL_EMA_INSTANTIATE(float, __nv_bfloat16)
FASTSSL_EMA_INSTANTIATE(float, __half)
FASTSSL_EMA_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
FASTSSL_EMA_INSTANTIATE(__half, __half)
FASTSSL_EMA_INSTANTIATE(double, double)
FASTSSL_EMA_INSTANTIATE(double, float)
#undef FASTSSL_EMA_INSTANTIATE

}  // namespace cuda_ema
}  // namespace fastssl

#if defined(FASTSSL_WITH_CUDA)
// ---------------------------------------------------------------------------------------
// torch op registration (extension build only): CUDA kernel of fastssl::ema_update_, whose
// schema is defined in csrc/cpu/ema.cpp.
// ---------------------------------------------------------------------------------------
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <utility>
#include <vector>

namespace fastssl {
namespace cuda_ema {
namespace {

template <typename T, typename O>
void launch(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& os, double weight) {
  const int64_t nt = static_cast<int64_t>(ts.size());
  at::Tensor i64 = at::empty({4, nt}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = i64.data_ptr<int64_t>();
  std::vector<int32_t> owner;
  int64_t chunks = 0;
  for (int64_t k = 0; k < nt; ++k) {
    h[k] = reinterpret_cast<int64_t>(ts[k].data_ptr());
    h[nt + k] = reinterpret_cast<int64_t>(os[k].const_data_ptr());
    h[2 * nt + k] = ts[k].numel();
    h[3 * nt + k] = chunks;
    const int64_t c = moco::num_chunks(ts[k].numel(), kChunk);
    owner.insert(owner.end(), c, static_cast<int32_t>(k));
    chunks += c;
  }
  if (chunks == 0) return;
  TORCH_CHECK(chunks < (int64_t{1} << 31), "ema_update_: too many chunks");
  at::Tensor own = at::empty({chunks}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  std::copy(owner.begin(), owner.end(), own.data_ptr<int32_t>());
  const auto dev = ts[0].device();
  at::Tensor d64 = i64.to(dev, /*non_blocking=*/true);
  at::Tensor down = own.to(dev, /*non_blocking=*/true);
  const int64_t* p = d64.data_ptr<int64_t>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  ema_multi_tensor_kernel<T, O><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
      p, p + nt, p + 2 * nt, p + 3 * nt, down.data_ptr<int32_t>(), weight);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void ema_update_cuda(at::TensorList target, at::TensorList online, double weight) {
  TORCH_CHECK(target.size() == online.size(), "ema_update_: got ", target.size(),
              " target tensors and ", online.size(), " online tensors");
  TORCH_CHECK(weight >= 0.0 && weight <= 1.0, "ema_update_: weight must be in [0, 1]");
  if (target.empty()) return;
  const c10::cuda::CUDAGuard guard(target[0].device());
  using S = at::ScalarType;
  std::map<std::pair<S, S>, std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>>> groups;
  for (size_t i = 0; i < target.size(); ++i) {
    const at::Tensor& t = target[i];
    const at::Tensor& o = online[i];
    TORCH_CHECK(t.sizes() == o.sizes(), "ema_update_: tensor ", i, " has shape ", t.sizes(),
                " in target but ", o.sizes(), " in online");
    TORCH_CHECK(t.device() == target[0].device() && o.device() == t.device(),
                "ema_update_: all tensors must be on one CUDA device");
    if (t.numel() == 0) continue;
    if (t.is_contiguous() && o.is_contiguous()) {
      auto& g = groups[{t.scalar_type(), o.scalar_type()}];
      g.first.push_back(t);
      g.second.push_back(o);
    } else {
      at::Tensor tt = t;
      tt.lerp_(o.to(t.scalar_type()), weight);
    }
  }
  for (auto& [key, g] : groups) {
    const auto [tdt, odt] = key;
    if (tdt == S::Float && odt == S::Float) launch<float, float>(g.first, g.second, weight);
    else if (tdt == S::Float && odt == S::BFloat16) launch<float, __nv_bfloat16>(g.first, g.second, weight);
    else if (tdt == S::Float && odt == S::Half) launch<float, __half>(g.first, g.second, weight);
    else if (tdt == S::BFloat16 && odt == S::BFloat16) launch<__nv_bfloat16, __nv_bfloat16>(g.first, g.second, weight);
    else if (tdt == S::Half && odt == S::Half) launch<__half, __half>(g.first, g.second, weight);
    else if (tdt == S::Double && odt == S::Double) launch<double, double>(g.first, g.second, weight);
    else if (tdt == S::Double && odt == S::Float) launch<double, float>(g.first, g.second, weight);
    else TORCH_CHECK(false, "ema_update_: unsupported dtypes (target ", tdt, ", online ", odt, ")");
  }
}

}  // namespace
}  // namespace cuda_ema
}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CUDA, m) { m.impl("ema_update_", &fastssl::cuda_ema::ema_update_cuda); }
#endif  // FASTSSL_WITH_CUDA
