// Cross-entropy of rows Q against columns C with one target column per row, on the
// contrastive core (contrastive_core.h):
//
//   loss_i = LSE_{j not masked} S_ij - S_i,t(i),   S = alpha Qhat Chat^T,
//
// masked columns: self_idx[i] (-1: none) and, when mask_target, t(i) itself (DCL).
// It is the engine of every "local rows vs (gathered) columns" loss:
//  * info_nce without a queue: rows = queries, columns = keys, t(i) = i (+ rank offset);
//  * nt_xent(gather=True): rows = the local [z1; z2], columns = [z1; z2] of all ranks,
//    self and target in global column indices;
//  * clip_loss(gather=True): each direction, local rows vs the other modality of all ranks.
// Forward: 1 matmul-equivalent of m nc d; backward: 3 (one recompute, dQ and dC).
// Results are bitwise independent of the thread count (contrastive_core.h, "Threads").
#include <torch/library.h>

#include "contrastive_core.h"

namespace fastssl {
namespace {

void check_xent(const at::Tensor& q, const at::Tensor& c, const at::Tensor& scale,
                const at::Tensor& target, const at::Tensor& self_idx) {
  TORCH_CHECK(q.dim() == 2 && c.dim() == 2 && q.size(1) == c.size(1),
              "fastssl::xent: q (m, d) and c (nc, d) must be 2-D with the same d");
  TORCH_CHECK(q.size(0) >= 1 && c.size(0) >= 1 && q.size(1) >= 1, "fastssl::xent: empty input");
  TORCH_CHECK(q.scalar_type() == c.scalar_type() && at::isFloatingType(q.scalar_type()),
              "fastssl::xent: q and c must share one floating dtype");
  TORCH_CHECK(scale.numel() == 1, "fastssl::xent: scale must have one element");
  TORCH_CHECK(target.scalar_type() == at::kLong && self_idx.scalar_type() == at::kLong &&
                  target.numel() == q.size(0) && self_idx.numel() == q.size(0),
              "fastssl::xent: target and self_idx must be int64 of length m");
  const int64_t nc = c.size(0);
  TORCH_CHECK(target.min().item<int64_t>() >= 0 && target.max().item<int64_t>() < nc,
              "fastssl::xent: target out of range");
  TORCH_CHECK(self_idx.max().item<int64_t>() < nc, "fastssl::xent: self_idx out of range");
}

}  // namespace

// Returns (loss [m] fp32, lse [m] fp32).
std::tuple<at::Tensor, at::Tensor> xent_fwd_cpu(const at::Tensor& q, const at::Tensor& c,
                                                const at::Tensor& scale, const at::Tensor& target,
                                                const at::Tensor& self_idx, bool normalize,
                                                bool mask_target) {
  check_xent(q, c, scale, target, self_idx);
  const int64_t m = q.size(0), d = q.size(1);
  const float alpha = scale.item<float>();
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({m}, f32), lse = at::empty({m}, f32);
  const core::Operand Q = core::stage(q, normalize), C = core::stage(c, normalize);
  if (!Q.finite || !C.finite) {
    lse.fill_(std::numeric_limits<float>::quiet_NaN());
    return {lse.clone(), lse};
  }
  at::Tensor tg = target.contiguous(), si = self_idx.contiguous();
  const int64_t* t = tg.data_ptr<int64_t>();
  core::Masks masks{si.data_ptr<int64_t>(), mask_target ? t : nullptr};
  float* l = lse.data_ptr<float>();
  // The target logit is read from the same tile that fed the LSE (core::Picks), and the loss
  // is (max - target) + log_sum: >= 0 whenever the target is not masked, and as precise as
  // log_softmax when it is small.
  std::vector<float> target_logit(m), row_max(m), row_log_sum(m);
  core::Picks picks;
  picks.target = t;
  picks.target_logit = target_logit.data();
  picks.row_max = row_max.data();
  picks.row_log_sum = row_log_sum.data();
  core::forward_lse(Q, C, alpha, masks, l, nullptr, picks);
  float* out = loss.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) out[i] = (row_max[i] - target_logit[i]) + row_log_sum[i];
  return {loss, lse};
}

// Returns (dq in q's dtype, dc in c's dtype (empty when !need_dc), dscale (0-dim fp32)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> xent_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& c, const at::Tensor& scale,
    const at::Tensor& target, const at::Tensor& self_idx, const at::Tensor& lse, bool normalize,
    bool mask_target, bool need_dc) {
  const int64_t m = q.size(0), nc = c.size(0), d = q.size(1);
  const float alpha = scale.item<float>();
  auto f32 = q.options().dtype(at::kFloat);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (!lse.isfinite().all().item<bool>()) {
    return {at::full({m, d}, nan, q.options()),
            need_dc ? at::full({nc, d}, nan, c.options()) : at::empty({0}, c.options()),
            at::full({}, nan, f32)};
  }
  const core::Operand Q = core::stage(q, normalize), C = core::stage(c, normalize);
  at::Tensor g = grad.to(at::kFloat).contiguous(), tg = target.contiguous(),
             si = self_idx.contiguous();
  const float* gp = g.data_ptr<float>();
  const int64_t* t = tg.data_ptr<int64_t>();
  core::Masks masks{si.data_ptr<int64_t>(), mask_target ? t : nullptr};
  at::Tensor dq = at::empty({m, d}, f32);
  at::Tensor dc = need_dc ? at::empty({nc, d}, f32) : at::Tensor();
  float* dqp = dq.data_ptr<float>();
  float* dcp = need_dc ? dc.data_ptr<float>() : nullptr;
  core::backward_softmax(Q, C, alpha, masks, gp, lse.data_ptr<float>(), nullptr, nullptr, dqp,
                         dcp);
  // Target term (the -1 of the one-hot, in fp32): dq_i -= alpha g_i chat_t(i),
  // dc_t(i) -= alpha g_i qhat_i (sequential: targets may repeat in general).
  at::parallel_for(0, m, core::row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) core::axpy_hat(dqp + i * d, -alpha * gp[i], C, t[i]);
  });
  if (need_dc)
    for (int64_t i = 0; i < m; ++i) core::axpy_hat(dcp + t[i] * d, -alpha * gp[i], Q, i);
  // dL/dalpha = (1/alpha) sum_i qhat_i . dqhat_i: every logit is alpha qhat_i . chat_j.
  const double ds = core::rows_dot(Q, dqp) / alpha;
  core::normalize_backward(Q, dqp);
  if (need_dc) core::normalize_backward(C, dcp);
  return {core::to_dtype(dq, q.scalar_type()),
          need_dc ? core::to_dtype(dc, c.scalar_type()) : at::empty({0}, c.options()),
          at::full({}, ds, f32)};
}

}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("xent_fwd", &fastssl::xent_fwd_cpu);
  m.impl("xent_bwd", &fastssl::xent_bwd_cpu);
}
