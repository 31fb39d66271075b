// Fused SSL augmentation on the CPU with per-sample parameters (fastssl.augment).
//
// Spec: fastssl/reference.py, "SSL augmentation". Per sample, in this order:
//   crop + bilinear resize (flip folded into the column index) -> colour jitter in the sample's
//   order (brightness, contrast, saturation, hue; clamped to [0, 1] after each) -> gray ->
//   Gaussian blur (separable, reflect padding) -> solarize -> (x - mean) / std -> cast.
//
// Design:
//  * Parallel over samples (at::parallel_for workers taking samples from a shared counter): a
//    sample's whole chain runs on one thread in a private out x out x 3 fp32 buffer (600 KiB
//    at 224^2: L2-resident on Zen 4), so there is no synchronisation and the result does not
//    depend on the thread count. (Rows of one sample are not split across threads: batches
//    are >> 2 images here; a batch of 1 runs on one thread.)
//  * Pass 1, row by row: the two input rows a output row needs are converted to fp32 and
//    interpolated horizontally once each (a 2-row cache keyed by row parity: consecutive
//    output rows share input rows), then vertically; the colour ops that do not need the
//    image's mean run on the fresh row while it is in L1.
//    read: crop rows (uint8, 3 ch); write: 3 out^2 fp32.
//  * Contrast needs mean(gray) of the image as it is *when contrast runs*: pass 1 stops the
//    colour chain at contrast and accumulates the gray sum in double (8 fixed lanes per row,
//    rows in order: a deterministic reduction); pass 2 applies contrast and the ops after it.
//    Without jitter (so without contrast) pass 1 does everything up to the blur.
//  * Blur reads neighbours, so it is its own pass: horizontal in place on each row (copied to
//    a reflect-padded scratch row first), then vertical from the buffer straight into the
//    output with solarize, normalize and the cast fused into the store.
//    Without blur, the last colour pass stores the output directly.
//  * The output gets transparent huge pages (advise_huge_pages): its page faults were ~40% of
//    the CPU time. Samples are handed to threads one at a time (their costs differ).
//  * Every row loop is a FASTSSL_SIMD_CLONES function (AVX-512 / AVX2 / baseline picked at
//    run time), branch-free in the inner loop so that GCC vectorises it (hue included: the
//    HSV sector select is done with compares, not a table). The blur, written with explicit
//    vectors, is hand multiversioned instead: one register width per clone (a vector wider
//    than the clone's registers lives in memory: the AVX2 clone was 6x slower at the blur).
//    FASTSSL_NO_V4_CLONE builds (common.h) run the AVX2 code on an AVX-512 machine.
//  * Rotation (the pretext task; optional rot (B,) of 0..3): the final store writes each row
//    where it lands in torch.rot90(view, rot) (store_row_rotated); the buffers stay upright.
//  * Comparability (docs/DESIGN.md, section 4.8): -ffp-contract=off and the reference's operation order, so
//    products and sums round exactly as in PyTorch; the contrast mean is summed in double and
//    rounded once, like the reference's float64 mean.
#include <ATen/Dispatch_v2.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "common.h"

namespace fastssl {
namespace {

enum ColorOp : int64_t { kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3 };
enum FlagCol : int64_t { kFlip = 0, kJitter = 1, kGray = 2, kBlur = 3, kSolarize = 4, kFlags = 5 };

constexpr float kGrayR = 0.2989f, kGrayG = 0.587f, kGrayB = 0.114f;

static inline float clamp01(float v) { return std::min(std::max(v, 0.0f), 1.0f); }

// ---- pass 1: resize ------------------------------------------------------------------------

// uint8 row segment -> fp32 in [0, 1] (x / 255, IEEE division like the reference).
FASTSSL_SIMD_CLONES
void u8_to_f32(const uint8_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) / 255.0f;
}

// Horizontal bilinear: dst[x] = src[i0[x]] * w0[x] + src[i1[x]] * w1[x]  (gathers).
FASTSSL_SIMD_CLONES
void bilinear_h(const float* __restrict src, const int32_t* __restrict i0,
                const int32_t* __restrict i1, const float* __restrict w0,
                const float* __restrict w1, float* __restrict dst, int64_t n) {
  for (int64_t x = 0; x < n; ++x) dst[x] = src[i0[x]] * w0[x] + src[i1[x]] * w1[x];
}

// Vertical bilinear: dst[x] = a[x] * wa + b[x] * wb.
FASTSSL_SIMD_CLONES
void bilinear_v(const float* __restrict a, const float* __restrict b, float wa, float wb,
                float* __restrict dst, int64_t n) {
  for (int64_t x = 0; x < n; ++x) dst[x] = a[x] * wa + b[x] * wb;
}

// ---- colour ops on one row of the three planes ----------------------------------------------

FASTSSL_SIMD_CLONES
void row_scale(float* __restrict r, float* __restrict g, float* __restrict b, float f,
               int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    r[x] = clamp01(r[x] * f);
    g[x] = clamp01(g[x] * f);
    b[x] = clamp01(b[x] * f);
  }
}

