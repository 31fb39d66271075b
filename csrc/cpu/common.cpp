// Implementation of common.h: the tile GEMM and input staging shared by the CPU kernels.
#include "common.h"

#include <algorithm>
#include <torch/library.h>

#include <atomic>
#if defined(__linux__)
#include <sys/mman.h>
#endif

// The Fortran BLAS symbol that torch's CPU library exports (MKL on x86-64 wheels, OpenBLAS
// on others). Declared weak so that a torch without it still loads; gemm_rm then falls back
// to at::mm on tensors that wrap the tile buffers (slower: allocation + dispatch per tile).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (returns the previous one; 0: follow the global setting); absent
// from non-MKL builds. The C entry point: the lower-case symbol is the Fortran one (int*).
extern "C" int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));

namespace fastssl {

// A large output (38 MiB for 64 views at 224^2) is fresh memory that glibc maps anew on every
// call (it is above malloc's mmap threshold), so writing it page-faults once per 4 KiB page:
// measured for augment, ~40% of the kernel's CPU time for batch 64 (47 ms -> 30 ms per 64 views
// with huge pages). Asking for transparent huge pages on the untouched range turns ~9,400
// faults into ~19. Advice only: no effect on results, ignored where THP is off or not Linux.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
             const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
             int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ != nullptr) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const char ta = trans_b ? 'T' : 'N';
    const char tb = trans_a ? 'T' : 'N';
    const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(ldb), ildb = static_cast<int>(lda),
              ildc = static_cast<int>(ldc);
    // at::parallel_for runs small ranges inline on the calling thread, outside any parallel
    // region, where MKL would otherwise thread (and may split the sum) by the global count.
    const int prev = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor A = trans_a ? at::from_blob(const_cast<float*>(a), {k, m}, {lda, 1}, opts).t()
                         : at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, opts);
  at::Tensor B = trans_b ? at::from_blob(const_cast<float*>(b), {n, k}, {ldb, 1}, opts).t()
                         : at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::Tensor prod = at::mm(A, B);
  if (beta == 0.0f) {
    C.copy_(prod.mul_(alpha));
  } else {
    C.mul_(beta).add_(prod, alpha);
  }
}

// See common.h.
FASTSSL_SIMD_CLONES
void online_lse_tile(const float* __restrict s, int64_t bi, int64_t bj, float* __restrict rmax,
              float* __restrict rsum, float* __restrict cmax, float* __restrict csum,
              float* __restrict cshift) {
  const bool cols = cmax != nullptr;
  if (cols) {
    // 1. [Online softmax, columns] tile column maxima, then rescale the running column sums.
    for (int64_t j = 0; j < bj; ++j) cshift[j] = kNegInf;
    for (int64_t i = 0; i < bi; ++i) {
      const float* row = s + i * bj;
#pragma omp simd
      for (int64_t j = 0; j < bj; ++j) cshift[j] = row[j] > cshift[j] ? row[j] : cshift[j];
    }
    for (int64_t j = 0; j < bj; ++j) {
      const float nm = cmax[j] > cshift[j] ? cmax[j] : cshift[j];
      const float sh = finite_or_zero(nm);
      csum[j] *= exp_f32(cmax[j] - sh);
      cmax[j] = nm;
      cshift[j] = sh;
    }
  }
  // 2. [Online softmax, rows] per row: max, then the exponentials of both directions.
  for (int64_t i = 0; i < bi; ++i) {
    const float* row = s + i * bj;
    float rm = kNegInf;
#pragma omp simd reduction(max : rm)
    for (int64_t j = 0; j < bj; ++j) rm = row[j] > rm ? row[j] : rm;
    const float nm = rmax[i] > rm ? rmax[i] : rm;
    const float sh = finite_or_zero(nm);
    float acc = 0.0f;
    if (cols) {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < bj; ++j) {
        acc += exp_f32(row[j] - sh);
        csum[j] += exp_f32(row[j] - cshift[j]);
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < bj; ++j) acc += exp_f32(row[j] - sh);
    }
    rsum[i] = rsum[i] * exp_f32(rmax[i] - sh) + acc;
    rmax[i] = nm;
  }
}

