// The arithmetic of the MoCo machinery, shared by the CPU kernels (csrc/cpu/ema.cpp,
// csrc/cpu/queue.cpp, compiled by g++ and exercised by the CPU tests) and the CUDA kernels
// (csrc/cuda/ema.cu, csrc/cuda/queue.cu). Header-only, no torch, no CUDA runtime: plain
// g++ and a standalone `nvcc -cubin` both compile it.
//
//  * EMA: target <- lerp(target, online, w) with w = 1 - momentum, in the two-sided form
//    PyTorch uses (ATen/native/Lerp.h, and the fmadd form of its vectorised CPU kernel):
//        w <  0.5:  t + w * (o - t)          = fma(w,     o - t, t)
//        w >= 0.5:  o - (1 - w) * (o - t)    = fma(w - 1, o - t, o)
//    Each end is exact at its endpoint (w = 0 keeps t, w = 1 gives o), and the rounding error
//    stays relative to the nearer end. With an explicit fma the result is bit-identical to
//    torch.lerp's AVX2/AVX-512 kernels (and what nvcc contracts the CUDA one to).
//  * Queue: a ring buffer of `size` rows written from the device-side pointer `ptr`.
//    Writing B keys in order, key i lands in slot (ptr + i) mod size; with B > size the
//    first B - size keys would be overwritten by later ones in the same batch, so only rows
//    [first_row, B) are written at all, each exactly once (no write-write race on a GPU).
//    The next pointer is (ptr + B) mod size.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FASTSSL_HD __host__ __device__ __forceinline__
#else
#define FASTSSL_HD inline __attribute__((always_inline))
#endif

namespace fastssl {
namespace moco {

FASTSSL_HD bool lerp_weight_is_small(float w) { return w < 0.5f; }
FASTSSL_HD bool lerp_weight_is_small(double w) { return w < 0.5; }

FASTSSL_HD float fma_(float a, float b, float c) { return fmaf(a, b, c); }
FASTSSL_HD double fma_(double a, double b, double c) { return fma(a, b, c); }

// lerp(t, o, w) with the branch on w hoisted by the caller: `coeff` is w (small weight) or
// w - 1 (large weight), `from_online` says which end the fma starts from.
template <typename C>
FASTSSL_HD C lerp_hoisted(C t, C o, C coeff, bool from_online) {
  return fma_(coeff, o - t, from_online ? o : t);
}

template <typename C>
FASTSSL_HD C lerp_coeff(C w) { return lerp_weight_is_small(w) ? w : w - C(1); }

// The full lerp, for scalar use (tails, tests).
template <typename C>
FASTSSL_HD C lerp(C t, C o, C w) {
  return lerp_hoisted(t, o, lerp_coeff(w), !lerp_weight_is_small(w));
}

// Index math of the ring-buffer enqueue (all int64: size * dim may exceed 2^31).
FASTSSL_HD int64_t enqueue_first_row(int64_t batch, int64_t size) {
  return batch > size ? batch - size : 0;
}
FASTSSL_HD int64_t enqueue_slot(int64_t ptr, int64_t row, int64_t size) {
  return (ptr + row) % size;
}
FASTSSL_HD int64_t enqueue_next_ptr(int64_t ptr, int64_t batch, int64_t size) {
  return (ptr + batch % size) % size;
}

// Multi-tensor chunking: tensor of `numel` elements is cut into ceil(numel / chunk) chunks.
FASTSSL_HD int64_t num_chunks(int64_t numel, int64_t chunk) { return (numel + chunk - 1) / chunk; }

}  // namespace moco
}  // namespace fastssl