// x * f + m1 with m1 = mean * (1 - f), precomputed (the reference rounds it the same way).
FASTSSL_SIMD_CLONES
void row_contrast(float* __restrict r, float* __restrict g, float* __restrict b, float f,
                  float m1, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    r[x] = clamp01(r[x] * f + m1);
    g[x] = clamp01(g[x] * f + m1);
    b[x] = clamp01(b[x] * f + m1);
  }
}

FASTSSL_SIMD_CLONES
void row_saturation(float* __restrict r, float* __restrict g, float* __restrict b, float f,
                    int64_t n) {
  const float f1 = 1.0f - f;
  for (int64_t x = 0; x < n; ++x) {
    const float gray = r[x] * kGrayR + g[x] * kGrayG + b[x] * kGrayB;
    const float gm = gray * f1;
    r[x] = clamp01(r[x] * f + gm);
    g[x] = clamp01(g[x] * f + gm);
    b[x] = clamp01(b[x] * f + gm);
  }
}

// The hue loop only vectorises with -fno-trapping-math (setup.py): with trapping math GCC will
// not if-convert its selects. That option changes no result (no FP exception flag is ever
// inspected). (#pragma GCC optimize would be local, but it blocks inlining and did not
// vectorise the loop with GCC 12.)
static inline float hue_max(float a, float b) { return a < b ? b : a; }  // == std::max
static inline float hue_min(float a, float b) { return b < a ? b : a; }  // == std::min
static inline float hue_clamp01(float v) { return hue_min(hue_max(v, 0.0f), 1.0f); }

// torchvision v2 _rgb_to_hsv -> h = frac(h + shift) -> _hsv_to_rgb, operation for operation.
FASTSSL_SIMD_CLONES
void row_hue(float* __restrict r, float* __restrict g, float* __restrict b, float shift,
             int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const float R = r[x], G = g[x], B = b[x];
    const float maxc = hue_max(hue_max(R, G), B);
    const float minc = hue_min(hue_min(R, G), B);
    const bool eqc = maxc == minc;
    const float cr = maxc - minc;
    const float s = cr / select(eqc, 1.0f, maxc);
    const float crd = select(eqc, 1.0f, cr);
    const float rc = (maxc - R) / crd, gc = (maxc - G) / crd, bc = (maxc - B) / crd;
    const bool not_r = maxc != R;
    const bool is_g = maxc == G;
    const float hr = select(not_r, 0.0f, bc - gc);
    const float hg = select(is_g & not_r, (rc + 2.0f) - bc, 0.0f);
    const float hb = select((!is_g) & not_r, (gc + 4.0f) - rc, 0.0f);
    float h = (hr + hg) + hb;
    h = h * static_cast<float>(1.0 / 6.0) + 1.0f;
    h = h - __builtin_floorf(h);
    h = h + shift;
    h = h - __builtin_floorf(h);
    // HSV -> RGB
    const float v = maxc;
    const float h6 = h * 6.0f;
    const float fi = __builtin_floorf(h6);
    const float f = h6 - fi;
    const float sector = select(fi >= 6.0f, fi - 6.0f, fi);  // 0..5 (fi = 6 when h rounded to 1)
    const float sxf = s * f;
    const float one_minus_s = 1.0f - s;
    const float q = hue_clamp01((1.0f - sxf) * v);
    const float t = hue_clamp01((sxf + one_minus_s) * v);
    const float p = hue_clamp01(one_minus_s * v);
    // sector -> (r, g, b): 0 (v,t,p) 1 (q,v,p) 2 (p,v,t) 3 (p,q,v) 4 (t,p,v) 5 (v,p,q)
    const bool s0 = sector == 0.0f, s1 = sector == 1.0f, s2 = sector == 2.0f;
    const bool s3 = sector == 3.0f, s4 = sector == 4.0f, s5 = sector == 5.0f;
    const float ro = select(s0 | s5, v, select(s1, q, select(s4, t, p)));
    const float go = select(s1 | s2, v, select(s0, t, select(s3, q, p)));
    const float bo = select(s3 | s4, v, select(s2, t, select(s5, q, p)));
    r[x] = ro;
    g[x] = go;
    b[x] = bo;
  }
}

FASTSSL_SIMD_CLONES
void row_gray(float* __restrict r, float* __restrict g, float* __restrict b, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const float gray = r[x] * kGrayR + g[x] * kGrayG + b[x] * kGrayB;
    r[x] = gray;
    g[x] = gray;
    b[x] = gray;
  }
}