FASTSSL_SIMD_CLONES
RowNorm row_norm(const float* __restrict x, int64_t d) {
  float mx = 0.0f;
#pragma omp simd reduction(max : mx)
  for (int64_t k = 0; k < d; ++k) {
    const float a = std::fabs(x[k]);
    mx = a > mx ? a : mx;
  }
  if (!std::isfinite(mx)) return {0, std::numeric_limits<double>::quiet_NaN()};
  int shift = 0;
  if (mx > 0x1p24f || (mx > 0.0f && mx < 0x1p-24f))
    shift = std::clamp(-std::ilogb(mx), -126, 126);  // 2^shift stays a normal float
  const float f = std::ldexp(1.0f, shift);
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t k = 0; k < d; ++k) {
    const float v = x[k] * f;
    ss += v * v;
  }
  // NaN elements are skipped by the max but reach ss.
  return {shift, std::ldexp(std::sqrt(static_cast<double>(ss)), -shift)};
}

TileBuffers::TileBuffers(int64_t floats) {
  const size_t bytes = ((static_cast<size_t>(floats) * sizeof(float) + 63) / 64) * 64;
  for (int t = 0; t < at::get_num_threads(); ++t) {
    bufs_.emplace_back(static_cast<float*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(bufs_.back() != nullptr, "fastssl: out of memory for a ", bytes, "-byte tile");
  }
}

float* TileBuffers::get() const { return bufs_.at(at::get_thread_num()).get(); }
// Hand-written multiversions of one tiny function with the same target list as
// FASTSSL_SIMD_CLONES: GCC's dispatcher picks among them exactly as it picks among the clones.
namespace {
#if FASTSSL_MULTIVERSION
__attribute__((target("default"))) const char* clone_probe() { return "x86-64 baseline (SSE2)"; }
__attribute__((target("arch=x86-64-v3"))) const char* clone_probe() {
  return "x86-64-v3 (AVX2+FMA)";
}
#if FASTSSL_V4_CLONE
__attribute__((target("arch=x86-64-v4"))) const char* clone_probe() {
  return "x86-64-v4 (AVX-512)";
}
#endif
#else
const char* clone_probe() { return "portable (no x86-64 ISA clones in this build)"; }
#endif
}  // namespace

const char* simd_clone_in_use() { return clone_probe(); }

std::string blas_info() {
  return sgemm_ != nullptr ? " + BLAS sgemm_ from torch (tile GEMM)"
                           : " + at::mm tile GEMM (no sgemm_ symbol: slower)";
}

bool copy_rows_to_f32(const at::Tensor& z, float* dst, int64_t row0) {
  const int64_t rows = z.size(0), d = z.size(1);
  at::Tensor out = at::from_blob(dst + row0 * d, {rows, d}, at::TensorOptions().dtype(at::kFloat));
  out.copy_(z);  // handles strides and bf16/fp16 -> fp32
  std::atomic<bool> finite{true};
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    bool ok = true;
    for (int64_t r = r0; r < r1; ++r) {
      const float* p = dst + (row0 + r) * d;
      float acc = 0.0f;
      for (int64_t j = 0; j < d; ++j) acc += p[j] * 0.0f;  // NaN/inf survive x*0
      ok = ok && (acc == 0.0f);
    }
    if (!ok) finite.store(false);
  });
  return finite.load();
}

}  // namespace fastssl

// `fastssl info` asks for the clone in use (registered here, beside the function it exposes).
TORCH_LIBRARY_FRAGMENT(fastssl, m) {
  m.def("simd_clone() -> str", []() { return std::string(fastssl::simd_clone_in_use()); });
}
