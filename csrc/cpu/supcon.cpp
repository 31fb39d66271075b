// Supervised contrastive loss (Khosla et al. 2020, https://arxiv.org/abs/2004.11362, the
// L_out form) on the contrastive core (contrastive_core.h):
//
//   S = alpha Zhat Zhat^T, diagonal masked, P(i) = {p != i : y_p = y_i},
//   loss_i = LSE_{j != i} S_ij - (1/|P(i)|) sum_{p in P(i)} S_ip     (|P(i)| >= 1),
//
// anchors without a positive get loss 0 and npos 0; Python averages over the others.
// The positive term never needs the N x N mask either: the forward tiles add up, per row, their
// logits of the row's class (core::Picks, in double), and the backward tiles subtract
// w_i = g_i / |P(i)| at those entries (core::ClassTerm), so both use the very logits of the
// LSE. (A class-sum shortcut, alpha zhat_i . (sum_{y_p = y_i} zhat_p - zhat_i), cancels
// catastrophically at small tau: 8e-2 error at N = 3, D = 3, tau = 0.01.)
// Rows and columns are the same Z; this uses the general (non-symmetric) core, i.e. twice the
// tile work of a symmetric kernel like ntxent.cpp: forward 1 eq of N^2 d, backward 3.
#include <torch/library.h>

#include <unordered_map>

#include "contrastive_core.h"

namespace fastssl {
namespace {

// Dense class ids 0..C-1 (in order of first appearance) of int64 labels.
std::vector<int64_t> class_ids(const at::Tensor& labels, int64_t* num_classes) {
  at::Tensor lab = labels.to(at::kLong).contiguous();
  const int64_t* y = lab.data_ptr<int64_t>();
  std::unordered_map<int64_t, int64_t> ids;
  std::vector<int64_t> out(lab.numel());
  for (int64_t i = 0; i < lab.numel(); ++i) {
    auto it = ids.emplace(y[i], static_cast<int64_t>(ids.size())).first;
    out[i] = it->second;
  }
  *num_classes = static_cast<int64_t>(ids.size());
  return out;
}

}  // namespace

// Returns (loss [N] fp32 (0 for anchors without positives), lse [N] fp32, npos [N] fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_fwd_cpu(const at::Tensor& z,
                                                              const at::Tensor& labels,
                                                              const at::Tensor& scale,
                                                              bool normalize) {
  TORCH_CHECK(z.dim() == 2 && z.size(0) >= 1 && z.size(1) >= 1,
              "fastssl::supcon: features must be (N, d)");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0) &&
                  !at::isFloatingType(labels.scalar_type()),
              "fastssl::supcon: labels must be an integer (N,) tensor");
  TORCH_CHECK(scale.numel() == 1, "fastssl::supcon: scale must have one element");
  const int64_t n = z.size(0), d = z.size(1);
  const float alpha = scale.item<float>();
  auto f32 = z.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, f32), lse = at::empty({n}, f32), npos = at::empty({n}, f32);
  int64_t nclass = 0;
  const std::vector<int64_t> cls = class_ids(labels, &nclass);
  std::vector<int64_t> count(nclass, 0);
  for (int64_t c : cls) ++count[c];
  float* np = npos.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) np[i] = static_cast<float>(count[cls[i]] - 1);
  const core::Operand Z = core::stage(z, normalize);
  if (!Z.finite) {
    loss.fill_(std::numeric_limits<float>::quiet_NaN());
    lse.fill_(std::numeric_limits<float>::quiet_NaN());
    return {loss, lse, npos};
  }
  std::vector<int64_t> self(n);
  for (int64_t i = 0; i < n; ++i) self[i] = i;
  float* l = lse.data_ptr<float>();
  std::vector<double> pos_sum(n);
  std::vector<float> row_max(n), row_log_sum(n);
  core::Picks picks;
  picks.row_max = row_max.data();
  picks.row_log_sum = row_log_sum.data();
  picks.row_class = cls.data();
  picks.col_class = cls.data();
  picks.class_logit_sum = pos_sum.data();
  core::forward_lse(Z, Z, alpha, {self.data(), nullptr}, l, nullptr, picks);
  float* out = loss.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    if (np[i] == 0.0f) {  // excluded anchor (with N = 1 its row is empty: lse = -inf)
      out[i] = 0.0f;
      l[i] = 0.0f;
      continue;
    }
    // (max - mean positive logit) + log_sum: the relative precision of log_softmax.
    out[i] = static_cast<float>((row_max[i] - pos_sum[i] / np[i]) + row_log_sum[i]);
  }
  return {loss, lse, npos};
}

// Returns (dfeatures in the input dtype, dscale 0-dim fp32).
std::tuple<at::Tensor, at::Tensor> supcon_bwd_cpu(const at::Tensor& grad, const at::Tensor& z,
                                                  const at::Tensor& labels,
                                                  const at::Tensor& scale, const at::Tensor& lse,
                                                  bool normalize) {
  const int64_t n = z.size(0), d = z.size(1);
  const float alpha = scale.item<float>();
  auto f32 = z.options().dtype(at::kFloat);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (!lse.isfinite().all().item<bool>())
    return {at::full({n, d}, nan, z.options()), at::full({}, nan, f32)};
  int64_t nclass = 0;
  const std::vector<int64_t> cls = class_ids(labels, &nclass);
  std::vector<int64_t> count(nclass, 0);
  for (int64_t c : cls) ++count[c];
  const core::Operand Z = core::stage(z, normalize);
  at::Tensor g0 = grad.to(at::kFloat).contiguous();
  // Anchors without positives are out of the loss: their rows carry no gradient.
  std::vector<float> g(n), w(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t np = count[cls[i]] - 1;
    g[i] = np > 0 ? g0.data_ptr<float>()[i] : 0.0f;
    w[i] = np > 0 ? g[i] / static_cast<float>(np) : 0.0f;
  }
  std::vector<int64_t> self(n);
  for (int64_t i = 0; i < n; ++i) self[i] = i;
  at::Tensor dq = at::empty({n, d}, f32), dc = at::empty({n, d}, f32);
  float* dqp = dq.data_ptr<float>();
  float* dcp = dc.data_ptr<float>();
  // Positive term in the tiles: dS_ij -= w_i for j in P(i), on both the row and column side.
  core::backward_softmax(Z, Z, alpha, {self.data(), nullptr}, g.data(), lse.data_ptr<float>(),
                         nullptr, nullptr, dqp, dcp, {cls.data(), cls.data(), w.data()});
  // dL/dalpha from the row side alone (it holds every logit once).
  const double ds = core::rows_dot(Z, dqp) / alpha;
  dq.add_(dc);
  core::normalize_backward(Z, dqp);
  return {core::to_dtype(dq, z.scalar_type()), at::full({}, ds, f32)};
}

}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("supcon_fwd", &fastssl::supcon_fwd_cpu);
  m.impl("supcon_bwd", &fastssl::supcon_bwd_cpu);
}
