// InfoNCE with a MoCo queue (He et al. 2020, https://arxiv.org/abs/1911.05722), on the
// contrastive core (contrastive_core.h):
//
//   logits_i = [p_i, S_i,0 .. S_i,K-1],  p_i = alpha qhat_i . khat_i,  S = alpha Qhat Uhat^T,
//   loss_i = LSE(logits_i) - p_i,
//
// with U the (K x d) queue, which never receives a gradient. The positive logit is not a
// column of the tiled product: it joins the row log-sum-exp after the merge (logaddexp).
// Since the queue needs no gradient, the forward also accumulates, flash-attention style,
// pv_i = sum_j softmax_ij uhat_j (core::forward_lse_pv), and the backward is only
// dqhat_i = alpha g_i (pv_i + (softmax_i(p_i) - 1) khat_i): O(N d), no tile recompute.
// Total: 2 matmul-equivalents of N K d (the eager reference: 2 plus the N x K softmax passes).
// At the MoCo shape (N = 256 queries = one row tile, K = 65536) the 256 queue tiles are split
// across the threads (private (max, sum, o) merged after, split-K flash-decoding style).
#include <torch/library.h>

#include "contrastive_core.h"

namespace fastssl {

// Returns (loss [N] fp32, lse [N] fp32 including the positive, pv [N, d] fp32: the
// softmax-weighted queue rows, normalised by the full lse).
std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_queue_fwd_cpu(const at::Tensor& q,
                                                                      const at::Tensor& k,
                                                                      const at::Tensor& queue,
                                                                      const at::Tensor& scale,
                                                                      bool normalize) {
  TORCH_CHECK(q.dim() == 2 && k.sizes() == q.sizes(),
              "fastssl::info_nce_queue: query and key must be (N, d) with the same shape");
  TORCH_CHECK(queue.dim() == 2 && queue.size(1) == q.size(1) && queue.size(0) >= 1,
              "fastssl::info_nce_queue: queue must be (K, d) with K >= 1 and query's d");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && queue.scalar_type() == q.scalar_type(),
              "fastssl::info_nce_queue: query, key and queue must share one dtype");
  TORCH_CHECK(scale.numel() == 1, "fastssl::info_nce_queue: scale must have one element");
  const int64_t n = q.size(0), d = q.size(1);
  const float alpha = scale.item<float>();
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, f32), lse = at::empty({n}, f32), pv = at::empty({n, d}, f32);
  const core::Operand Q = core::stage(q, normalize), K = core::stage(k, normalize),
                      U = core::stage(queue, normalize);
  if (!Q.finite || !K.finite || !U.finite) {
    lse.fill_(std::numeric_limits<float>::quiet_NaN());
    pv.fill_(std::numeric_limits<float>::quiet_NaN());
    return {lse.clone(), lse, pv};
  }
  float* l = lse.data_ptr<float>();
  float* pvp = pv.data_ptr<float>();
  core::forward_lse_pv(Q, U, alpha, l, pvp);
  float* out = loss.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float p = core::logit(Q, i, K, i, alpha);
    const float mx = std::max(l[i], p);
    const float full = mx + std::log(std::exp(l[i] - mx) + std::exp(p - mx));
    const float w = std::exp(l[i] - full);  // renormalise pv to the full softmax
    for (int64_t c = 0; c < d; ++c) pvp[i * d + c] *= w;
    l[i] = full;
    out[i] = full - p;
  }
  return {loss, lse, pv};
}

// Returns (dquery, dkey (empty when !need_dk), dscale (0-dim fp32)). No gradient for the queue.
std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_queue_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& lse, const at::Tensor& pv, bool normalize, bool need_dk) {
  const int64_t n = q.size(0), d = q.size(1);
  const float alpha = scale.item<float>();
  auto f32 = q.options().dtype(at::kFloat);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (!lse.isfinite().all().item<bool>()) {
    return {at::full({n, d}, nan, q.options()),
            need_dk ? at::full({n, d}, nan, k.options()) : at::empty({0}, k.options()),
            at::full({}, nan, f32)};
  }
  const core::Operand Q = core::stage(q, normalize), K = core::stage(k, normalize);
  at::Tensor g = grad.to(at::kFloat).contiguous(), pvc = pv.contiguous();
  const float* gp = g.data_ptr<float>();
  const float* l = lse.data_ptr<float>();
  const float* pvp = pvc.data_ptr<float>();
  at::Tensor dq = at::empty({n, d}, f32);
  at::Tensor dk = need_dk ? at::zeros({n, d}, f32) : at::Tensor();
  float* dqp = dq.data_ptr<float>();
  float* dkp = need_dk ? dk.data_ptr<float>() : nullptr;
  // dqhat_i = alpha g_i pv_i (the queue columns) + alpha g_i (softmax_i(p_i) - 1) khat_i (the
  // positive, its -1 folded in fp32); dkhat_i = the same coefficient times qhat_i.
  for (int64_t i = 0; i < n; ++i) {
    const float gi = alpha * gp[i];
    for (int64_t c = 0; c < d; ++c) dqp[i * d + c] = gi * pvp[i * d + c];
    const float p = core::logit(Q, i, K, i, alpha);
    const float coef = gi * (std::exp(p - l[i]) - 1.0f);
    core::axpy_hat(dqp + i * d, coef, K, i);
    if (need_dk) core::axpy_hat(dkp + i * d, coef, Q, i);
  }
  const double ds = core::rows_dot(Q, dqp) / alpha;
  core::normalize_backward(Q, dqp);
  if (need_dk) core::normalize_backward(K, dkp);
  return {core::to_dtype(dq, q.scalar_type()),
          need_dk ? core::to_dtype(dk, k.scalar_type()) : at::empty({0}, k.options()),
          at::full({}, ds, f32)};
}

}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("info_nce_queue_fwd", &fastssl::info_nce_queue_fwd_cpu);
  m.impl("info_nce_queue_bwd", &fastssl::info_nce_queue_bwd_cpu);
}
