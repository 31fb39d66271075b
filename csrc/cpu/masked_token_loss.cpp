// Masked-token prediction head (BERT MLM), streamed over vocabulary tiles
// (fastssl/ops/masked_token_loss.py has the op's contract):
//
//   s_iv = h_i . w_v + b_v,   loss_i = LSE_v s_iv - s_i,y_i   for the P rows with y_i != ignore,
//   ds_iv = g_i (exp(s_iv - lse_i) - [v = y_i]),  dH = ds W,  dW = ds^T H,  db = colsum(ds).
//
// The P valid rows are gathered first into an fp32 matrix A (P x H). masked_token_loss_sum (the
// "sum" / "mean" reductions under autograd) does three P x V x H GEMMs in its one pass (its
// comment below has the blocking); the fwd / bwd pair (reduction "none") does four (forward:
// s; backward: the recomputed s, then dH and dW from it; eager PyTorch does three, plus passes
// over [P, V] buffers), done with gemm_rm on cache-sized tiles, each followed by its epilogue
// (online LSE, or the softmax gradient) while the tile is in cache. In the fwd / bwd pair the
// logits tile (rows x vocabulary columns) is the only buffer that grows with V; the [P, V]
// logits are never formed (an fp32 copy is 500 MB at P = 4,096, V = 30,522).
//
// Work units do not depend on the thread count, and every sum runs in a fixed order:
//  * forward: a unit is a block of kFwdRows rows, which walks all vocabulary tiles in order
//    with a running (max, sum) per row;
//  * backward: a unit is one of NS vocabulary splits (NS from the shape only); it owns its
//    rows of dW and db, and adds into its own partial dH (P x H); the NS partials are added in
//    split order at the end. Within a unit the vocabulary tiles go outer (each W tile is read
//    once, then reused by every row block) and the row blocks inner, in order.
#include <torch/library.h>

#include "common.h"

namespace fastssl {
namespace {

constexpr int64_t kFwdRows = 256, kFwdCols = 256;  // forward tile: 256 KB of fp32 logits
constexpr int64_t kBwdRows = 128, kBwdCols = 512;  // backward tile: 256 KB
// Partial dH buffers of the backward: NS x P x H floats at most this many (64 MB), NS a power
// of two <= 8 (2, 4 or 8 units balance 2, 4 or 8 threads).
constexpr int64_t kPartialFloats = int64_t{16} << 20;
// masked_token_loss_sum: vocabulary tile width, and the rows-by-whole-vocabulary logits block:
// at most kLogitsFloats floats (32 MB), 16 to 256 rows.
// 256 x 512 tiles: the sum op took 2.85 torch.mm times at BERT-base, 256 x 256 tiles 3.18.
constexpr int64_t kGradCols = 512;
constexpr int64_t kMaxGradRows = 256, kMinGradRows = 16;
constexpr int64_t kLogitsFloats = int64_t{8} << 20;

FASTSSL_SIMD_CLONES
void add_bias_rows(float* __restrict s, int64_t rows, int64_t cols, const float* __restrict b) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * cols;
    for (int64_t j = 0; j < cols; ++j) row[j] += b[j];
  }
}

// s <- g_i exp(s - lse_i) in place (the target's -g_i is subtracted by the caller, in fp32).
FASTSSL_SIMD_CLONES
void softmax_grad_rows(float* __restrict s, int64_t rows, int64_t cols,
                       const float* __restrict lse, const float* __restrict g) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * cols;
    const float l = lse[i], gi = g[i];
    for (int64_t j = 0; j < cols; ++j) row[j] = gi * exp_f32(row[j] - l);
  }
}

FASTSSL_SIMD_CLONES
void add_column_sums(const float* __restrict s, int64_t rows, int64_t cols, float* __restrict out) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = s + i * cols;
    for (int64_t j = 0; j < cols; ++j) out[j] += row[j];
  }
}

