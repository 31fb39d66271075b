// Pretext tasks on the CPU: MAE / SimMIM random patch masking (fastssl.mae_mask) and the
// denoising task's noise (pretext_noise, used by PretextAugment(task="denoising")).
//
// Both draw their randomness from a counter-based hash (MurmurHash3's fmix32 of a per-sample
// key plus a counter): no stateful RNG, so every value is a pure function of (seed, sample,
// counter): C++, Triton and the reference agree, whatever the thread count.
//
// mae_mask. Spec: fastssl/reference.py, "Pretext tasks: MAE / SimMIM masking". Row b's
// permutation is a Fisher-Yates (Durstenfeld) shuffle driven by a counter-based hash of (seed, b, step): no
// stateful RNG, so the result is the reference's and the Triton kernel's bit for bit, and does
// not depend on the thread count (rows are independent work units).
//
// Cost: O(L) per row (L - 1 swaps in an L-entry array that stays in L1, plus the three
// stores), against O(L log L) for MAE's argsort of uniform noise (twice: shuffle and restore).
#include <torch/library.h>

#include <ATen/Dispatch_v2.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "common.h"

namespace fastssl {
namespace {

constexpr uint32_t kRowMul = 0x9E3779B9u;
constexpr uint32_t kStepMul = 0x85EBCA6Bu;

static inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The two hashes both ops draw from (reference: mae_row_keys, counter_hash): sample b's key,
// and value number c of a sample.
static inline uint32_t sample_key(uint32_t b, uint32_t seed_lo, uint32_t seed_hi) {
  return fmix32(b * kRowMul + seed_hi) ^ seed_lo;
}
static inline uint32_t counter_hash(uint32_t key, uint32_t c) {
  return fmix32(key + c * kStepMul);
}

// The low 32 bits of the two int64 seed values (lo, hi).
std::pair<uint32_t, uint32_t> read_seed(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.device().is_cpu() && seed.dtype() == at::kLong && seed.numel() == 2, op,
              ": seed must be an int64 CPU tensor of 2 values");
  const at::Tensor seed_c = seed.contiguous();
  return {static_cast<uint32_t>(seed_c.data_ptr<int64_t>()[0]),
          static_cast<uint32_t>(seed_c.data_ptr<int64_t>()[1])};
}

// target[i] = (counter_hash(key, i) * (i + 1)) >> 32, the Fisher-Yates swap partner of step
// i (in 0..i), for 1 <= i < L.
FASTSSL_SIMD_CLONES
void shuffle_targets(uint32_t key, int64_t L, int32_t* __restrict target) {
  for (int64_t i = 1; i < L; ++i) {
    const uint32_t u = counter_hash(key, static_cast<uint32_t>(i));
    target[i] = static_cast<int32_t>((static_cast<uint64_t>(u) *
                                      static_cast<uint64_t>(i + 1)) >> 32);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mae_mask_cpu(const at::Tensor& seed,
                                                            int64_t batch, int64_t num_patches,
                                                            int64_t num_keep) {
  const auto [seed_lo, seed_hi] = read_seed(seed, "mae_mask");
  TORCH_CHECK(batch >= 1, "mae_mask: batch must be >= 1, got ", batch);
  TORCH_CHECK(num_patches >= 1 && num_patches < (int64_t{1} << 31),
              "mae_mask: num_patches must be in [1, 2^31), got ", num_patches);
  TORCH_CHECK(num_keep >= 0 && num_keep <= num_patches, "mae_mask: num_keep must be in [0, ",
              num_patches, "], got ", num_keep);
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor mask = at::empty({batch, num_patches}, at::TensorOptions().dtype(at::kBool));
  at::Tensor ids_keep = at::empty({batch, num_keep}, i64);
  at::Tensor ids_restore = at::empty({batch, num_patches}, i64);
  bool* mp = mask.data_ptr<bool>();
  int64_t* kp = ids_keep.data_ptr<int64_t>();
  int64_t* rp = ids_restore.data_ptr<int64_t>();
  const int64_t L = num_patches;
  // A row is ~1 us of work at L = 196: threads only pay off for ~64k swaps per task (a
  // parallel region's wake-up and barrier cost more than a whole 256 x 196 batch: measured
  // 19 ms on 2 threads of a loaded machine against 0.95 ms on one). Rows are independent,
  // so the result does not depend on the split.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / num_patches);
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> perm(L), target(L);
    for (int64_t b = begin; b < end; ++b) {
      const uint32_t key = sample_key(static_cast<uint32_t>(b), seed_lo, seed_hi);
      for (int64_t i = 0; i < L; ++i) perm[i] = static_cast<int32_t>(i);
      // The swap targets depend on the step only, not on the permutation: hashed in one
      // vectorised pass, then the swaps (the serial part) are loads and stores in L1.
      shuffle_targets(key, L, target.data());
      for (int64_t i = L - 1; i > 0; --i) {
        const int64_t j = target[i];
        const int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
      }
      int64_t* keep_row = kp + b * num_keep;
      int64_t* restore_row = rp + b * L;
      bool* mask_row = mp + b * L;
      for (int64_t i = 0; i < num_keep; ++i) keep_row[i] = perm[i];
      for (int64_t i = 0; i < L; ++i) {
        restore_row[perm[i]] = i;
        mask_row[perm[i]] = i >= num_keep;
      }
    }
  });
  return {mask, ids_keep, ids_restore};
}

// ---- denoising noise -------------------------------------------------------------------------
//
// Spec: fastssl/reference.py, "Pretext tasks: denoising noise" (pretext_noise,
// box_muller_pairs). Gaussian: pair j of sample b is a Box-Muller pair from the hashes of
// counters 2j and 2j + 1; z0 goes to position j of the sample's flattened C*H*W values, z1 to
// j + ceil(n / 2). Masking: pixel p is dropped in all channels iff its hash's 24-bit uniform is
// below the sample's level. The logarithm, sine and cosine are the reference's float32
// polynomials, operation for operation (-ffp-contract=off: no fused multiply-adds), so the
// values are the reference's bit for bit. The loops are branch-free (selects, bit casts) so
// that GCC vectorises them in every FASTSSL_SIMD_CLONES clone: a pair costs ~60 vector-lane
// operations, a few ns per value, against ~10 ns per value for torch.randn of the batch
// (which the op replaces: it was 70% of the denoising view's time).
//
// Work units: (sample, block of kNoiseBlock pairs / pixels); each unit writes only its own
// outputs, so the result does not depend on the split.

constexpr int64_t kNoiseBlock = 2048;
constexpr float kSqrt2 = 1.4142135381698608f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -0.00021219444170128554f;
constexpr float kHalfPi = 1.5707963705062866f;
constexpr float kLogC3 = 0.3333333432674408f, kLogC5 = 0.20000000298023224f,
                kLogC7 = 0.1428571492433548f, kLogC9 = 0.1111111119389534f,
                kLogC11 = 0.09090909361839294f;
constexpr float kSinC3 = -0.1666666716337204f, kSinC5 = 0.008333333767950535f,
                kSinC7 = -0.00019841270113829523f, kSinC9 = 2.7557318844628753e-06f,
                kSinC11 = -2.5052107943679403e-08f, kSinC13 = 1.6059044372074283e-10f;
constexpr float kCosC2 = -0.5f, kCosC4 = 0.0416666679084301f,
                kCosC6 = -0.0013888889225199819f, kCosC8 = 2.4801587642286904e-05f,
                kCosC10 = -2.755731998149713e-07f, kCosC12 = 2.0876755879584152e-09f,
                kCosC14 = -1.147074536050896e-11f;
// 24-bit integer (< 2^24 + 1) -> float: exact; through int32 so that it vectorises.
static inline float u24_to_f32(uint32_t v) {
  return static_cast<float>(static_cast<int32_t>(v));
}

// z0[i], z1[i] = the Box-Muller pair j0 + i of the sample with key `key`.
FASTSSL_SIMD_CLONES
void box_muller_block(uint32_t key, uint32_t j0, int64_t count, float* __restrict z0,
                      float* __restrict z1) {
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t c = 2u * (j0 + static_cast<uint32_t>(i));
    const uint32_t h1 = counter_hash(key, c);
    const uint32_t h2 = counter_hash(key, c + 1u);
    // ln u1, u1 = ((h1 >> 8) + 1) 2^-24 in (0, 1]: u1 = m 2^e with m in [sqrt(2)/2, sqrt(2)).
    const float u1 = u24_to_f32((h1 >> 8) + 1u) * 0x1p-24f;
    const uint32_t bits = std::bit_cast<uint32_t>(u1);
    const int32_t e0 = static_cast<int32_t>((bits >> 23) & 0xFFu) - 127;
    const float m0 = std::bit_cast<float>((bits & 0x7FFFFFu) | 0x3F800000u);
    const bool big = m0 > kSqrt2;
    const float m = select(big, m0 * 0.5f, m0);
    const float e = static_cast<float>(e0 + static_cast<int32_t>(big));
    const float s = (m - 1.0f) / (m + 1.0f);
    const float s2 = s * s;
    float p = s2 * kLogC11 + kLogC9;
    p = p * s2 + kLogC7;
    p = p * s2 + kLogC5;
    p = p * s2 + kLogC3;
    p = p * s2;
    const float ln_m = (s + s * p) * 2.0f;
    const float ln_u = e * kLn2Hi + (ln_m + e * kLn2Lo);
    const float r = __builtin_sqrtf(ln_u * -2.0f);
    // psi uniform in (0, pi/2); the two sign bits pick the quadrant.
    const float t = (u24_to_f32((h2 >> 8) & 0x3FFFFFu) + 0.5f) * 0x1p-22f;
    const float psi = t * kHalfPi;
    const float q = psi * psi;
    float ps = q * kSinC13 + kSinC11;
    ps = ps * q + kSinC9;
    ps = ps * q + kSinC7;
    ps = ps * q + kSinC5;
    ps = ps * q + kSinC3;
    ps = ps * q;
    const float sin_psi = psi + psi * ps;
    float pc = q * kCosC14 + kCosC12;
    pc = pc * q + kCosC10;
    pc = pc * q + kCosC8;
    pc = pc * q + kCosC6;
    pc = pc * q + kCosC4;
    pc = pc * q + kCosC2;
    pc = pc * q;
    const float cos_psi = pc + 1.0f;
    const float a = r * cos_psi, b = r * sin_psi;
    // Negation = flipping the sign bit (what -x does), from bits 31 and 30 of h2.
    z0[i] = std::bit_cast<float>(std::bit_cast<uint32_t>(a) ^ (h2 & 0x80000000u));
    z1[i] = std::bit_cast<float>(std::bit_cast<uint32_t>(b) ^ ((h2 << 1) & 0x80000000u));
  }
}