// Sum of the row's gray values in double: 8 fixed lanes of partial sums, then the lanes in
// order (a fixed order: deterministic). In double the order changes the sum by ~1e-16
// relative, far below the one rounding to fp32 of the mean, so it equals the reference's
// float64 mean. (A sequential double sum is a 4-cycle dependency chain per pixel.)
// The 8 lanes are two 4-double vectors, not one 8-double vector: a vector type wider than
// the clone's registers has no machine mode, so GCC keeps it in memory and moves it through
// general registers (store-forwarding stalls: 3x slower in the AVX2 clone). 32-byte types are
// native in the AVX2 and AVX-512 clones.
typedef double vd4 __attribute__((vector_size(32), aligned(8), may_alias));
typedef float vf4 __attribute__((vector_size(16), aligned(4), may_alias));
typedef float vf8 __attribute__((vector_size(32), aligned(4), may_alias));

FASTSSL_SIMD_CLONES
double row_gray_sum(const float* __restrict r, const float* __restrict g,
                    const float* __restrict b, int64_t n) {
  vd4 acc_lo = {0, 0, 0, 0}, acc_hi = {0, 0, 0, 0};  // lanes 0..3 and 4..7
  int64_t x = 0;
  for (; x + 8 <= n; x += 8) {
    const vf8 rv = *reinterpret_cast<const vf8*>(r + x);
    const vf8 gv = *reinterpret_cast<const vf8*>(g + x);
    const vf8 bv = *reinterpret_cast<const vf8*>(b + x);
    const vf8 gray = rv * kGrayR + gv * kGrayG + bv * kGrayB;
    const vf4 gray_lo = __builtin_shufflevector(gray, gray, 0, 1, 2, 3);
    const vf4 gray_hi = __builtin_shufflevector(gray, gray, 4, 5, 6, 7);
    acc_lo = acc_lo + __builtin_convertvector(gray_lo, vd4);
    acc_hi = acc_hi + __builtin_convertvector(gray_hi, vd4);
  }
  double sum = 0.0;
  for (int j = 0; j < 4; ++j) sum += acc_lo[j];
  for (int j = 0; j < 4; ++j) sum += acc_hi[j];
  for (; x < n; ++x) sum += static_cast<double>(r[x] * kGrayR + g[x] * kGrayG + b[x] * kGrayB);
  return sum;
}

// ---- blur -------------------------------------------------------------------------------------

// The blur's accumulators must stay in registers across the taps, so it is written with
// explicit GCC vectors of the clone's register width: 16 floats (zmm) for AVX-512, 8 (ymm)
// for AVX2, 4 (xmm) for the baseline. One width for all clones does not work: a vector
// wider than the registers has no machine mode and lives on the stack (the AVX2 clone of a
// 16-float version moved every accumulator through memory and general registers at every tap:
// 6.4x slower, 80% of that clone's time for SimCLR views). Element-wise every width computes the same thing (t * x, then +, taps in
// order) as the scalar code and the reference, so all clones give bit-identical results.
typedef float vf16 __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t kLanes = 16;  // the widest vector: row buffers are rounded up to it

// Unaligned loads and stores by memcpy: a typedef's aligned(4) / may_alias do not survive
// being a template argument (GCC drops them), so dereferencing a V* could be an aligned move.
template <typename V>
__attribute__((always_inline)) static inline V load_v(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
__attribute__((always_inline)) static inline void store_v(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// Outputs [x, x + C * L) with C independent accumulators (they hide the add latency: one
// chain per tap otherwise). in(j) + x is tap j's input for output x.
template <typename V, int C, typename In>
__attribute__((always_inline)) static inline void blur_block(In in, const float* taps, int64_t k,
                                                             float* dst, int64_t x) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  V a[C];
  const float* s0 = in(0) + x;
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) a[c] = taps[0] * load_v<V>(s0 + c * L);
  for (int64_t j = 1; j < k; ++j) {
    const float t = taps[j];
    const float* sj = in(j) + x;
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) a[c] = a[c] + t * load_v<V>(sj + c * L);
  }
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) store_v<V>(dst + x + c * L, a[c]);
}

// dst[x] = sum_k taps[k] * src[x + k], k = 0..K-1 in order, for x < round_up(n, L) (L the
// vector width, <= kLanes): src needs round_up(n, 16) + k - 1 readable floats, dst
// round_up(n, 16) writable ones. Work: 2 K flops per output, from L1.
template <typename V, int C>
__attribute__((always_inline)) static inline void blur_1d_impl(const float* const* src,
                                                               int64_t step,
                                                               const float* __restrict taps,
                                                               int64_t k, float* __restrict dst,
                                                               int64_t n) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  // src[j] + x is tap j's input for output x; for the horizontal pass src[j] = row + j
  // (step 1: one pointer, offset by j), for the vertical pass src[j] = the reflected row j.
  auto in = [&](int64_t j) { return step ? src[0] + j : src[j]; };
  int64_t x = 0;
  for (; x + C * L <= n + L - 1; x += C * L) blur_block<V, C>(in, taps, k, dst, x);
  // The rest in blocks of 4, then 1 vector (224 = 3 x 64 + 32 in the AVX2 clone).
  if constexpr (C > 4) {
    for (; x + 4 * L <= n + L - 1; x += 4 * L) blur_block<V, 4>(in, taps, k, dst, x);
  }
  for (; x < n; x += L) blur_block<V, 1>(in, taps, k, dst, x);
}

