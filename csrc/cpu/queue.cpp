// MoCo key queue, CPU kernel: writes B keys into the ring buffer at the write pointer and
// advances it, in place. The pointer is a 0-dim int64 tensor; on the CPU reading it is a
// plain load (no device sync), so this is one op with no Python in between. The index math
// is shared with the CUDA kernel (csrc/common/moco_math.h): key i goes to slot
// (ptr + i) mod size, only the newest `size` keys of a batch are written, each once.
//
// Traffic: read and write min(B, size) * dim elements: a memcpy per key row, rows split
// across threads.
#include <torch/library.h>

#include <cstring>

#include "../common/moco_math.h"
#include "common.h"

namespace fastssl {
namespace {

void check_enqueue_args(const at::Tensor& buffer, const at::Tensor& ptr,
                        const at::Tensor& counter, const at::Tensor& keys) {
  TORCH_CHECK(buffer.dim() == 2 && buffer.is_contiguous(),
              "moco_enqueue_: buffer must be a contiguous (size, dim) tensor, got shape ",
              buffer.sizes());
  TORCH_CHECK(buffer.size(0) >= 1, "moco_enqueue_: the queue needs size >= 1");
  TORCH_CHECK(ptr.dim() == 0 && ptr.scalar_type() == at::kLong,
              "moco_enqueue_: ptr must be a 0-dim int64 tensor, got ", ptr.scalar_type(),
              " of shape ", ptr.sizes());
  TORCH_CHECK(counter.numel() == 1 && counter.scalar_type() == at::kInt,
              "moco_enqueue_: counter must be a one-element int32 tensor");
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == buffer.size(1),
              "moco_enqueue_: keys must be (B, ", buffer.size(1), "), got ", keys.sizes());
  TORCH_CHECK(keys.scalar_type() == buffer.scalar_type(), "moco_enqueue_: keys are ",
              keys.scalar_type(), " but the queue is ", buffer.scalar_type());
  TORCH_CHECK(buffer.device() == ptr.device() && buffer.device() == keys.device() &&
                  buffer.device() == counter.device(),
              "moco_enqueue_: buffer, ptr, counter and keys must be on one device");
}

void moco_enqueue_cpu(at::Tensor buffer, at::Tensor ptr, at::Tensor counter,
                      const at::Tensor& keys) {
  check_enqueue_args(buffer, ptr, counter, keys);
  const int64_t size = buffer.size(0), dim = buffer.size(1), batch = keys.size(0);
  int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t p0 = *p;
  TORCH_CHECK(p0 >= 0 && p0 < size, "moco_enqueue_: ptr ", p0, " is outside [0, ", size, ")");
  if (batch == 0) return;
  const at::Tensor k = keys.contiguous();
  const int64_t row_bytes = dim * static_cast<int64_t>(buffer.element_size());
  char* dst = static_cast<char*>(buffer.data_ptr());
  const char* src = static_cast<const char*>(k.const_data_ptr());
  const int64_t first = moco::enqueue_first_row(batch, size);
  // A second thread joins only above 256 KiB of keys: a 256 x 128 fp32 batch (128 KiB) is a
  // ~10 us memcpy, less than waking a pool thread on a busy machine (measured: a 64 KiB
  // grain made the 256-key enqueue 100x slower under load; 1 MiB left 1024 keys (512 KiB)
  // 35% slower than torch's 2-thread copy_).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(first, batch, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      std::memcpy(dst + moco::enqueue_slot(p0, r, size) * row_bytes, src + r * row_bytes,
                  row_bytes);
  });
  *p = moco::enqueue_next_ptr(p0, batch, size);
}

}  // namespace
}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) { m.impl("moco_enqueue_", &fastssl::moco_enqueue_cpu); }