struct Head {
  std::vector<int64_t> rows;  // original indices of the valid rows, in order
  std::vector<int64_t> target;  // their labels
  at::Tensor a;                // P x H fp32 gathered rows
  at::Tensor w;                // V x H fp32 contiguous
  at::Tensor b;                // V fp32 or undefined
};

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& labels) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) >= 1,
              "fastssl::masked_token_loss: hidden must be (R, H) with H >= 1");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) >= 1 && weight.size(1) == hidden.size(1),
              "fastssl::masked_token_loss: weight must be (V, H) with V >= 1 and hidden's H");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(),
              "fastssl::masked_token_loss: hidden and weight must have the same dtype");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                                    bias->scalar_type() == weight.scalar_type()),
              "fastssl::masked_token_loss: bias must be (V,) in weight's dtype");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0) &&
                  labels.scalar_type() == at::kLong,
              "fastssl::masked_token_loss: labels must be an int64 (R,) tensor");
}

Head stage(const at::Tensor& hidden, const at::Tensor& weight,
           const std::optional<at::Tensor>& bias, const at::Tensor& labels,
           int64_t ignore_index) {
  check_inputs(hidden, weight, bias, labels);
  const int64_t v = weight.size(0);
  Head head;
  const at::Tensor lab = labels.contiguous();
  const int64_t* y = lab.data_ptr<int64_t>();
  for (int64_t i = 0; i < lab.numel(); ++i) {
    if (y[i] == ignore_index) continue;
    // The public function checks this before any kernel runs; this guards direct op calls.
    TORCH_CHECK(y[i] >= 0 && y[i] < v, "fastssl::masked_token_loss: label ", y[i],
                " at row ", i, " is outside [0, ", v, ") and is not ignore_index = ",
                ignore_index);
    head.rows.push_back(i);
    head.target.push_back(y[i]);
  }
  const at::Tensor idx = at::tensor(head.rows, hidden.options().dtype(at::kLong));
  head.a = hidden.index_select(0, idx).to(at::kFloat).contiguous();
  head.w = weight.to(at::kFloat).contiguous();
  if (bias.has_value()) head.b = bias->to(at::kFloat).contiguous();
  return head;
}

}  // namespace

// Returns (loss [R] fp32, lse [R] fp32), 0 at ignored rows.
std::tuple<at::Tensor, at::Tensor> masked_token_loss_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index) {
  const Head head = stage(hidden, weight, bias, labels, ignore_index);
  const int64_t r = hidden.size(0), h = hidden.size(1), v = weight.size(0);
  const int64_t p = static_cast<int64_t>(head.rows.size());
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor loss = at::zeros({r}, f32), lse = at::zeros({r}, f32);
  if (p == 0) return {loss, lse};
  const float* a = head.a.data_ptr<float>();
  const float* w = head.w.data_ptr<float>();
  const float* b = head.b.defined() ? head.b.data_ptr<float>() : nullptr;
  float* loss_out = loss.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  const int64_t nblocks = (p + kFwdRows - 1) / kFwdRows;
  TileBuffers tiles(kFwdRows * kFwdCols);
  at::parallel_for(0, nblocks, 1, [&](int64_t blk0, int64_t blk1) {
    float* s = tiles.get();
    std::vector<float> rmax(kFwdRows), rsum(kFwdRows), tgt(kFwdRows);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * kFwdRows, bp = std::min(kFwdRows, p - i0);
      std::fill(rmax.begin(), rmax.end(), kNegInf);
      std::fill(rsum.begin(), rsum.end(), 0.0f);
      // 1. [Online softmax] over the vocabulary tiles: s = A_blk W_tile^T (+ b), then the
      // running (max, sum) per row; the target's logit is read from the same tile.
      for (int64_t v0 = 0; v0 < v; v0 += kFwdCols) {
        const int64_t bv = std::min(kFwdCols, v - v0);
        gemm_rm(false, true, bp, bv, h, 1.0f, a + i0 * h, h, w + v0 * h, h, 0.0f, s, bv);
        if (b != nullptr) add_bias_rows(s, bp, bv, b + v0);
        for (int64_t i = 0; i < bp; ++i) {
          const int64_t t = head.target[i0 + i];
          if (t >= v0 && t < v0 + bv) tgt[i] = s[i * bv + (t - v0)];
        }
        online_lse_tile(s, bp, bv, rmax.data(), rsum.data(), nullptr, nullptr, nullptr);
      }
      // 2. loss = (max - target) + log(sum): log_softmax's precision, not that of lse - target.
      for (int64_t i = 0; i < bp; ++i) {
        const int64_t row = head.rows[i0 + i];
        const double log_sum = std::log(static_cast<double>(rsum[i]));
        loss_out[row] = static_cast<float>((static_cast<double>(rmax[i]) - tgt[i]) + log_sum);
        lse_out[row] = static_cast<float>(rmax[i] + log_sum);
      }
    }
  });
  return {loss, lse};
}