// out[i] = cast(float(x[i]) + a * z[i]) for i < n: fp32 product, then sum, one rounding each.
// (target_clones does not take templates: the fp32 loop is the cloned one; bf16 / fp16 views
// are converted in a scalar loop.)
FASTSSL_SIMD_CLONES
void add_scaled_noise_f32(const float* __restrict x, const float* __restrict z, float a,
                          float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] + a * z[i];
}

template <typename scalar_t>
void add_scaled_noise(const scalar_t* x, const float* z, float a, scalar_t* out, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    add_scaled_noise_f32(x, z, a, out, n);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<scalar_t>(static_cast<float>(x[i]) + a * z[i]);
    }
  }
}

// Positions [start, start + len) of one sample get z[0..len), split at channel boundaries
// (each channel has its own amount).
template <typename scalar_t>
void add_noise_range(const scalar_t* x, scalar_t* out, const float* z, const float* amount,
                     int64_t start, int64_t len, int64_t plane) {
  while (len > 0) {
    const int64_t c = start / plane;
    const int64_t take = std::min(len, (c + 1) * plane - start);
    add_scaled_noise<scalar_t>(x + start, z, amount[c], out + start, take);
    start += take;
    z += take;
    len -= take;
  }
}

// drop[i] = 1 where pixel p0 + i is dropped (its 24-bit uniform < level), else 0.
FASTSSL_SIMD_CLONES
void drop_block(uint32_t key, uint32_t p0, int64_t count, float level,
                uint8_t* __restrict drop) {
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t h = counter_hash(key, p0 + static_cast<uint32_t>(i));
    drop[i] = static_cast<uint8_t>(u24_to_f32(h >> 8) * 0x1p-24f < level);
  }
}