// Hand-written multiversions (GCC dispatches them like FASTSSL_SIMD_CLONES): one vector
// width per clone. 4 zmm / 8 ymm accumulators (64 floats a block; AVX2 needs 8 ymm chains to
// cover the add latency at 2 adds a cycle) / 4 xmm.
#if FASTSSL_MULTIVERSION
#if FASTSSL_V4_CLONE
__attribute__((target("arch=x86-64-v4"))) void blur_1d(const float* const* src, int64_t step,
                                                       const float* __restrict taps, int64_t k,
                                                       float* __restrict dst, int64_t n) {
  blur_1d_impl<vf16, 4>(src, step, taps, k, dst, n);
}
#endif
__attribute__((target("arch=x86-64-v3"))) void blur_1d(const float* const* src, int64_t step,
                                                       const float* __restrict taps, int64_t k,
                                                       float* __restrict dst, int64_t n) {
  blur_1d_impl<vf8, 8>(src, step, taps, k, dst, n);
}
__attribute__((target("default"))) void blur_1d(const float* const* src, int64_t step,
                                                const float* __restrict taps, int64_t k,
                                                float* __restrict dst, int64_t n) {
  blur_1d_impl<vf4, 4>(src, step, taps, k, dst, n);
}
#else
void blur_1d(const float* const* src, int64_t step, const float* __restrict taps, int64_t k,
             float* __restrict dst, int64_t n) {
  blur_1d_impl<vf4, 4>(src, step, taps, k, dst, n);
}
#endif

// ---- epilogue: solarize -> normalize -> cast ------------------------------------------------

// (solarize ? (x >= thr ? 1 - x : x) : x) -> (x - mean) / std, in fp32.
FASTSSL_SIMD_CLONES
void finalize_row(const float* __restrict src, float* __restrict dst, int64_t n, bool sol,
                  float thr, float mean, float std_) {
  if (sol) {
    for (int64_t x = 0; x < n; ++x) {
      float v = src[x];
      v = v >= thr ? 1.0f - v : v;
      dst[x] = (v - mean) / std_;
    }
  } else {
    for (int64_t x = 0; x < n; ++x) dst[x] = (src[x] - mean) / std_;
  }
}

// The store: fp32 straight into the output; bf16 / fp16 through a scratch row and one
// round-to-nearest-even conversion.
template <typename out_t>
void store_row(const float* src, out_t* dst, float* tmp, int64_t n, bool sol, float thr,
               float mean, float std_) {
  if constexpr (std::is_same_v<out_t, float>) {
    finalize_row(src, dst, n, sol, thr, mean, std_);
  } else {
    finalize_row(src, tmp, n, sol, thr, mean, std_);
    for (int64_t x = 0; x < n; ++x) dst[x] = static_cast<out_t>(tmp[x]);
  }
}

// Row y of one channel of the unrotated view, stored where it lands in torch.rot90(view, rot)
// (counter-clockwise rot x 90 degrees): the rotation of the pretext task is folded into the
// store index, no pass of its own. rot 1 / 3 write a column (stride out): the plane (out^2
// floats, 200 KiB at 224) stays in L2 while it is written.
template <typename out_t>
void store_row_rotated(const float* src, out_t* plane_dst, int64_t y, int64_t out, int64_t rot,
                       float* tmp, bool sol, float thr, float mean, float std_) {
  if (rot == 0) {
    store_row<out_t>(src, plane_dst + y * out, tmp, out, sol, thr, mean, std_);
    return;
  }
  finalize_row(src, tmp, out, sol, thr, mean, std_);
  const int64_t n1 = out - 1;
  if (rot == 1) {
    for (int64_t x = 0; x < out; ++x) plane_dst[(n1 - x) * out + y] = static_cast<out_t>(tmp[x]);
  } else if (rot == 2) {
    out_t* d = plane_dst + (n1 - y) * out + n1;
    for (int64_t x = 0; x < out; ++x) d[-x] = static_cast<out_t>(tmp[x]);
  } else {
    for (int64_t x = 0; x < out; ++x) plane_dst[x * out + n1 - y] = static_cast<out_t>(tmp[x]);
  }
}

// A whole upright plane (out x out fp32, in the sample's buffer) stored rotated by rot = 1 or 3,
// in blocks of kRotRows rows: the block is finalised row by row into `tile` (kRotRows x out),
// then each of its columns becomes consecutive outputs of one destination row (fp32: 8 x 8
// blocks transposed in registers) instead of one store per destination line. The per-row
// store_row_rotated wrote every value of a rot 1 / 3 view to its own cache line: ~20% of the
// rotation task's CPU time.
constexpr int64_t kRotRows = 16;

