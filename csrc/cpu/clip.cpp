// Symmetric CLIP loss (Radford et al. 2021, https://arxiv.org/abs/2103.00020) on the
// contrastive core (contrastive_core.h):
//
//   S = s Ihat That^T (s = logit_scale, CLIP's exp(t)),
//   row_i = LSE_j S_ij - S_ii (image -> text),  col_j = LSE_i S_ij - S_jj (text -> image),
//   loss = (mean_i row_i + mean_j col_j) / 2   (the mean is taken in Python).
//
// One pass over the tiles yields both log-sum-exps (row and column online statistics from the
// same tile); the backward recomputes each tile once and forms
// P_ij = g_i softmax_row_ij + h_j softmax_col_ij, from which dI = s P That and
// dT = s P^T Ihat; the diagonal (-g_i - h_i) is an O(B d) epilogue, and so is the gradient of
// the scale, (1/s) sum_i ihat_i . dihat_i. Forward 1 matmul-equivalent of B^2 d, backward 3.
#include <torch/library.h>

#include "contrastive_core.h"

namespace fastssl {

// Returns (row_loss [B], col_loss [B], row_lse [B], col_lse [B]), all fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_fwd_cpu(const at::Tensor& image,
                                                                        const at::Tensor& text,
                                                                        const at::Tensor& scale,
                                                                        bool normalize) {
  TORCH_CHECK(image.dim() == 2 && image.sizes() == text.sizes() && image.size(0) >= 1,
              "fastssl::clip: image and text must be (B, d) with the same shape");
  TORCH_CHECK(image.scalar_type() == text.scalar_type(),
              "fastssl::clip: image and text must share one dtype");
  TORCH_CHECK(scale.numel() == 1, "fastssl::clip: scale must have one element");
  const int64_t b = image.size(0), d = image.size(1);
  const float s = scale.item<float>();
  auto f32 = image.options().dtype(at::kFloat);
  at::Tensor row = at::empty({b}, f32), col = at::empty({b}, f32);
  at::Tensor rlse = at::empty({b}, f32), clse = at::empty({b}, f32);
  const core::Operand I = core::stage(image, normalize), T = core::stage(text, normalize);
  if (!I.finite || !T.finite) {
    for (auto* t : {&row, &col, &rlse, &clse}) t->fill_(std::numeric_limits<float>::quiet_NaN());
    return {row, col, rlse, clse};
  }
  float* rl = rlse.data_ptr<float>();
  float* cl = clse.data_ptr<float>();
  // S_ii from the tile that fed both log-sum-exps (core::Picks); each loss is
  // (max - S_ii) + log_sum: >= 0, and as precise as log_softmax when small.
  std::vector<int64_t> diag(b);
  for (int64_t i = 0; i < b; ++i) diag[i] = i;
  std::vector<float> diag_logit(b), rmax(b), rlog(b), cmax(b), clog(b);
  core::Picks picks;
  picks.target = diag.data();
  picks.target_logit = diag_logit.data();
  picks.row_max = rmax.data();
  picks.row_log_sum = rlog.data();
  picks.col_max = cmax.data();
  picks.col_log_sum = clog.data();
  core::forward_lse(I, T, s, {}, rl, cl, picks);
  float* ro = row.data_ptr<float>();
  float* co = col.data_ptr<float>();
  for (int64_t i = 0; i < b; ++i) {
    ro[i] = (rmax[i] - diag_logit[i]) + rlog[i];
    co[i] = (cmax[i] - diag_logit[i]) + clog[i];
  }
  return {row, col, rlse, clse};
}

// Returns (dimage, dtext in the input dtype, dscale 0-dim fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_bwd_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& image,
    const at::Tensor& text, const at::Tensor& scale, const at::Tensor& row_lse,
    const at::Tensor& col_lse, bool normalize) {
  const int64_t b = image.size(0), d = image.size(1);
  const float s = scale.item<float>();
  auto f32 = image.options().dtype(at::kFloat);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (!row_lse.isfinite().all().item<bool>() || !col_lse.isfinite().all().item<bool>()) {
    return {at::full({b, d}, nan, image.options()), at::full({b, d}, nan, text.options()),
            at::full({}, nan, f32)};
  }
  const core::Operand I = core::stage(image, normalize), T = core::stage(text, normalize);
  at::Tensor g = grad_row.to(at::kFloat).contiguous(), h = grad_col.to(at::kFloat).contiguous();
  const float* gp = g.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  at::Tensor di = at::empty({b, d}, f32), dt = at::empty({b, d}, f32);
  float* dip = di.data_ptr<float>();
  float* dtp = dt.data_ptr<float>();
  core::backward_softmax(I, T, s, {}, gp, row_lse.data_ptr<float>(), hp,
                         col_lse.data_ptr<float>(), dip, dtp);
  // Diagonal (the targets of both directions): dS_ii gets -(g_i + h_i), in fp32.
  at::parallel_for(0, b, core::row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float c = -s * (gp[i] + hp[i]);
      core::axpy_hat(dip + i * d, c, T, i);
      core::axpy_hat(dtp + i * d, c, I, i);
    }
  });
  const double ds = core::rows_dot(I, dip) / s;
  core::normalize_backward(I, dip);
  core::normalize_backward(T, dtp);
  return {core::to_dtype(di, image.scalar_type()), core::to_dtype(dt, text.scalar_type()),
          at::full({}, ds, f32)};
}

}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("clip_fwd", &fastssl::clip_fwd_cpu);
  m.impl("clip_bwd", &fastssl::clip_bwd_cpu);
}