// out[i] = drop[i] ? fill : x[i] on the values' bit patterns, as a mask blend (a branch per
// value mispredicts on random drops: 2x slower than the whole Gaussian path).
FASTSSL_SIMD_CLONES
void blend_u32(const uint32_t* __restrict x, const uint8_t* __restrict drop, uint32_t fill,
               uint32_t* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t m = 0u - static_cast<uint32_t>(drop[i]);
    out[i] = (x[i] & ~m) | (fill & m);
  }
}

FASTSSL_SIMD_CLONES
void blend_u16(const uint16_t* __restrict x, const uint8_t* __restrict drop, uint16_t fill,
               uint16_t* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t m = static_cast<uint16_t>(0u - static_cast<uint32_t>(drop[i]));
    out[i] = static_cast<uint16_t>((x[i] & ~m) | (fill & m));
  }
}

template <typename scalar_t>
void apply_drop(const scalar_t* x, const uint8_t* drop, scalar_t fill, scalar_t* out,
                int64_t n) {
  if constexpr (sizeof(scalar_t) == 4) {
    blend_u32(reinterpret_cast<const uint32_t*>(x), drop, std::bit_cast<uint32_t>(fill),
              reinterpret_cast<uint32_t*>(out), n);
  } else {
    static_assert(sizeof(scalar_t) == 2);
    blend_u16(reinterpret_cast<const uint16_t*>(x), drop, std::bit_cast<uint16_t>(fill),
              reinterpret_cast<uint16_t*>(out), n);
  }
}