// fp32 columns [x0, x0 + 8) of 8 finalised rows (tile + i * ld, i < 8), transposed in registers
// (three rounds of 8-lane shuffles) and stored as 8 runs of 8: for rot 1 column x goes to
// row n1 - x at columns y0.., for rot 3 to row x at columns n1 - y0 down (lanes reversed).
FASTSSL_SIMD_CLONES
void store_8x8_rotated(const float* tile, int64_t ld, int64_t x0, float* plane_dst, int64_t out,
                       int64_t y0, int64_t rot) {
  vf8 r[8];
  for (int i = 0; i < 8; ++i) __builtin_memcpy(&r[i], tile + i * ld + x0, sizeof(vf8));
  vf8 t[8], u[8], c[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int j = 0; j < 4; ++j) {
    c[j] = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    c[j + 4] = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  const int64_t n1 = out - 1;
  for (int j = 0; j < 8; ++j) {  // c[j][i] = row i, column x0 + j
    const int64_t x = x0 + j;
    if (rot == 1) {
      __builtin_memcpy(plane_dst + (n1 - x) * out + y0, &c[j], sizeof(vf8));
    } else {
      const vf8 rev = __builtin_shufflevector(c[j], c[j], 7, 6, 5, 4, 3, 2, 1, 0);
      __builtin_memcpy(plane_dst + x * out + n1 - y0 - 7, &rev, sizeof(vf8));
    }
  }
}

template <typename out_t>
void store_plane_rotated(const float* src, out_t* plane_dst, int64_t out, int64_t rot,
                         float* tile, bool sol, float thr, float mean, float std_) {
  const int64_t n1 = out - 1;
  for (int64_t y0 = 0; y0 < out; y0 += kRotRows) {
    const int64_t rows = std::min(kRotRows, out - y0);
    for (int64_t i = 0; i < rows; ++i) {
      finalize_row(src + (y0 + i) * out, tile + i * out, out, sol, thr, mean, std_);
    }
    int64_t i0 = 0, x0 = 0;
    if constexpr (std::is_same_v<out_t, float>) {
      // Whole 8 x 8 blocks in registers; the ragged right / bottom edges below, scalar.
      const int64_t full_rows = rows / 8 * 8, full_cols = out / 8 * 8;
      for (int64_t i = 0; i < full_rows; i += 8)
        for (int64_t x = 0; x < full_cols; x += 8)
          store_8x8_rotated(tile + i * out, out, x, plane_dst, out, y0 + i, rot);
      i0 = full_rows;
      x0 = full_cols;
    }
    // Scalar: rows [i0, rows) x every column, and rows [0, i0) x columns [x0, out).
    auto put = [&](int64_t i, int64_t x) {
      const out_t v = static_cast<out_t>(tile[i * out + x]);
      if (rot == 1) plane_dst[(n1 - x) * out + y0 + i] = v;  // (y, x) -> (n1 - x, y)
      else plane_dst[x * out + n1 - (y0 + i)] = v;           // rot 3: (y, x) -> (x, n1 - y)
    };
    for (int64_t x = 0; x < out; ++x) {
      for (int64_t i = (x < x0 ? i0 : 0); i < rows; ++i) put(i, x);
    }
  }
}

// Reflect (no edge repeat) index into [0, n), for |overshoot| < n.
static inline int64_t reflect(int64_t i, int64_t n) {
  if (i < 0) return -i;
  if (i >= n) return 2 * n - 2 - i;
  return i;
}

struct Sample {
  const void* data;  // [3, H, W] contiguous
  bool u8;
  int64_t H, W;
  int64_t top, left, ch, cw;
  bool flip, jitter, gray, blur, solarize;
  int64_t rot;  // 0..3: torch.rot90(view, rot)
  float factors[4];
  int64_t order[4];
  const float* taps;
};

// Bilinear source coordinates in float32, as reference.bilinear_coords.
void bilinear_coords(int64_t src, int64_t out, bool flip, int32_t* i0, int32_t* i1, float* w0,
                     float* w1) {
  const float scale = static_cast<float>(src) / static_cast<float>(out);
  for (int64_t x = 0; x < out; ++x) {
    const int64_t xo = flip ? out - 1 - x : x;
    float s = scale * (static_cast<float>(xo) + 0.5f) - 0.5f;
    s = s < 0.0f ? 0.0f : s;
    const int64_t a = static_cast<int64_t>(s);
    i0[x] = static_cast<int32_t>(a);
    i1[x] = static_cast<int32_t>(a + (a < src - 1 ? 1 : 0));
    w1[x] = s - static_cast<float>(a);
    w0[x] = 1.0f - w1[x];
  }
}

static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

struct Scratch {
  std::vector<float> img;      // 3 x out x out: the sample's image
  std::vector<float> hrows;    // 2 slots x 3 channels x out: horizontally interpolated rows
  std::vector<float> in_row;   // one crop row converted to fp32
  std::vector<int32_t> xi0, xi1, yi0, yi1;
  std::vector<float> xw0, xw1, yw0, yw1;
  std::vector<float> pad_row;  // reflect-padded row for the horizontal blur
  std::vector<float> acc;      // one output row of the vertical blur / the gray row
  std::vector<float> tmp;      // one normalised row before a bf16 / fp16 cast
  std::vector<float> rot_tile;  // kRotRows normalised rows (store_plane_rotated)
  std::vector<const float*> taps_rows;
  // Row buffers are rounded up to whole 16-lane vectors (+ one of slack after the image):
  // blur_1d reads and writes whole vectors; the lanes past the row end are never used.
  Scratch(int64_t out, int64_t k, int64_t max_w)
      : img(3 * out * out + kLanes), hrows(2 * 3 * out), in_row(max_w), xi0(out), xi1(out),
        yi0(out), yi1(out), xw0(out), xw1(out), yw0(out), yw1(out),
        pad_row(round_up(out, kLanes) + k + kLanes), acc(round_up(out, kLanes)),
        tmp(round_up(out, kLanes)), rot_tile(kRotRows * out), taps_rows(k) {}
};

template <typename out_t>
void augment_sample(const Sample& s, int64_t out, int64_t k, float thr, const float* mean,
                    const float* stdv, out_t* dst, Scratch& sc) {
  const int64_t plane = out * out;
  float* img = sc.img.data();
  bilinear_coords(s.cw, out, s.flip, sc.xi0.data(), sc.xi1.data(), sc.xw0.data(),
                  sc.xw1.data());
  bilinear_coords(s.ch, out, false, sc.yi0.data(), sc.yi1.data(), sc.yw0.data(),
                  sc.yw1.data());

  // The colour chain, split at contrast (which needs the image's mean first).
  int64_t pre[4], post[4];
  int64_t npre = 0, npost = 0;
  bool need_mean = false;
  if (s.jitter) {
    for (int j = 0; j < 4; ++j) {
      const int64_t op = s.order[j];
      const float f = s.factors[op];
      if (op == kHue && f == 0.0f) continue;  // the spec: a hue shift of 0 is skipped
      if (op == kContrast) need_mean = true;
      if (need_mean) post[npost++] = op; else pre[npre++] = op;
    }
  }
  // rot 1 / 3 without blur: the finished rows stay in the sample's buffer and the whole plane
  // is stored rotated at the end, in blocks (store_plane_rotated).
  const bool plane_store = !s.blur && (s.rot == 1 || s.rot == 3);
  auto store_planes = [&]() {
    for (int c = 0; c < 3; ++c)
      store_plane_rotated<out_t>(img + c * plane, dst + c * plane, out, s.rot,
                                 sc.rot_tile.data(), s.solarize, thr, mean[c], stdv[c]);
  };

  auto apply_ops = [&](const int64_t* ops, int64_t nops, float* r, float* g, float* b,
                       float contrast_m1) {
    for (int64_t j = 0; j < nops; ++j) {
      const float f = s.factors[ops[j]];
      switch (ops[j]) {
        case kBrightness: row_scale(r, g, b, f, out); break;
        case kContrast: row_contrast(r, g, b, f, contrast_m1, out); break;
        case kSaturation: row_saturation(r, g, b, f, out); break;
        default: row_hue(r, g, b, f, out); break;
      }
    }
  };
  // The end of the colour part of the chain for one row: gray, then blur-h or the store.
  auto finish_row = [&](int64_t y, float* r, float* g, float* b) {
    if (s.gray) row_gray(r, g, b, out);
    float* ch[3] = {r, g, b};
    if (s.blur) {
      const int64_t pad = k / 2;
      for (int c = 0; c < 3; ++c) {
        float* pr = sc.pad_row.data();
        std::copy(ch[c], ch[c] + out, pr + pad);
        for (int64_t j = 0; j < pad; ++j) {
          pr[pad - 1 - j] = ch[c][reflect(-1 - j, out)];
          pr[pad + out + j] = ch[c][reflect(out + j, out)];
        }
        blur_1d(&pr, 1, s.taps, k, sc.acc.data(), out);
        std::copy(sc.acc.data(), sc.acc.data() + out, ch[c]);
      }
    } else if (!plane_store) {
      for (int c = 0; c < 3; ++c)
        store_row_rotated<out_t>(ch[c], dst + c * plane, y, out, s.rot, sc.tmp.data(),
                                 s.solarize, thr, mean[c], stdv[c]);
    }
  };

  // Pass 1: crop + resize (+ colour ops before contrast, gray sum / everything).
  const int64_t in_plane = s.H * s.W;
  int64_t slot_row[2] = {-1, -1};
  double gray_sum = 0.0;
  float* hr = sc.hrows.data();
  for (int64_t y = 0; y < out; ++y) {
    const int64_t rows[2] = {sc.yi0[y], sc.yi1[y]};
    for (int64_t r : rows) {
      const int64_t slot = r & 1;
      if (slot_row[slot] == r) continue;
      slot_row[slot] = r;
      const int64_t src_off = (s.top + r) * s.W + s.left;
      for (int c = 0; c < 3; ++c) {
        const float* src;
        if (s.u8) {
          u8_to_f32(static_cast<const uint8_t*>(s.data) + c * in_plane + src_off,
                    sc.in_row.data(), s.cw);
          src = sc.in_row.data();
        } else {
          src = static_cast<const float*>(s.data) + c * in_plane + src_off;
        }
        bilinear_h(src, sc.xi0.data(), sc.xi1.data(), sc.xw0.data(), sc.xw1.data(),
                   hr + (slot * 3 + c) * out, out);
      }
    }
    float* row[3];
    for (int c = 0; c < 3; ++c) {
      row[c] = img + c * plane + y * out;
      bilinear_v(hr + ((rows[0] & 1) * 3 + c) * out, hr + ((rows[1] & 1) * 3 + c) * out,
                 sc.yw0[y], sc.yw1[y], row[c], out);
    }
    apply_ops(pre, npre, row[0], row[1], row[2], 0.0f);
    if (need_mean) {
      gray_sum += row_gray_sum(row[0], row[1], row[2], out);
    } else {
      finish_row(y, row[0], row[1], row[2]);
    }
  }

  // Pass 2 (only with contrast): contrast and the ops after it (+ gray, blur-h or the store).
  // Without contrast or blur, pass 1 was the only pass.
  if (need_mean) {
    const float mean_gray = static_cast<float>(gray_sum / static_cast<double>(plane));
    const float m1 = mean_gray * (1.0f - s.factors[kContrast]);
    for (int64_t y = 0; y < out; ++y) {
      float* r = img + y * out;
      apply_ops(post, npost, r, r + plane, r + 2 * plane, m1);
      finish_row(y, r, r + plane, r + 2 * plane);
    }
  }
  if (!s.blur) {
    if (plane_store) store_planes();
    return;
  }

  // Pass 3: vertical blur -> solarize -> normalize -> cast, straight into the output.
  const int64_t pad = k / 2;
  for (int c = 0; c < 3; ++c) {
    const float* p = img + c * plane;
    for (int64_t y = 0; y < out; ++y) {
      for (int64_t j = 0; j < k; ++j) sc.taps_rows[j] = p + reflect(y + j - pad, out) * out;
      blur_1d(sc.taps_rows.data(), 0, s.taps, k, sc.acc.data(), out);
      store_row_rotated<out_t>(sc.acc.data(), dst + c * plane, y, out, s.rot, sc.tmp.data(),
                               s.solarize, thr, mean[c], stdv[c]);
    }
  }
}

at::Tensor ssl_augment_cpu(at::TensorList images, const at::Tensor& crop,
                           const at::Tensor& flags, const at::Tensor& factors,
                           const at::Tensor& order, const at::Tensor& taps,
                           double solarize_threshold, const at::Tensor& mean,
                           const at::Tensor& stdv, int64_t out_size, at::ScalarType out_dtype,
                           const std::optional<at::Tensor>& rot) {
  const int64_t B = static_cast<int64_t>(images.size());
  TORCH_CHECK(B >= 1, "ssl_augment: empty batch");
  TORCH_CHECK(out_size >= 1, "ssl_augment: out_size must be >= 1, got ", out_size);
  TORCH_CHECK(crop.dtype() == at::kLong && crop.sizes() == at::IntArrayRef({B, 4}),
              "ssl_augment: crop must be int64 (B, 4)");
  TORCH_CHECK(flags.dtype() == at::kBool && flags.sizes() == at::IntArrayRef({B, kFlags}),
              "ssl_augment: flags must be bool (B, 5)");
  TORCH_CHECK(factors.dtype() == at::kFloat && factors.sizes() == at::IntArrayRef({B, 4}),
              "ssl_augment: factors must be float32 (B, 4)");
  TORCH_CHECK(order.dtype() == at::kLong && order.sizes() == at::IntArrayRef({B, 4}),
              "ssl_augment: order must be int64 (B, 4)");
  TORCH_CHECK(taps.dtype() == at::kFloat && taps.dim() == 2 && taps.size(0) == B &&
                  taps.size(1) % 2 == 1,
              "ssl_augment: taps must be float32 (B, K) with K odd");
  TORCH_CHECK(mean.dtype() == at::kFloat && mean.numel() == 3 && stdv.dtype() == at::kFloat &&
                  stdv.numel() == 3,
              "ssl_augment: mean and std must be float32 with 3 values");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "ssl_augment: out_dtype must be float32, bfloat16 or float16");
  const bool has_rot = rot.has_value() && rot->defined();
  TORCH_CHECK(!has_rot || (rot->dtype() == at::kLong && rot->sizes() == at::IntArrayRef({B}) &&
                           rot->device().is_cpu()),
              "ssl_augment: rot must be an int64 (B,) CPU tensor");
  const at::Tensor rot_c = has_rot ? rot->contiguous() : at::Tensor();
  const int64_t k = taps.size(1);
  TORCH_CHECK(k / 2 < out_size || k == 1,
              "ssl_augment: blur kernel of ", k, " taps needs out_size > ", k / 2,
              " for reflect padding");

  auto crop_c = crop.contiguous();
  auto flags_c = flags.contiguous();
  auto factors_c = factors.contiguous();
  auto order_c = order.contiguous();
  auto taps_c = taps.contiguous();
  auto mean_c = mean.contiguous();
  auto std_c = stdv.contiguous();
  std::vector<at::Tensor> imgs;
  imgs.reserve(B);
  std::vector<Sample> samples(B);
  int64_t max_w = 1;
  for (int64_t i = 0; i < B; ++i) {
    const at::Tensor& im = images[i];
    TORCH_CHECK(im.device().is_cpu(), "ssl_augment: images must be CPU tensors");
    TORCH_CHECK(im.dim() == 3 && im.size(0) == 3, "ssl_augment: images[", i,
                "] must be [3, H, W], got ", im.sizes());
    TORCH_CHECK(im.scalar_type() == at::kByte || im.scalar_type() == at::kFloat,
                "ssl_augment: images must be uint8 or float32, got ", im.scalar_type());
    imgs.push_back(im.contiguous());
    const int64_t* cb = crop_c.data_ptr<int64_t>() + 4 * i;
    const bool* fl = flags_c.data_ptr<bool>() + kFlags * i;
    Sample& s = samples[i];
    s.data = imgs.back().data_ptr();
    s.u8 = im.scalar_type() == at::kByte;
    s.H = im.size(1);
    s.W = im.size(2);
    s.top = cb[0];
    s.left = cb[1];
    s.ch = cb[2];
    s.cw = cb[3];
    TORCH_CHECK(s.top >= 0 && s.left >= 0 && s.ch >= 1 && s.cw >= 1 && s.top + s.ch <= s.H &&
                    s.left + s.cw <= s.W,
                "ssl_augment: crop of sample ", i, " does not fit its ", s.H, "x", s.W,
                " image");
    s.flip = fl[kFlip];
    s.jitter = fl[kJitter];
    s.gray = fl[kGray];
    s.blur = fl[kBlur] && k > 1;
    s.solarize = fl[kSolarize];
    s.rot = has_rot ? rot_c.data_ptr<int64_t>()[i] : 0;
    TORCH_CHECK(s.rot >= 0 && s.rot < 4, "ssl_augment: rot must hold 0..3, got ", s.rot);
    for (int j = 0; j < 4; ++j) {
      s.factors[j] = factors_c.data_ptr<float>()[4 * i + j];
      s.order[j] = order_c.data_ptr<int64_t>()[4 * i + j];
      TORCH_CHECK(s.order[j] >= 0 && s.order[j] < 4, "ssl_augment: order must hold 0..3");
    }
    s.taps = taps_c.data_ptr<float>() + k * i;
    max_w = std::max(max_w, s.cw);
  }
  for (const auto& im : imgs)
    TORCH_CHECK(im.scalar_type() == imgs[0].scalar_type(),
                "ssl_augment: all images must have the same dtype");

  at::Tensor out = at::empty({B, 3, out_size, out_size},
                             at::TensorOptions().dtype(out_dtype).device(at::kCPU));
  advise_huge_pages(out);
  const float thr = static_cast<float>(solarize_threshold);
  const float* mp = mean_c.data_ptr<float>();
  const float* sp = std_c.data_ptr<float>();
  const int64_t per_sample = 3 * out_size * out_size;
  AT_DISPATCH_V2(out_dtype, "ssl_augment", AT_WRAP([&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    // Samples are handed out one at a time from a shared counter, not in fixed chunks: their
    // costs differ (blur, jitter are per-sample) and on a shared machine a descheduled thread
    // would otherwise hold up the whole batch. Each sample's output depends only on itself,
    // so the result does not depend on which thread ran it.
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), B);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      Scratch sc(out_size, k, max_w);
      for (int64_t i = next.fetch_add(1); i < B; i = next.fetch_add(1))
        augment_sample<scalar_t>(samples[i], out_size, k, thr, mp, sp, dst + i * per_sample,
                                 sc);
    });
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return out;
}

}  // namespace
}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("ssl_augment", &fastssl::ssl_augment_cpu);
}
