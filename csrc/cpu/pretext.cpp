// MAE / SimMIM random patch masking on the CPU (fastssl.mae_mask).
//
// Spec: fastssl/reference.py, "Pretext tasks: MAE / SimMIM masking". Row b's permutation is a
// Fisher-Yates (Durstenfeld) shuffle driven by a counter-based hash of (seed, b, step): no
// stateful RNG, so the result is the reference's and the Triton kernel's bit for bit, and does
// not depend on the thread count (rows are independent work units).
//
// Cost: O(L) per row (L - 1 swaps in an L-entry array that stays in L1, plus the three
// stores), against O(L log L) for MAE's argsort of uniform noise (twice: shuffle and restore).
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> mae_mask_cpu(const at::Tensor& seed,
                                                            int64_t batch, int64_t num_patches,
                                                            int64_t num_keep) {
  TORCH_CHECK(seed.device().is_cpu() && seed.dtype() == at::kLong && seed.numel() == 2,
              "mae_mask: seed must be an int64 CPU tensor of 2 values");
  TORCH_CHECK(batch >= 1, "mae_mask: batch must be >= 1, got ", batch);
  TORCH_CHECK(num_patches >= 1 && num_patches < (int64_t{1} << 31),
              "mae_mask: num_patches must be in [1, 2^31), got ", num_patches);
  TORCH_CHECK(num_keep >= 0 && num_keep <= num_patches, "mae_mask: num_keep must be in [0, ",
              num_patches, "], got ", num_keep);
  const at::Tensor seed_c = seed.contiguous();
  const uint32_t seed_lo = static_cast<uint32_t>(seed_c.data_ptr<int64_t>()[0]);
  const uint32_t seed_hi = static_cast<uint32_t>(seed_c.data_ptr<int64_t>()[1]);
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
    std::vector<int32_t> perm(L);
    for (int64_t b = begin; b < end; ++b) {
      const uint32_t key = fmix32(static_cast<uint32_t>(b) * kRowMul + seed_hi) ^ seed_lo;
      for (int64_t i = 0; i < L; ++i) perm[i] = static_cast<int32_t>(i);
      for (int64_t i = L - 1; i > 0; --i) {
        const uint32_t u = fmix32(key + static_cast<uint32_t>(i) * kStepMul);
        const int64_t j = static_cast<int64_t>((static_cast<uint64_t>(u) *
                                                static_cast<uint64_t>(i + 1)) >> 32);
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

}  // namespace
}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("mae_mask", &fastssl::mae_mask_cpu);
}
