r"""``masked_patch_loss``: MAE's pixel reconstruction loss (He et al. 2022,
https://arxiv.org/abs/2111.06377), fused: patchify + per-patch normalisation + MSE on the
masked patches in one pass over the image, without the (B, L, p·p·C) patchified target.

For patch l of image b (``fastssl.reference.patchify`` defines the order: MAE's
``'nchpwq->nhwpqc'``), with target values :math:`x_k`, k < n = p·p·C:

.. math:: t_k = (x_k - \mu) / \sqrt{\sigma^2 + \epsilon}, \quad
          \sigma^2 = \tfrac{1}{n-1}\textstyle\sum_k (x_k - \mu)^2 \text{ (unbiased, as MAE)},
          \quad \ell_{bl} = \tfrac1n \textstyle\sum_k (\hat y_k - t_k)^2

(:math:`t = x` without ``norm_pix``), and the loss is
:math:`\sum_{bl} w_{bl} \ell_{bl} / \sum_{bl} w_{bl}` (0 if the weights sum to 0), w the mask.

Ops (CPU kernel ``csrc/cpu/masked_patch_loss.cpp``, CUDA kernels below in Triton):

* ``masked_patch_loss_fwd(pred, images, mask, patch_size, norm_pix, eps)
  -> (loss, stats, inv_weight)``
* ``masked_patch_loss_bwd(grad, pred, images, mask, stats, inv_weight, patch_size, norm_pix)
  -> dpred``

``pred`` (B, L, p·p·C) and ``images`` (B, C, H, W) contiguous, fp32/bf16/fp16 each (they may
differ); ``mask`` (B, L) fp32 weights (``fastssl.functional`` converts bool masks).

Saved-tensor contract (both devices): pred, images, mask, ``stats`` (B, L, 2) fp32 = (mean,
1/sqrt(var + eps)) of each patch with a nonzero weight ((0, 1) without ``norm_pix``; patches
of weight 0 hold (0, 0) and are never read), ``inv_weight`` 0-dim fp32 = 1 / sum(mask), or 0
when the mask sums to 0. The backward reads each weighted patch of pred and images once more
and writes dpred = grad · inv_weight · w · (2/n) · (pred - t), zeros on patches of weight 0.
No gradient for images or mask.

Patches of weight 0 are not read at all (forward or backward): with MAE's 75 % masking a
quarter of the image and of pred is skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _library
from ._aot import aot_entry
from ._triton_utils import TL_DTYPE, next_pow2, round_cast

_library.define("masked_patch_loss_fwd",
                "(Tensor pred, Tensor images, Tensor mask, int patch_size, bool norm_pix, "
                "float eps) -> (Tensor loss, Tensor stats, Tensor inv_weight)")
_library.define("masked_patch_loss_bwd",
                "(Tensor grad, Tensor pred, Tensor images, Tensor mask, Tensor stats, "
                "Tensor inv_weight, int patch_size, bool norm_pix) -> Tensor dpred")


@torch.library.register_fake("fastssl::masked_patch_loss_fwd")
def _fwd_fake(pred, images, mask, patch_size, norm_pix, eps):
    b, l = pred.shape[0], pred.shape[1]
    return (pred.new_empty((), dtype=torch.float32),
            pred.new_empty((b, l, 2), dtype=torch.float32),
            pred.new_empty((), dtype=torch.float32))


@torch.library.register_fake("fastssl::masked_patch_loss_bwd")
def _bwd_fake(grad, pred, images, mask, stats, inv_weight, patch_size, norm_pix):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pred, images, mask, patch_size, norm_pix, _eps = inputs
    ctx.save_for_backward(pred, images, mask, output[1], output[2])
    ctx.patch_size = patch_size
    ctx.norm_pix = norm_pix


def _backward(ctx, grad_loss, _gstats, _ginv):
    pred, images, mask, stats, inv_weight = ctx.saved_tensors
    dpred = None
    if ctx.needs_input_grad[0]:
        dpred = torch.ops.fastssl.masked_patch_loss_bwd(grad_loss, pred, images, mask, stats,
                                                        inv_weight, ctx.patch_size,
                                                        ctx.norm_pix)
    return dpred, None, None, None, None, None


torch.library.register_autograd("fastssl::masked_patch_loss_fwd", _backward,
                                setup_context=_setup_context)
_library.no_double_backward("masked_patch_loss_bwd", "masked_patch_loss")


# ---------------------------------------------------------------------------------------
# CUDA kernels (Triton): one program per patch
# ---------------------------------------------------------------------------------------

# Values of one patch a program holds at once; larger patches (p·p·C > 2048, e.g. p = 32 with
# C = 3) loop over chunks of it (re-reading the patch from L1/L2) so registers never spill.
MAX_BLOCK = 2048


def _num_warps(block: int) -> int:
    # 8 fp32 per thread per operand: a 768-value patch (p = 16, C = 3; block 1024) is 4 warps.
    return max(1, min(8, block // 256))


@triton.jit
def _patch_offsets(k, C: tl.constexpr, P: tl.constexpr, W):
    # value k of the patch in pred's order ((u·p + v)·C + c) -> offset from the patch's top-left
    # pixel of channel 0, in an image of row length W and plane size `plane` (added by caller).
    c = k % C
    uv = k // C
    return c, (uv // P) * W + (uv % P)


@triton.jit
def masked_patch_loss_fwd_kernel(pred_ptr, img_ptr, mask_ptr, wloss_ptr, stats_ptr, eps,
                                 H, W, L, WP,
                                 C: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                                 BLOCK: tl.constexpr, NORM_PIX: tl.constexpr):
    pid = tl.program_id(0)  # patch b·L + l
    b = pid // L
    l = pid % L
    w = tl.load(mask_ptr + pid)
    active = w != 0.0
    # Values to read: N for a weighted patch, none for a patch of weight 0 (one int bound
    # instead of a scalar-bool & vector mask, which the interpreter cannot combine).
    limit = tl.where(active, N, 0)
    plane = H * W
    img_base = img_ptr + b.to(tl.int64) * C * plane + (l // WP) * P * W + (l % WP) * P
    pred_base = pred_ptr + pid.to(tl.int64) * N
    lanes = tl.arange(0, BLOCK)
    mean = 0.0
    rstd = 1.0
    if NORM_PIX:
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in tl.range(0, N, BLOCK):
            k = start + lanes
            c, off = _patch_offsets(k, C, P, W)
            x = tl.load(img_base + c * plane + off, mask=k < limit, other=0.0)
            acc += x.to(tl.float32)
        mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in tl.range(0, N, BLOCK):
            k = start + lanes
            c, off = _patch_offsets(k, C, P, W)
            x = tl.load(img_base + c * plane + off, mask=k < limit, other=0.0)
            dev = tl.where(k < N, x.to(tl.float32) - mean, 0.0)
            acc += dev * dev
        var = tl.sum(acc, axis=0) / (N - 1)
        rstd = 1.0 / tl.sqrt_rn(var + eps)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in tl.range(0, N, BLOCK):
        k = start + lanes
        c, off = _patch_offsets(k, C, P, W)
        live = k < limit
        x = tl.load(img_base + c * plane + off, mask=live, other=0.0).to(tl.float32)
        y = tl.load(pred_base + k, mask=live, other=0.0).to(tl.float32)
        d = tl.where(live, y - (x - mean) * rstd, 0.0)
        acc += d * d
    patch_loss = tl.sum(acc, axis=0) / N
    tl.store(wloss_ptr + pid, tl.where(active, w * patch_loss, 0.0))
    tl.store(stats_ptr + 2 * pid, tl.where(active, mean, 0.0))
    tl.store(stats_ptr + 2 * pid + 1, tl.where(active, rstd, 0.0))


@triton.jit
def masked_patch_loss_bwd_kernel(grad_ptr, inv_weight_ptr, pred_ptr, img_ptr, mask_ptr,
                                 stats_ptr, dpred_ptr, H, W, L, WP,
                                 C: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                                 BLOCK: tl.constexpr, PRED: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // L
    l = pid % L
    w = tl.load(mask_ptr + pid)
    active = w != 0.0
    limit = tl.where(active, N, 0)
    mean = tl.load(stats_ptr + 2 * pid)
    rstd = tl.load(stats_ptr + 2 * pid + 1)
    coef = tl.load(grad_ptr).to(tl.float32) * tl.load(inv_weight_ptr) * w * (2.0 / N)
    plane = H * W
    img_base = img_ptr + b.to(tl.int64) * C * plane + (l // WP) * P * W + (l % WP) * P
    pred_base = pred_ptr + pid.to(tl.int64) * N
    dpred_base = dpred_ptr + pid.to(tl.int64) * N
    lanes = tl.arange(0, BLOCK)
    for start in tl.range(0, N, BLOCK):
        k = start + lanes
        c, off = _patch_offsets(k, C, P, W)
        live = k < limit
        x = tl.load(img_base + c * plane + off, mask=live, other=0.0).to(tl.float32)
        y = tl.load(pred_base + k, mask=live, other=0.0).to(tl.float32)
        g = tl.where(live, coef * (y - (x - mean) * rstd), 0.0)
        tl.store(dpred_base + k, round_cast(g, PRED), mask=k < N)


def _geometry(pred, images, patch_size):
    b, c, h, w = images.shape
    n = patch_size * patch_size * c
    return b, c, h, w, w // patch_size, pred.shape[1], n, min(next_pow2(n), MAX_BLOCK)


@_library.triton_kernel("masked_patch_loss_fwd")
def masked_patch_loss_fwd_triton(pred, images, mask, patch_size: int, norm_pix: bool,
                                 eps: float):
    pred, images, mask = pred.contiguous(), images.contiguous(), mask.contiguous()
    b, c, h, w, wp, l, n, block = _geometry(pred, images, patch_size)
    wloss = torch.empty((b * l,), device=pred.device, dtype=torch.float32)
    stats = torch.empty((b, l, 2), device=pred.device, dtype=torch.float32)
    if b * l > 0:
        masked_patch_loss_fwd_kernel[(b * l,)](
            pred, images, mask, wloss, stats, float(eps), h, w, l, wp,
            C=c, P=patch_size, N=n, BLOCK=block, NORM_PIX=norm_pix,
            num_warps=_num_warps(block))
    # Sums of B·L values in fp64: deterministic for a given shape, exact enough for any B.
    total = mask.sum(dtype=torch.float64)
    inv = torch.where(total != 0, 1.0 / torch.where(total != 0, total, 1.0),
                      torch.zeros_like(total))
    loss = (wloss.sum(dtype=torch.float64) * inv).to(torch.float32)
    return loss, stats, inv.to(torch.float32)


@_library.triton_kernel("masked_patch_loss_bwd")
def masked_patch_loss_bwd_triton(grad, pred, images, mask, stats, inv_weight, patch_size: int,
                                 norm_pix: bool):
    pred, images, mask = pred.contiguous(), images.contiguous(), mask.contiguous()
    b, c, h, w, wp, l, n, block = _geometry(pred, images, patch_size)
    dpred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
    if b * l > 0:
        masked_patch_loss_bwd_kernel[(b * l,)](
            grad.to(torch.float32).contiguous(), inv_weight.contiguous(), pred, images, mask,
            stats.contiguous(), dpred, h, w, l, wp,
            C=c, P=patch_size, N=n, BLOCK=block, PRED=TL_DTYPE[pred.dtype],
            num_warps=_num_warps(block))
    return dpred


# Configurations `fastssl gpu-report` compiles: MAE's ViT patches (p = 16, RGB) in each dtype
# combination the MAE recipes use, with and without norm_pix, a gray p = 16 patch, and the
# chunked path (p = 32, RGB).
def _aot(pred_dtype, img_dtype, c, p, norm_pix=True):
    n = p * p * c
    block = min(next_pow2(n), MAX_BLOCK)
    tag = f"{pred_dtype}".removeprefix("torch.") + "<-" + f"{img_dtype}".removeprefix("torch.")
    fwd = [
        aot_entry(masked_patch_loss_fwd_kernel, op="masked_patch_loss",
                  name=f"masked_patch_loss:fwd[{tag},C={c},p={p}"
                       f"{'' if norm_pix else ',raw'}]", D=None,
                  pointers={"pred_ptr": pred_dtype, "img_ptr": img_dtype,
                            "mask_ptr": torch.float32, "wloss_ptr": torch.float32,
                            "stats_ptr": torch.float32},
                  floats=("eps",),
                  constexprs={"C": c, "P": p, "N": n, "BLOCK": block, "NORM_PIX": norm_pix},
                  num_warps=_num_warps(block), dtype=pred_dtype, tensor_cores=False)]
    if not norm_pix:  # the backward does not depend on norm_pix
        return fwd
    return fwd + [
        aot_entry(masked_patch_loss_bwd_kernel, op="masked_patch_loss",
                  name=f"masked_patch_loss:bwd[{tag},C={c},p={p}]", D=None,
                  pointers={"grad_ptr": torch.float32, "inv_weight_ptr": torch.float32,
                            "pred_ptr": pred_dtype, "img_ptr": img_dtype,
                            "mask_ptr": torch.float32, "stats_ptr": torch.float32,
                            "dpred_ptr": pred_dtype},
                  constexprs={"C": c, "P": p, "N": n, "BLOCK": block,
                              "PRED": TL_DTYPE[pred_dtype]},
                  num_warps=_num_warps(block), dtype=pred_dtype, tensor_cores=False),
    ]


AOT_KERNELS = [e for args in [(torch.float32, torch.float32, 3, 16),
                              (torch.bfloat16, torch.float32, 3, 16),
                              (torch.float16, torch.float16, 3, 16),
                              (torch.float32, torch.float32, 1, 16),
                              (torch.float32, torch.float32, 3, 32),
                              (torch.float32, torch.float32, 3, 16, False)]
               for e in _aot(*args)]


def masked_patch_loss_op(pred, images, mask, patch_size: int, norm_pix: bool, eps: float):
    """The loss (0-dim fp32) through ``torch.ops.fastssl.masked_patch_loss_fwd``."""
    loss, _stats, _inv = torch.ops.fastssl.masked_patch_loss_fwd(pred, images, mask,
                                                                 patch_size, norm_pix, eps)
    return loss