namespace {

// (dhidden [R, H], dweight [V, H], dbias [V] or [0]), all fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_fp32(
    const at::Tensor& grad, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse,
    int64_t ignore_index) {
  const Head head = stage(hidden, weight, bias, labels, ignore_index);
  TORCH_CHECK(grad.numel() == hidden.size(0) && lse.numel() == hidden.size(0),
              "fastssl::masked_token_loss: grad and lse must be (R,)");
  const int64_t r = hidden.size(0), h = hidden.size(1), v = weight.size(0);
  const int64_t p = static_cast<int64_t>(head.rows.size());
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor dw = at::zeros({v, h}, f32);
  at::Tensor db = at::zeros({bias.has_value() ? v : 0}, f32);
  at::Tensor dh = at::zeros({r, h}, f32);
  if (p == 0) return {dh, dw, db};
  // Per valid row: its incoming gradient and saved lse, in the gathered order.
  const at::Tensor g_all = grad.to(at::kFloat).contiguous();
  const at::Tensor lse_all = lse.to(at::kFloat).contiguous();
  std::vector<float> g(p), l(p);
  for (int64_t i = 0; i < p; ++i) {
    g[i] = g_all.data_ptr<float>()[head.rows[i]];
    l[i] = lse_all.data_ptr<float>()[head.rows[i]];
  }
  const float* a = head.a.data_ptr<float>();
  const float* w = head.w.data_ptr<float>();
  const float* b = head.b.defined() ? head.b.data_ptr<float>() : nullptr;
  float* dwp = dw.data_ptr<float>();
  float* dbp = bias.has_value() ? db.data_ptr<float>() : nullptr;
  const int64_t ntiles = (v + kBwdCols - 1) / kBwdCols;
  int64_t nsplit = 8;
  while (nsplit > 1 && (nsplit > ntiles || nsplit * p * h > kPartialFloats)) nsplit /= 2;
  at::Tensor partial = at::zeros({nsplit, p, h}, f32);
  float* part = partial.data_ptr<float>();
  TileBuffers tiles(kBwdRows * kBwdCols);
  at::parallel_for(0, nsplit, 1, [&](int64_t s0, int64_t s1) {
    float* s = tiles.get();
    for (int64_t split = s0; split < s1; ++split) {
      // Vocabulary tiles [t0, t1) of this split: contiguous, as even as integer division allows.
      const int64_t t0 = split * ntiles / nsplit, t1 = (split + 1) * ntiles / nsplit;
      float* dh_part = part + split * p * h;
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t v0 = tile * kBwdCols, bv = std::min(kBwdCols, v - v0);
        for (int64_t i0 = 0; i0 < p; i0 += kBwdRows) {
          const int64_t bp = std::min(kBwdRows, p - i0);
          // 1. Recompute the tile, 2. ds = g (softmax - onehot) in place (fp32, the -g of the
          // target folded here), 3. the three products read it while it is in cache.
          gemm_rm(false, true, bp, bv, h, 1.0f, a + i0 * h, h, w + v0 * h, h, 0.0f, s, bv);
          if (b != nullptr) add_bias_rows(s, bp, bv, b + v0);
          softmax_grad_rows(s, bp, bv, l.data() + i0, g.data() + i0);
          for (int64_t i = 0; i < bp; ++i) {
            const int64_t t = head.target[i0 + i];
            if (t >= v0 && t < v0 + bv) s[i * bv + (t - v0)] -= g[i0 + i];
          }
          if (dbp != nullptr) add_column_sums(s, bp, bv, dbp + v0);
          gemm_rm(false, false, bp, h, bv, 1.0f, s, bv, w + v0 * h, h, 1.0f, dh_part + i0 * h,
                  h);
          gemm_rm(true, false, bv, h, bp, 1.0f, s, bv, a + i0 * h, h, 1.0f, dwp + v0 * h, h);
        }
      }
    }
  });
  // 4. dH = sum of the split partials in split order, scattered to the valid rows.
  float* dhp = dh.data_ptr<float>();
  at::parallel_for(0, p, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* out = dhp + head.rows[i] * h;
      for (int64_t split = 0; split < nsplit; ++split) {
        const float* src = part + (split * p + i) * h;
        for (int64_t k = 0; k < h; ++k) out[k] += src[k];
      }
    }
  });
  return {dh, dw, db};
}

