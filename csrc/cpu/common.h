// Shared building blocks of fastssl's CPU kernels.
//
//  * FASTSSL_SIMD_CLONES: compiles a hot function for AVX-512 (x86-64-v4), AVX2+FMA
//    (x86-64-v3) and the baseline, picked at load time by the dynamic loader (GCC ifunc).
//    Wheels stay portable (no -march=native) and still use the widest vectors available.
//  * exp_f32: a branch-free expf that GCC auto-vectorises inside those clones.
//  * gemm_rm: row-major single-threaded SGEMM on top of the BLAS torch ships (MKL on x86
//    wheels). The fused kernels call it on cache-sized tiles from inside at::parallel_for,
//    where MKL runs sequentially, and do the softmax work between calls.
//  * row_norm: an L2 norm that neither overflows nor underflows in fp32.
//  * TileBuffers: one 64-byte-aligned scratch tile per thread (O(tile) memory per thread).
//
// Determinism: every kernel partitions its work into units that do not depend on the thread
// count, and adds partial results in a fixed order, so results are bitwise equal at any
// torch.set_num_threads (tests/test_cpu_reliability.py).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>
#include <bit>
#include <cstring>
#include <limits>
#include <string>

//  * FASTSSL_NO_V4_CLONE (a -D for measurement builds only): leave the AVX-512 clone out, so
//    that an AVX-512 machine runs (and tests, and times) the AVX2 code that AVX2-only CPUs run.
//    FASTSSL_V4_CLONE is 1 where the AVX-512 clone is built (for hand-written multiversions).
#if defined(FASTSSL_X86) && defined(__GNUC__) && !defined(__clang__)
#define FASTSSL_MULTIVERSION 1
#if defined(FASTSSL_NO_V4_CLONE)
#define FASTSSL_V4_CLONE 0
#define FASTSSL_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTSSL_V4_CLONE 1
#define FASTSSL_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#else
#define FASTSSL_MULTIVERSION 0
#define FASTSSL_V4_CLONE 0
#define FASTSSL_SIMD_CLONES
#endif

namespace fastssl {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// expf for x in [-87, 88] (inputs outside are clamped: exp(-87) ~ 1.6e-38 stands in for 0,
// which is below fp32 resolution of any sum it joins, since every row sum holds a term of 1).
// Cody-Waite range reduction + Cephes degree-6 polynomial: max relative error ~2 ulp.
// Written without branches, library calls or type punning through pointers, so GCC
// vectorises the loops that call it.
static inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f;
  // Round to nearest by the 1.5 * 2^23 trick (exact for |t| < 2^22; no fast-math here).
  const float fn = (t + 12582912.0f) - 12582912.0f;
  const int n = static_cast<int>(fn);
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n from its bit pattern, n in [-126, 127] after the clamp.
  return p * std::bit_cast<float>(static_cast<int32_t>((n + 127) << 23));
}

// c ? a : b as a bit mask: exact, and keeps GCC from sinking a or b into a branch (so a loop
// that selects stays vectorisable; augment's hue, pretext_noise's logarithm).
static inline float select(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(a) & m) |
                              (std::bit_cast<uint32_t>(b) & ~m));
}

// -inf stands for "no column seen yet"; exp(x - (-inf)) would be NaN, so shift by 0 instead.
static inline float finite_or_zero(float m) { return m == kNegInf ? 0.0f : m; }

// Online log-sum-exp update from one tile S (bi x bj, row-major, leading dimension bj): the
// running (rmax, rsum) of its rows and, when cmax != nullptr, the running (cmax, csum) of its
// columns (cshift: bj floats of scratch). 1 exp per element per direction. Shared by the
// NT-Xent kernel (columns = rows of the mirrored block) and the contrastive core.
FASTSSL_SIMD_CLONES
void online_lse_tile(const float* __restrict s, int64_t bi, int64_t bj, float* __restrict rmax,
                     float* __restrict rsum, float* __restrict cmax, float* __restrict csum,
                     float* __restrict cshift);

// Overflow-safe L2 norm of a row. Squares of fp32 values above ~1.8e19 overflow and those below
// ~1e-19 underflow, so a row whose max-abs lies outside [2^-24, 2^24] is read scaled by the power
// of two 2^shift that brings its max-abs into [1, 2) (exact: no rounding); other rows get
// shift = 0 and the plain fp32 sum of squares. norm = ||x|| of the unscaled row, in double
// (NaN if the row holds NaN or inf).
struct RowNorm {
  int shift;
  double norm;
};
FASTSSL_SIMD_CLONES
RowNorm row_norm(const float* __restrict x, int64_t d);

// Per-thread scratch of `floats` floats each, 64-byte aligned: MKL's results can depend on the
// alignment of its operands, and a thread must not get a different answer from another.
class TileBuffers {
 public:
  explicit TileBuffers(int64_t floats);
  float* get() const;  // the calling thread's buffer (at::get_thread_num())

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::vector<std::unique_ptr<float, Free>> bufs_;
};

// C = alpha * op(A) * op(B) + beta * C, all row-major, single-threaded (also outside parallel
// regions: MKL is held to one thread per call, so a GEMM gives the same bits at any thread count).
// trans_a: A is stored (k x m) and used transposed; trans_b: B is stored (n x k).
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
             const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
             int64_t ldc);

// The clone set that FASTSSL_SIMD_CLONES functions run on this CPU, as the dynamic loader
// picks it: "x86-64-v4 (AVX-512)", "x86-64-v3 (AVX2+FMA)", "x86-64 baseline (SSE2)", or
// "portable (not x86-64 / not GCC)". For `fastssl info`.
const char* simd_clone_in_use();

// madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of a fresh output: the page faults of a
// large first-touched output otherwise cost as much as the kernel writing it (augment).
void advise_huge_pages(const at::Tensor& t);

// " + BLAS: <name>" for build_info().
std::string blas_info();

// Writes `z` (any float dtype, any strides) into dst (rows x d, fp32, contiguous) starting at
// row `row0`. Returns false if any element is non-finite.
bool copy_rows_to_f32(const at::Tensor& z, float* dst, int64_t row0);

}  // namespace fastssl
