// Fused MoCo key-queue enqueue, CUDA C++: one launch, the write pointer never leaves the
// device.
//
// Block b copies key rows [first + b R, first + (b + 1) R) to ring-buffer slots
// (ptr + i) mod size (csrc/common/moco_math.h; with B > size only the newest `size` rows are
// written, each once). Then thread 0 takes a ticket from an int32 counter; the block that
// draws the last ticket knows every block has read `ptr`, advances it and resets the counter
// ("last block done", as in the CUDA threadFenceReduction sample).
//
// Traffic: read + write min(B, size) x dim elements.
//
// The top of this file needs only the CUDA toolkit (standalone `nvcc -cubin` for
// `fastssl gpu-report`); the torch registration is compiled in the extension build only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "../common/moco_math.h"

namespace fastssl {
namespace cuda_queue {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 32;

template <typename T>
__global__ void __launch_bounds__(kThreads)
moco_enqueue_kernel(T* __restrict__ buffer, int64_t* __restrict__ ptr, int* __restrict__ counter,
                    const T* __restrict__ keys, int64_t batch, int64_t size, int64_t dim,
                    int64_t first, int64_t key_stride) {
  __shared__ int64_t p;
  // 1. Read the write pointer once per block.
  if (threadIdx.x == 0) p = *ptr;
  __syncthreads();
  // 2. Copy this block's rows: element e of the block's R x dim tile.
  const int64_t row0 = first + static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int64_t rows = (batch - row0) < kRowsPerBlock ? (batch - row0) : kRowsPerBlock;
  for (int64_t e = threadIdx.x; e < rows * dim; e += kThreads) {
    const int64_t r = row0 + e / dim, c = e % dim;
    buffer[moco::enqueue_slot(p, r, size) * dim + c] = keys[r * key_stride + c];
  }
  // 3. Last block done advances the pointer.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned ticket = static_cast<unsigned>(atomicAdd(counter, 1));
    if (ticket == gridDim.x - 1) {
      *ptr = moco::enqueue_next_ptr(p, batch, size);
      *counter = 0;
    }
  }
}

template __global__ void moco_enqueue_kernel<float>(float*, int64_t*, int*, const float*, int64_t,
                                                    int64_t, int64_t, int64_t, int64_t);
template __global__ void moco_enqueue_kernel<__nv_bfloat16>(__nv_bfloat16*, int64_t*, int*,
                                                            const __nv_bfloat16*, int64_t,
                                                            int64_t, int64_t, int64_t, int64_t);
template __global__ void moco_enqueue_kernel<__half>(__half*, int64_t*, int*, const __half*,
                                                     int64_t, int64_t, int64_t, int64_t, int64_t);
template __global__ void moco_enqueue_kernel<double>(double*, int64_t*, int*, const double*,
                                                     int64_t, int64_t, int64_t, int64_t, int64_t);

}  // namespace cuda_queue
}  // namespace fastssl

#if defined(FASTSSL_WITH_CUDA)
// ---------------------------------------------------------------------------------------
// torch op registration (extension build only): CUDA kernel of fastssl::moco_enqueue_,
// whose schema is defined in csrc/cpu/queue.cpp.
// ---------------------------------------------------------------------------------------
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace fastssl {
namespace cuda_queue {
namespace {

void moco_enqueue_cuda(at::Tensor buffer, at::Tensor ptr, at::Tensor counter,
                       const at::Tensor& keys) {
  TORCH_CHECK(buffer.dim() == 2 && buffer.is_contiguous() && buffer.size(0) >= 1,
              "moco_enqueue_: buffer must be a contiguous (size, dim) tensor");
  TORCH_CHECK(ptr.dim() == 0 && ptr.scalar_type() == at::kLong,
              "moco_enqueue_: ptr must be a 0-dim int64 tensor");
  TORCH_CHECK(counter.numel() == 1 && counter.scalar_type() == at::kInt,
              "moco_enqueue_: counter must be a one-element int32 tensor");
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == buffer.size(1) &&
                  keys.scalar_type() == buffer.scalar_type(),
              "moco_enqueue_: keys must be (B, dim) in the queue's dtype");
  TORCH_CHECK(buffer.device() == ptr.device() && buffer.device() == keys.device() &&
                  buffer.device() == counter.device(),
              "moco_enqueue_: buffer, ptr, counter and keys must be on one device");
  const int64_t batch = keys.size(0), size = buffer.size(0), dim = buffer.size(1);
  if (batch == 0) return;
  const at::Tensor k = keys.stride(1) == 1 ? keys : keys.contiguous();
  const c10::cuda::CUDAGuard guard(buffer.device());
  const int64_t first = moco::enqueue_first_row(batch, size);
  const unsigned blocks = static_cast<unsigned>((batch - first + kRowsPerBlock - 1) / kRowsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  int* cnt = counter.data_ptr<int>();
  int64_t* p = ptr.data_ptr<int64_t>();
#define FASTSSL_LAUNCH(T, CT)                                                              \
  moco_enqueue_kernel<T><<<blocks, kThreads, 0, stream>>>(                                 \
      reinterpret_cast<T*>(buffer.data_ptr<CT>()), p, cnt,                                 \
      reinterpret_cast<const T*>(k.const_data_ptr<CT>()), batch, size, dim, first, k.stride(0))
  switch (buffer.scalar_type()) {
    case at::kFloat: FASTSSL_LAUNCH(float, float); break;
    case at::kBFloat16: FASTSSL_LAUNCH(__nv_bfloat16, at::BFloat16); break;
    case at::kHalf: FASTSSL_LAUNCH(__half, at::Half); break;
    case at::kDouble: FASTSSL_LAUNCH(double, double); break;
    default: TORCH_CHECK(false, "moco_enqueue_: unsupported dtype ", buffer.scalar_type());
  }
#undef FASTSSL_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda_queue
}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CUDA, m) { m.impl("moco_enqueue_", &fastssl::cuda_queue::moco_enqueue_cuda); }
#endif  // FASTSSL_WITH_CUDA