at::Tensor to_dtype(const at::Tensor& t, at::ScalarType st) {
  return t.scalar_type() == st ? t : t.to(st);
}

}  // namespace

// Returns (dhidden [R, H], dweight [V, H], dbias [V] or [0]) in the inputs' dtypes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_token_loss_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse,
    int64_t ignore_index) {
  auto [dh, dw, db] = bwd_fp32(grad, hidden, weight, bias, labels, lse, ignore_index);
  return {to_dtype(dh, hidden.scalar_type()), to_dtype(dw, weight.scalar_type()),
          to_dtype(db, bias.has_value() ? bias->scalar_type() : weight.scalar_type())};
}

// The summed loss and its gradients in one pass over the vocabulary (reductions "sum" and
// "mean": the upstream gradient is then one scalar, so the backward only scales these).
// Returns (loss [] fp32 = sum of the valid rows' losses, dhidden [R, H], dweight [V, H],
// dbias [V] or [0]: the gradients of that sum, fp32).
//
// A unit of the outer (sequential) loop is a block of up to bp rows whose logits over the WHOLE
// vocabulary stay in one buffer (bp x V fp32, bp from V only: the largest multiple of 16 <= 256
// within kLogitsFloats). 1. Logit tiles in parallel (each tile's row max and sum), 2. the row
// LSE combined in tile order, 3. ds = softmax - onehot tile by tile in place, read while in cache
// by db, dW (the split owning the tile) and the split's partial dH, 4. dH = the partials in split
// order. Three P x V x H GEMMs, no recompute. The buffer costs bp x V floats (31 MB at V =
// 30,522) and W is streamed twice per block (plus dW read and written): smaller blocks mean less
// memory and more weight traffic. When even kMinGradRows rows do not fit (V > 524,288), the two
// passes of the reduction="none" path run instead (forward, then the backward that recomputes
// the logits: four GEMMs, no bp x V buffer).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_token_loss_sum_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index) {
  check_inputs(hidden, weight, bias, labels);  // before V divides anything
  const int64_t r = hidden.size(0), h = hidden.size(1), v = weight.size(0);
  auto f32 = hidden.options().dtype(at::kFloat);
  const int64_t rows_fit = std::min(kMaxGradRows, kLogitsFloats / v / 16 * 16);
  if (rows_fit < kMinGradRows) {
    auto [rows_loss, lse] = masked_token_loss_fwd_cpu(hidden, weight, bias, labels, ignore_index);
    auto [dh, dw, db] = bwd_fp32(at::ones({r}, f32), hidden, weight, bias, labels, lse,
                                 ignore_index);
    return {rows_loss.to(at::kDouble).sum().to(at::kFloat), dh, dw, db};
  }
  const Head head = stage(hidden, weight, bias, labels, ignore_index);
  const int64_t p = static_cast<int64_t>(head.rows.size());
  at::Tensor dw = at::zeros({v, h}, f32);
  at::Tensor db = at::zeros({bias.has_value() ? v : 0}, f32);
  at::Tensor dh = at::zeros({r, h}, f32);
  if (p == 0) return {at::zeros({}, f32), dh, dw, db};
  const int64_t bp = std::min(rows_fit, p);
  const int64_t ntiles = (v + kGradCols - 1) / kGradCols;
  int64_t nsplit = 8;
  while (nsplit > 1 && nsplit > ntiles) nsplit /= 2;
  // Tile t of the block's logits starts at bpb * t * kGradCols floats (a multiple of 1 KB, so
  // every tile is contiguous and 64-byte aligned for MKL), leading dimension its width.
  at::Tensor logits = at::empty({bp * v}, f32);
  at::Tensor tile_stats = at::empty({2, ntiles, bp}, f32);  // per tile and row: max, sum
  at::Tensor partial = at::empty({nsplit, bp, h}, f32);
  float* lg = logits.data_ptr<float>();
  float* tmax = tile_stats.data_ptr<float>();
  float* tsum = tmax + ntiles * bp;
  float* part = partial.data_ptr<float>();
  const float* a = head.a.data_ptr<float>();
  const float* w = head.w.data_ptr<float>();
  const float* b = head.b.defined() ? head.b.data_ptr<float>() : nullptr;
  float* dwp = dw.data_ptr<float>();
  float* dbp = bias.has_value() ? db.data_ptr<float>() : nullptr;
  float* dhp = dh.data_ptr<float>();
  std::vector<float> tgt(bp), lse(bp);
  const std::vector<float> ones(bp, 1.0f);
  double loss_total = 0.0;
  for (int64_t i0 = 0; i0 < p; i0 += bp) {
    const int64_t bpb = std::min(bp, p - i0);
    // 1. The block's logits, tile by tile, with each tile's (max, sum) per row.
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t v0 = t * kGradCols, bv = std::min(kGradCols, v - v0);
        float* s = lg + bpb * v0;
        gemm_rm(false, true, bpb, bv, h, 1.0f, a + i0 * h, h, w + v0 * h, h, 0.0f, s, bv);
        if (b != nullptr) add_bias_rows(s, bpb, bv, b + v0);
        float* m = tmax + t * bp;
        float* sm = tsum + t * bp;
        std::fill(m, m + bpb, kNegInf);
        std::fill(sm, sm + bpb, 0.0f);
        online_lse_tile(s, bpb, bv, m, sm, nullptr, nullptr, nullptr);
        for (int64_t i = 0; i < bpb; ++i) {  // the one tile holding row i's target writes it
          const int64_t y = head.target[i0 + i];
          if (y >= v0 && y < v0 + bv) tgt[i] = s[i * bv + (y - v0)];
        }
      }
    });
    // 2. Row LSE from the tile statistics in tile order (double: ~120 terms per row).
    for (int64_t i = 0; i < bpb; ++i) {
      float m = kNegInf;
      for (int64_t t = 0; t < ntiles; ++t) m = std::max(m, tmax[t * bp + i]);
      double sum = 0.0;
      for (int64_t t = 0; t < ntiles; ++t) {
        sum += static_cast<double>(tsum[t * bp + i]) *
               std::exp(static_cast<double>(tmax[t * bp + i]) - m);
      }
      const double log_sum = std::log(sum);
      lse[i] = static_cast<float>(m + log_sum);
      loss_total += (static_cast<double>(m) - tgt[i]) + log_sum;
    }
    // 3. ds = softmax - onehot in place, then db, dW (owned by this split) and partial dH.
    at::parallel_for(0, nsplit, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t split = s0; split < s1; ++split) {
        const int64_t t0 = split * ntiles / nsplit, t1 = (split + 1) * ntiles / nsplit;
        float* dh_part = part + split * bp * h;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t v0 = t * kGradCols, bv = std::min(kGradCols, v - v0);
          float* s = lg + bpb * v0;
          softmax_grad_rows(s, bpb, bv, lse.data(), ones.data());
          for (int64_t i = 0; i < bpb; ++i) {
            const int64_t y = head.target[i0 + i];
            if (y >= v0 && y < v0 + bv) s[i * bv + (y - v0)] -= 1.0f;
          }
          if (dbp != nullptr) add_column_sums(s, bpb, bv, dbp + v0);
          gemm_rm(false, false, bpb, h, bv, 1.0f, s, bv, w + v0 * h, h, t == t0 ? 0.0f : 1.0f,
                  dh_part, h);
          gemm_rm(true, false, bv, h, bpb, 1.0f, s, bv, a + i0 * h, h, 1.0f, dwp + v0 * h, h);
        }
      }
    });
    // 4. dH of the block's rows = the split partials added in split order.
    at::parallel_for(0, bpb, 16, [&](int64_t j0, int64_t j1) {
      for (int64_t i = j0; i < j1; ++i) {
        float* out = dhp + head.rows[i0 + i] * h;
        for (int64_t split = 0; split < nsplit; ++split) {
          const float* src = part + (split * bp + i) * h;
          for (int64_t k = 0; k < h; ++k) out[k] += src[k];
        }
      }
    });
  }
  return {at::scalar_tensor(loss_total, f32), dh, dw, db};
}

}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("masked_token_loss_fwd", &fastssl::masked_token_loss_fwd_cpu);
  m.impl("masked_token_loss_bwd", &fastssl::masked_token_loss_bwd_cpu);
  m.impl("masked_token_loss_sum", &fastssl::masked_token_loss_sum_cpu);
}