at::Tensor pretext_noise_cpu(const at::Tensor& clean, const at::Tensor& amount,
                             const at::Tensor& seed, bool masking, double fill) {
  TORCH_CHECK(clean.dim() == 4, "pretext_noise: clean must be [B, C, H, W], got ",
              clean.sizes());
  TORCH_CHECK(clean.scalar_type() == at::kFloat || clean.scalar_type() == at::kBFloat16 ||
                  clean.scalar_type() == at::kHalf,
              "pretext_noise: clean must be float32, bfloat16 or float16, got ",
              clean.scalar_type());
  const int64_t B = clean.size(0), C = clean.size(1), plane = clean.size(2) * clean.size(3);
  const int64_t n = C * plane;
  TORCH_CHECK(n < (int64_t{1} << 31), "pretext_noise: C*H*W must be < 2^31, got ", n);
  TORCH_CHECK(amount.dtype() == at::kFloat && amount.dim() == 2 && amount.size(0) == B &&
                  amount.size(1) == (masking ? 1 : C),
              "pretext_noise: amount must be float32 [B, ", masking ? "1" : "C", "], got ",
              amount.scalar_type(), " ", amount.sizes());
  const auto [seed_lo, seed_hi] = read_seed(seed, "pretext_noise");
  const at::Tensor x = clean.contiguous();
  const at::Tensor amt = amount.contiguous();
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  advise_huge_pages(out);
  const float* ap = amt.data_ptr<float>();
  const int64_t half = (n + 1) / 2;
  const int64_t per_sample = ((masking ? plane : half) + kNoiseBlock - 1) / kNoiseBlock;
  AT_DISPATCH_V2(x.scalar_type(), "pretext_noise", AT_WRAP([&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t fill_v = static_cast<scalar_t>(static_cast<float>(fill));
    at::parallel_for(0, B * per_sample, 4, [&](int64_t begin, int64_t end) {
      alignas(64) float z0[kNoiseBlock], z1[kNoiseBlock];
      alignas(64) uint8_t drop[kNoiseBlock];
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / per_sample, blk = u % per_sample;
        const uint32_t key = sample_key(static_cast<uint32_t>(b), seed_lo, seed_hi);
        const scalar_t* xs = xp + b * n;
        scalar_t* os = op + b * n;
        const int64_t j0 = blk * kNoiseBlock;
        if (masking) {
          const int64_t cnt = std::min(kNoiseBlock, plane - j0);
          drop_block(key, static_cast<uint32_t>(j0), cnt, ap[b], drop);
          for (int64_t c = 0; c < C; ++c) {
            apply_drop<scalar_t>(xs + c * plane + j0, drop, fill_v, os + c * plane + j0, cnt);
          }
        } else {
          const int64_t cnt = std::min(kNoiseBlock, half - j0);
          box_muller_block(key, static_cast<uint32_t>(j0), cnt, z0, z1);
          add_noise_range<scalar_t>(xs, os, z0, ap + b * C, j0, cnt, plane);
          const int64_t len1 = std::min(cnt, n - (half + j0));  // the last pair may have no z1
          if (len1 > 0) add_noise_range<scalar_t>(xs, os, z1, ap + b * C, half + j0, len1, plane);
        }
      }
    });
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return out;
}

}  // namespace
}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("mae_mask", &fastssl::mae_mask_cpu);
  m.impl("pretext_noise", &fastssl::pretext_noise_cpu);
}
