"""Pure-PyTorch ground truth for every fastssl op.

These functions are the specification: tests compare every fused kernel against them,
benchmarks time them (eager and under ``torch.compile``), and ``backend="reference"`` runs
them. They favour clarity over memory: most materialise the full N x N logits.

Sections are per op, in the order of ``fastssl/__init__.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------
# NT-Xent (SimCLR) and its decoupled variant (DCL)
# ---------------------------------------------------------------------------------------


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=1)`` without overflow: rows whose max-abs exceeds 1 are divided by
    it first (a detached constant; normalisation is scale-invariant there, so the value and the
    gradient are unchanged), so rows up to the dtype's range (1e30 in fp32) do not overflow
    the squared norm (fp32 overflows at ~1.8e19)."""
    if x.shape[1] == 0:
        return F.normalize(x, dim=1)
    amax = x.detach().abs().amax(dim=1, keepdim=True)
    big = (amax > 1) & torch.isfinite(amax)
    return F.normalize(x / torch.where(big, amax, torch.ones_like(amax)), dim=1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature=0.1, *, normalize: bool = True,
            reduction: str = "mean", decoupled: bool = False) -> torch.Tensor:
    """NT-Xent loss of SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709).

    Z = [z1; z2] (2N x D), L2-normalised when ``normalize``; S = Z Z^T / temperature with the
    diagonal masked; row i's positive is t(i) = (i + N) mod 2N;
    loss_i = logsumexp_{j != i} S_ij - S_i,t(i). With ``decoupled`` (DCL, Yeh et al. 2021,
    https://arxiv.org/abs/2110.06848) the positive is also removed from the logsumexp.

    Args:
        z1, z2: (N, D) embeddings of the two views.
        temperature: float or 0-dim tensor (> 0).
        reduction: "mean" over the 2N rows, "sum", or "none" (the (2N,) vector).
    """
    z = torch.cat([z1, z2], dim=0)
    if normalize:
        z = _l2_normalize(z)
    m = z.shape[0]
    n = m // 2
    logits = (z @ z.T) / temperature
    rows = torch.arange(m, device=z.device)
    target = (rows + n) % m
    mask = torch.eye(m, dtype=torch.bool, device=z.device)
    positive = logits[rows, target]
    if decoupled:
        mask = mask.clone()
        mask[rows, target] = True
    logits = logits.masked_fill(mask, float("-inf"))
    loss = torch.logsumexp(logits, dim=1) - positive
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# ---------------------------------------------------------------------------------------
# InfoNCE (MoCo), CLIP, SupCon                                      [issue: contrastive family]
# ---------------------------------------------------------------------------------------


def info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None = None,
             temperature=0.07, *, normalize: bool = True,
             reduction: str = "mean") -> torch.Tensor:
    """InfoNCE of MoCo (He et al. 2020, https://arxiv.org/abs/1911.05722).

    With a queue (K x D, MoCo v1/v2): logits_i = [q_i . k_i, q_i . queue^T] / temperature,
    target 0 (the own key); the queue gets no gradient. Without (MoCo v3, one direction of
    CLIP): logits = q k^T / temperature, target i (the other keys are the negatives).
    ``normalize`` L2-normalises query, key and queue.

    Args:
        query, key: (N, D). queue: (K, D) or None. reduction: "mean", "sum" or "none" (N,).
    """
    if normalize:
        query, key = _l2_normalize(query), _l2_normalize(key)
    n = query.shape[0]
    if queue is None:
        logits = query @ key.T / temperature
        target = torch.arange(n, device=query.device)
    else:
        queue = queue.detach()
        if normalize:
            queue = _l2_normalize(queue)
        pos = (query * key).sum(dim=1, keepdim=True)
        logits = torch.cat([pos, query @ queue.T], dim=1) / temperature
        target = torch.zeros(n, dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, target, reduction=reduction)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale, *, logit_bias=None,
              normalize: bool = True) -> torch.Tensor:
    """Symmetric CLIP loss (Radford et al. 2021, https://arxiv.org/abs/2103.00020).

    logits = logit_scale * image text^T (rows L2-normalised when ``normalize``);
    loss = (CE(logits, arange) + CE(logits^T, arange)) / 2. ``logit_scale`` is the multiplier
    (CLIP's ``logit_scale.exp()``). ``logit_bias`` (SigLIP) is not supported: an additive
    bias cancels in the softmax loss, and SigLIP's sigmoid loss is another op.

    Args:
        image, text: (B, D). logit_scale: float or 0-dim tensor > 0.
    """
    if logit_bias is not None:
        raise NotImplementedError("clip_loss: logit_bias (SigLIP's sigmoid loss) is not "
                                  "supported; in the softmax CLIP loss a bias cancels")
    if normalize:
        image, text = _l2_normalize(image), _l2_normalize(text)
    logits = logit_scale * (image @ text.T)
    target = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def supcon(features: torch.Tensor, labels: torch.Tensor, temperature=0.1, *,
           normalize: bool = True) -> torch.Tensor:
    """Supervised contrastive loss, L_out (Khosla et al. 2020, https://arxiv.org/abs/2004.11362).

    S = z z^T / temperature with the diagonal masked; the positives of anchor i are the other
    samples with its label; loss_i = -mean_{p in P(i)} log softmax_{j != i}(S_i)_p. The loss is
    the mean over anchors with at least one positive (0 when there is none).

    Args:
        features: (N, D). labels: (N,) integers.
    """
    if normalize:
        features = _l2_normalize(features)
    n = features.shape[0]
    logits = features @ features.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    npos = pos.sum(dim=1)
    mean_pos = log_prob.masked_fill(~pos, 0.0).sum(dim=1) / npos.clamp(min=1)
    valid = npos > 0
    return -(mean_pos * valid).sum() / valid.sum().clamp(min=1)


def rows_vs_columns(q: torch.Tensor, c: torch.Tensor, scale, target: torch.Tensor,
                    self_idx: torch.Tensor, *, normalize: bool = True,
                    mask_target: bool = False) -> torch.Tensor:
    """Per-row cross-entropy of rows q (M, D) against columns c (Nc, D), the engine of the
    ``gather=True`` losses: S = scale * q c^T, column self_idx[i] (-1: none) and, with
    ``mask_target``, target[i] masked; loss_i = logsumexp_j S_ij - S_i,target[i]. (M,)."""
    if normalize:
        q, c = _l2_normalize(q), _l2_normalize(c)
    logits = scale * (q @ c.T)
    rows = torch.arange(q.shape[0], device=q.device)
    positive = logits[rows, target]
    mask = torch.zeros_like(logits, dtype=torch.bool)
    has_self = self_idx >= 0
    mask[rows[has_self], self_idx[has_self]] = True
    if mask_target:
        mask[rows, target] = True
    return torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=1) - positive




# ---------------------------------------------------------------------------------------
# MoCo machinery: EMA update and key queue                          [issue: MoCo machinery]
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update_(target, online, momentum: float) -> None:
    """EMA (momentum) update, one tensor at a time (the Python loop of MoCo / BYOL code):
    ``t <- lerp(t, o, 1 - momentum)`` = momentum * t + (1 - momentum) * o for every pair, in
    place. Equal to ``torch._foreach_lerp_(target, online, 1 - momentum)``.

    (Official MoCo writes ``p_k.data = p_k.data * m + p_q.data * (1. - m)``: the same value up
    to rounding; lerp is exact at m = 0 and m = 1.)

    Args:
        target: sequence of tensors updated in place.
        online: sequence of tensors of the same shapes; a lower-precision online dtype is
            widened to the target's first (exact).
        momentum: m in [0, 1].
    """
    w = 1.0 - momentum
    for t, o in zip(target, online):
        t.lerp_(o.to(t.dtype), w)


@torch.no_grad()
def moco_enqueue_(buffer: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Ring-buffer enqueue with the pointer kept on the device (no host sync, so it works in
    ``torch.compile(fullgraph=True)``): key i goes to slot (ptr + i) mod size; with
    B > size only the newest ``size`` keys remain; then ptr <- (ptr + B) mod size.

    Args:
        buffer: (size, dim) queue, written in place.
        ptr: 0-dim int64 write pointer in [0, size), on ``buffer``'s device, updated in place.
        keys: (B, dim) keys, stored as given (cast to the buffer's dtype).
    """
    size, batch = buffer.shape[0], keys.shape[0]
    first = max(batch - size, 0)
    rows = torch.arange(first, batch, device=buffer.device)
    slots = (ptr + rows) % size
    buffer.index_copy_(0, slots, keys[first:].to(buffer.dtype))
    ptr.copy_((ptr + batch) % size)


@torch.no_grad()
def moco_enqueue_official_(buffer: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """The official MoCo enqueue (``moco/builder.py: _dequeue_and_enqueue``) in index-
    assignment style: the pointer is read back to the host (``int(ptr)``: a device sync,
    and a graph break under ``torch.compile``) and the keys are written with slice
    assignments. Official MoCo asserts ``size % B == 0``; this version wraps around in two
    slices instead, with the same result as :func:`moco_enqueue_`.
    """
    size, batch = buffer.shape[0], keys.shape[0]
    p = int(ptr)
    if batch >= size:  # only the newest `size` keys survive, the last one ends at p + B - 1
        keys = keys[batch - size:]
        p = (p + batch - size) % size
    n = keys.shape[0]
    head = min(n, size - p)
    buffer[p:p + head] = keys[:head]
    if head < n:
        buffer[:n - head] = keys[head:]
    ptr.fill_((int(ptr) + batch) % size)



# ---------------------------------------------------------------------------------------
# SSL augmentation                                                  [issue: augmentation]
# ---------------------------------------------------------------------------------------
#
# The spec of fastssl.augment: per-sample parameters (fastssl.augment.AugmentParams) applied
# image by image in float32 [0, 1]. Every formula follows torchvision v2 (written out below,
# op by op in a fixed evaluation order, so that the fused C++ / Triton kernels, which evaluate
# the same operations in the same order without FMA contraction, agree to ~1 ulp).

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def rgb_to_gray(img: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] -> [..., H, W]: 0.2989 R + 0.587 G + 0.114 B (torchvision), summed
    left to right."""
    r, g, b = img.unbind(-3)
    return r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]


def bilinear_coords(src_size: int, out_size: int, flip: bool = False):
    """Source indices and weights of a bilinear resize from ``src_size`` to ``out_size`` taps
    (``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``), in float32:
    ``src = max(scale * (x + 0.5) - 0.5, 0)`` with ``scale = src_size / out_size``,
    ``i0 = floor(src)``, ``i1 = min(i0 + 1, src_size - 1)``, ``w1 = src - i0``, ``w0 = 1 - w1``.
    ``flip`` reverses the output order (a horizontal flip after the resize, folded into the
    index)."""
    scale = torch.tensor(src_size, dtype=torch.float32) / torch.tensor(out_size,
                                                                       dtype=torch.float32)
    x = torch.arange(out_size, dtype=torch.float32)
    if flip:
        x = x.flip(0)
    src = (scale * (x + 0.5) - 0.5).clamp_min(0.0)
    i0 = src.to(torch.int64)
    i1 = i0 + (i0 < src_size - 1).to(torch.int64)
    w1 = src - i0.to(torch.float32)
    return i0, i1, 1.0 - w1, w1


def resized_crop(img: torch.Tensor, top: int, left: int, height: int, width: int,
                 out_size: int, flip: bool = False) -> torch.Tensor:
    """Crop [3, H, W] float to the box, bilinear-resize it to out_size^2, optionally flip.
    Horizontal interpolation first, then vertical: ``(a w0x + b w1x) w0y + (c w0x + d w1x) w1y``.
    """
    crop = img[:, top:top + height, left:left + width]
    x0, x1, wx0, wx1 = (t.to(img.device) for t in bilinear_coords(width, out_size, flip))
    y0, y1, wy0, wy1 = (t.to(img.device) for t in bilinear_coords(height, out_size))
    rows = crop[:, :, x0] * wx0 + crop[:, :, x1] * wx1  # [3, height, out]
    return rows[:, y0, :] * wy0[:, None] + rows[:, y1, :] * wy1[:, None]


def adjust_brightness(img: torch.Tensor, factor) -> torch.Tensor:
    """``clamp(x * f, 0, 1)`` (torchvision v2 adjust_brightness)."""
    return (img * factor).clamp(0.0, 1.0)


def adjust_contrast(img: torch.Tensor, factor) -> torch.Tensor:
    """``clamp(x * f + mean * (1 - f), 0, 1)``; mean = the mean of the image's gray
    (torchvision v2 adjust_contrast), here accumulated in float64 and rounded to float32 once
    (a deterministic reduction that the fused kernels reproduce)."""
    mean = rgb_to_gray(img).double().mean(dim=(-2, -1)).float()
    return (img * factor + mean * (1.0 - factor)).clamp(0.0, 1.0)


def adjust_saturation(img: torch.Tensor, factor) -> torch.Tensor:
    """``clamp(x * f + gray * (1 - f), 0, 1)`` (torchvision v2 adjust_saturation)."""
    gray = rgb_to_gray(img)[..., None, :, :]
    return (img * factor + gray * (1.0 - factor)).clamp(0.0, 1.0)


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """torchvision v2 ``_rgb_to_hsv`` (h, s in [0, 1], v = max), same operation order."""
    r, g, b = img.unbind(-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    zero = torch.zeros_like(maxc)
    hr = torch.where(maxc == r, bc - gc, zero)
    hg = torch.where((maxc == g) & (maxc != r), (rc + 2.0) - bc, zero)
    hb = torch.where((maxc != g) & (maxc != r), (gc + 4.0) - rc, zero)
    h = (hr + hg) + hb
    h = h * (1.0 / 6.0) + 1.0
    h = h - torch.floor(h)  # fmod(h, 1) for h >= 0, exactly
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """torchvision v2 ``_hsv_to_rgb``, same operation order."""
    h, s, v = hsv.unbind(-3)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(torch.int64) % 6
    sxf = s * f
    one_minus_s = 1.0 - s
    q = ((1.0 - sxf) * v).clamp(0.0, 1.0)
    t = ((sxf + one_minus_s) * v).clamp(0.0, 1.0)
    p = (one_minus_s * v).clamp(0.0, 1.0)
    # sector i -> (r, g, b): 0 (v,t,p) 1 (q,v,p) 2 (p,v,t) 3 (p,q,v) 4 (t,p,v) 5 (v,p,q)
    table = torch.stack([torch.stack(c, dim=0) for c in (
        (v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], dim=0)  # [3, 6, ...]
    idx = i.unsqueeze(0).unsqueeze(0).expand(3, 1, *i.shape)
    return table.gather(1, idx).squeeze(1).movedim(0, -3)


def adjust_hue(img: torch.Tensor, factor) -> torch.Tensor:
    """RGB -> HSV, ``h = frac(h + f)``, -> RGB (torchvision v2 adjust_hue). A factor of
    exactly 0 is the identity (the round trip is skipped, as torchvision skips a hue of 0)."""
    if float(factor) == 0.0:
        return img
    hsv = rgb_to_hsv(img)
    h, s, v = hsv.unbind(-3)
    h = h + factor
    h = h - torch.floor(h)
    return hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def gaussian_blur(img: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of [C, H, W] with 1-D ``taps`` (K odd), reflect padding
    (torchvision pads with mode="reflect"); horizontal pass then vertical, each summing
    ``taps[0] * x[.. - K//2] + taps[1] * x[.. - K//2 + 1] + ...`` in tap order."""
    k = taps.shape[0]
    pad = k // 2
    height, width = img.shape[-2:]
    x = F.pad(img[None], (pad, pad, 0, 0), mode="reflect")[0] if pad else img
    acc = taps[0] * x[..., 0:width]
    for j in range(1, k):
        acc = acc + taps[j] * x[..., j:j + width]
    x = F.pad(acc[None], (0, 0, pad, pad), mode="reflect")[0] if pad else acc
    out = taps[0] * x[..., 0:height, :]
    for j in range(1, k):
        out = out + taps[j] * x[..., j:j + height, :]
    return out


def solarize(img: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x >= threshold -> 1 - x`` (torchvision v2 solarize on floats)."""
    return torch.where(img >= threshold, 1.0 - img, img)


_COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def ssl_augment(images, params, out_size: int, mean: torch.Tensor, std: torch.Tensor,
                out_dtype: torch.dtype = torch.float32, rot=None) -> torch.Tensor:
    """Applies per-sample parameters (``fastssl.augment.AugmentParams``) to B images.

    Per sample b: uint8 -> float32 ``x / 255`` (floats are used as they are) -> crop
    ``params.crop[b]`` and bilinear resize to out_size^2, flipped if ``params.flip[b]`` ->
    if ``params.jitter[b]``: the ops ``params.order[b]`` (0 brightness, 1 contrast,
    2 saturation, 3 hue) with ``params.factors[b]``, each clamped to [0, 1] -> gray (3 equal
    channels) if ``params.gray[b]`` -> blur with ``params.taps[b]`` if ``params.blur[b]`` ->
    solarize if ``params.solarize[b]`` -> ``(x - mean) / std`` -> ``out_dtype``, then
    ``torch.rot90(x, rot[b])`` (counter-clockwise k x 90 degrees) if ``rot`` (B,) is given.

    Args:
        images: list (or batch) of B [3, H_i, W_i] uint8 or float images.
        params: AugmentParams of B samples.
        mean, std: (3,) float32.
    Returns:
        [B, 3, out_size, out_size] in ``out_dtype``.
    """
    out = []
    mean = mean.to(torch.float32).reshape(3, 1, 1)
    std = std.to(torch.float32).reshape(3, 1, 1)
    for b, im in enumerate(images):
        x = im.float() / 255.0 if im.dtype == torch.uint8 else im.float()
        top, left, height, width = (int(v) for v in params.crop[b])
        x = resized_crop(x, top, left, height, width, out_size, bool(params.flip[b]))
        if bool(params.jitter[b]):
            factors = params.factors[b].to(x.device)
            for op in params.order[b].tolist():
                x = _COLOR_OPS[op](x, factors[op])
        if bool(params.gray[b]):
            x = rgb_to_gray(x)[None].expand(3, -1, -1)
        if bool(params.blur[b]):
            x = gaussian_blur(x, params.taps[b].to(device=x.device, dtype=torch.float32))
        if bool(params.solarize[b]):
            x = solarize(x, params.solarize_threshold)
        x = (x - mean.to(x.device)) / std.to(x.device)
        if rot is not None and int(rot[b]) % 4:
            x = torch.rot90(x, int(rot[b]), dims=(-2, -1))
        out.append(x.to(out_dtype))
    return torch.stack(out, dim=0)


# ---------------------------------------------------------------------------------------
# BYOL / SimSiam negative cosine                                                [issue 14]
# ---------------------------------------------------------------------------------------


def negative_cosine(p: torch.Tensor, z: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """BYOL / SimSiam loss per row: 2 - 2 cos(p_i, z_i) = |p_hat_i - z_hat_i|^2, with a
    stop-gradient on z (``z.detach()``). p, z: (N, D); "mean" / "sum" over rows or "none"."""
    cos = (_l2_normalize(p) * _l2_normalize(z.detach())).sum(dim=1)
    loss = 2 - 2 * cos
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def symmetric_negative_cosine(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor,
                              z2: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """(negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2, row-wise before the reduction."""
    rows = (negative_cosine(p1, z2, reduction="none") +
            negative_cosine(p2, z1, reduction="none")) / 2
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


# ---------------------------------------------------------------------------------------
# Masked-token prediction head (BERT MLM)                                       [issue 14]
# ---------------------------------------------------------------------------------------


def masked_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      bias: torch.Tensor | None = None, ignore_index: int = -100,
                      reduction: str = "mean") -> torch.Tensor:
    """Output projection + cross-entropy over the vocabulary at the positions whose label is
    not ``ignore_index``: logits = hidden @ weight^T (+ bias), materialised in full.

    hidden (*, H), weight (V, H), labels (*), bias (V,). "mean" over the non-ignored positions
    (0 with a zero gradient when every position is ignored, where F.cross_entropy gives NaN),
    "sum", or "none" (shape of labels, 0 at ignored positions)."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    flat = labels.reshape(-1).long()
    rows = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return rows.reshape(labels.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (flat != ignore_index).sum().clamp(min=1)

# Redundancy reduction: Barlow Twins and VICReg                     [issue 14, item 2]
# ---------------------------------------------------------------------------------------


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambda_: float = 5e-3, *,
                 normalize: str = "batch") -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, https://arxiv.org/abs/2103.03230), lightly's
    conventions: each feature standardised over the batch (mean, unbiased std, no eps),
    C = z1n^T z2n / N (D x D), loss = sum_i (1 - C_ii)^2 + lambda_ sum_{i != j} C_ij^2.
    ``normalize="none"`` uses z1, z2 as they are (C = z1^T z2 / N)."""
    n, d = z1.shape
    if normalize == "batch":
        z1 = (z1 - z1.mean(dim=0)) / z1.std(dim=0)
        z2 = (z2 - z2.mean(dim=0)) / z2.std(dim=0)
    c = z1.T @ z2 / n
    eye = torch.eye(d, dtype=torch.bool, device=c.device)
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = c.masked_fill(eye, 0).pow(2).sum()
    return on_diag + lambda_ * off_diag


def _vicreg_variance(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.relu(1 - torch.sqrt(x.var(dim=0) + eps)).mean()


def _vicreg_covariance(x: torch.Tensor) -> torch.Tensor:
    n, d = x.shape
    x = x - x.mean(dim=0)
    cov = x.T @ x / (n - 1)
    eye = torch.eye(d, dtype=torch.bool, device=cov.device)
    return cov.masked_fill(eye, 0).pow(2).sum() / d


def vicreg(z1: torch.Tensor, z2: torch.Tensor, sim: float = 25.0, var: float = 25.0,
           cov: float = 1.0, *, eps: float = 1e-4) -> torch.Tensor:
    """VICReg (Bardes et al. 2022, https://arxiv.org/abs/2105.04906), lightly's conventions:
    sim * mean((z1 - z2)^2) (over N * D)
    + var * (v(z1) + v(z2)) / 2, v(z) = mean_d relu(1 - sqrt(Var_d(z) + eps)) (unbiased Var)
    + cov * (c(z1) + c(z2)), c(z) = sum_{i != j} K_ij^2 / D, K the unbiased covariance."""
    invariance = (z1 - z2).pow(2).mean()
    variance = (_vicreg_variance(z1, eps) + _vicreg_variance(z2, eps)) / 2
    covariance = _vicreg_covariance(z1) + _vicreg_covariance(z2)
    return sim * invariance + var * variance + cov * covariance

# DINO / iBOT prototype head (self-distillation over K prototypes)
# ---------------------------------------------------------------------------------------


def dino_head_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The last layer of DINO's head (``DINOHead`` with ``norm_last_layer=True``): the
    bottleneck output L2-normalised (``F.normalize``, eps = 1e-12), then a weight-normalised
    linear layer with g = 1, i.e. cosines with the prototypes V_k / ||V_k||: [rows, K]."""
    return F.normalize(h, dim=-1) @ (weight / weight.norm(dim=1, keepdim=True)).t()


def sinkhorn_knopp_teacher(teacher_logits: torch.Tensor, teacher_temp, iterations: int = 3
                           ) -> torch.Tensor:
    """DINOv2's ``SinkhornKnopp`` teacher, in the log domain (the exponent form overflows at
    small temperatures: exp(1 / 0.01) = inf in fp32, dinov2 PR #583).

    With L = logits / temp ([B, K]): Q = exp(L), normalised to sum 1; then ``iterations``
    times: each prototype column k is normalised to sum 1/K, then each sample row to sum 1/B;
    finally Q * B (each row a distribution over K). In logs, with column log-scalings c and
    row log-scalings a:  c_k = -log K - LSE_b(L_bk + a_b),  a_b = -log B - LSE_k(L_bk + c_k),
    and the result is softmax_k(L_bk + c_k) for the last c (the last row step only
    normalises the rows, which the softmax does). Returns [B, K] probabilities."""
    logits = teacher_logits / teacher_temp
    rows, k = logits.shape
    a = logits.new_zeros(rows, 1)
    c = logits.new_zeros(1, k)
    for _ in range(iterations):
        c = -torch.logsumexp(logits + a, dim=0, keepdim=True) - math.log(k)
        a = -torch.logsumexp(logits + c, dim=1, keepdim=True) - math.log(rows)
    return torch.softmax(logits + c, dim=1)


def dino_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, weight_student: torch.Tensor,
              weight_teacher: torch.Tensor, center: torch.Tensor, *, n_global: int = 2,
              student_temp=0.1, teacher_temp=0.04, center_momentum: float = 0.9,
              teacher: str = "centering", sinkhorn_iters: int = 3):
    """DINO's loss (Caron et al. 2021, https://arxiv.org/abs/2104.14294), materialising every
    [rows, K] matrix, as ``DINOLoss.forward`` + ``update_center`` of facebookresearch/dino.

    student_h [n_crops * B, d] and teacher_h [n_global * B, d] are crop-major bottleneck
    outputs (crop c, sample b at row c * B + b; the first n_global student crops are the
    global crops the teacher saw). Logits: :func:`dino_head_logits`. Teacher:
    softmax((t - center) / teacher_temp) ("centering") or :func:`sinkhorn_knopp_teacher`
    ("sinkhorn"), without gradient. Loss: the mean over the pairs (teacher crop i, student crop
    v != i) of the batch mean of -sum_k P_t log_softmax(s / student_temp). New centre:
    m * center + (1 - m) * (mean over teacher rows of t). Returns (loss, new_center)."""
    b = teacher_h.shape[0] // n_global
    n_crops = student_h.shape[0] // b
    student_out = dino_head_logits(student_h, weight_student) / student_temp
    with torch.no_grad():
        teacher_out = dino_head_logits(teacher_h, weight_teacher)
        if teacher == "sinkhorn":
            q_all = sinkhorn_knopp_teacher(teacher_out, teacher_temp, sinkhorn_iters)
        else:
            q_all = torch.softmax((teacher_out - center) / teacher_temp, dim=-1)
    student_chunks = student_out.chunk(n_crops)
    teacher_chunks = q_all.chunk(n_global)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_chunks):
        for v in range(n_crops):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_chunks[v], dim=-1), dim=-1)
            total_loss = total_loss + loss.mean()
            n_loss_terms += 1
    total_loss = total_loss / n_loss_terms
    with torch.no_grad():
        batch_center = teacher_out.sum(dim=0, keepdim=True) / teacher_out.shape[0]
        new_center = (center * center_momentum
                      + batch_center.reshape(center.shape) * (1 - center_momentum))
    return total_loss, new_center


def ibot_patch_loss(student_h: torch.Tensor, teacher_h: torch.Tensor,
                    weight_student: torch.Tensor, weight_teacher: torch.Tensor,
                    center: torch.Tensor, *, weights: torch.Tensor | None = None,
                    student_temp=0.1, teacher_temp=0.04, center_momentum: float = 0.9,
                    teacher: str = "centering", sinkhorn_iters: int = 3):
    """iBOT's masked-patch loss (Zhou et al. 2022, https://arxiv.org/abs/2111.07832): row r of
    student_h and row r of teacher_h are the same masked patch (student sees it masked);
    loss = sum_r w_r * (-sum_k P_t,r log P_s,r), with w_r = ``weights`` (default 1/M: the mean
    over the M patch rows; DINOv2 passes 1/(masked patches of the image) / images). Same head
    and teacher as :func:`dino_loss`. Returns (loss, new_center)."""
    student_out = dino_head_logits(student_h, weight_student) / student_temp
    with torch.no_grad():
        teacher_out = dino_head_logits(teacher_h, weight_teacher)
        if teacher == "sinkhorn":
            q = sinkhorn_knopp_teacher(teacher_out, teacher_temp, sinkhorn_iters)
        else:
            q = torch.softmax((teacher_out - center) / teacher_temp, dim=-1)
    rows = torch.sum(-q * F.log_softmax(student_out, dim=-1), dim=-1)
    loss = rows.mean() if weights is None else (rows * weights.to(rows.dtype)).sum()
    with torch.no_grad():
        batch_center = teacher_out.sum(dim=0, keepdim=True) / teacher_out.shape[0]
        new_center = (center * center_momentum
                      + batch_center.reshape(center.shape) * (1 - center_momentum))
    return loss, new_center

# Masked patch reconstruction loss (MAE)
# ---------------------------------------------------------------------------------------


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """MAE's ``patchify``: (B, C, H, W) -> (B, L, p·p·C), L = (H/p)(W/p).

    Patch ``l = i·(W/p) + j`` covers rows ``i·p .. i·p+p-1`` and columns ``j·p .. j·p+p-1``
    (row-major over the patch grid); inside a patch, value ``(u·p + v)·C + c`` is pixel
    (row u, column v) of channel c (MAE's einsum ``'nchpwq->nhwpqc'``: channel fastest).
    MAE asserts H == W; the same order holds for H != W."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def masked_patch_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, *,
                      patch_size: int, norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``forward_loss`` (He et al. 2022), computed in ``promote_types(pred, images)``:

    target = patchify(images); with ``norm_pix`` each patch becomes
    (target - mean) / sqrt(var + eps), var the unbiased variance (``Tensor.var``'s default,
    as MAE uses it); loss per patch = mean of (pred - target)^2 over its p·p·C values;
    result = sum(loss · mask) / sum(mask).

    Two documented departures from MAE's code, both where MAE's result is NaN: a mask summing
    to 0 gives 0 (with zero gradients; MAE divides 0 by 0), and patches whose mask is 0 are
    left out (``torch.where``) rather than multiplied by 0, so a NaN or inf in a patch that
    is not predicted does not reach the loss value (its gradient there is still NaN: autograd
    multiplies the zero by it; the fused kernels never read such a patch and give 0).
    """
    dtype = torch.promote_types(pred.dtype, images.dtype)
    target = patchify(images.to(dtype), patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred.to(dtype) - target) ** 2).mean(dim=-1)
    weight = mask.to(dtype)
    weighted = torch.where(weight != 0, per_patch * weight, torch.zeros_like(per_patch))
    total = weight.sum()
    return weighted.sum() / torch.where(total != 0, total, torch.ones_like(total))

# Pretext tasks: MAE / SimMIM masking                               [issue: pretext tasks]
# ---------------------------------------------------------------------------------------
#
# fastssl.mae_mask draws each row's permutation with a counter-based hash (no stateful RNG),
# so the C++ kernel, the Triton kernel and this reference give the same permutation bit for
# bit from the same seed. All arithmetic here is on int64 tensors holding uint32 values; a
# 32-bit product is formed from 16-bit halves so that no int64 product overflows.

_U32 = 0xFFFFFFFF
MAE_ROW_MUL = 0x9E3779B9  # golden-ratio constant: spreads row indices before mixing
MAE_STEP_MUL = 0x85EBCA6B


def _mul32(h, c: int):
    """``(h * c) mod 2**32`` for int64 tensors holding uint32 values ``h``."""
    lo = (h & 0xFFFF) * c
    hi = (((h >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _U32


def fmix32(h):
    """MurmurHash3's 32-bit finaliser (a bijection on uint32 with full avalanche)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def counter_hash(key, counter):
    """``fmix32((key + counter * 0x85EBCA6B) mod 2**32)``: value number ``counter`` (< 2**32)
    of the sample with key ``key`` (ints or int64 tensors holding uint32 values). mae_mask's
    shuffle steps and the denoising noise both draw from it."""
    return fmix32((key + _mul32(counter, MAE_STEP_MUL)) & _U32)


def mae_row_keys(seed: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) uint32 row keys: ``fmix32(b * 0x9E3779B9 + seed[1]) ^ seed[0]`` (mod 2**32)."""
    s = seed.to(torch.int64).cpu()
    b = torch.arange(batch, dtype=torch.int64)
    return fmix32((_mul32(b, MAE_ROW_MUL) + (int(s[1]) & _U32)) & _U32) ^ (int(s[0]) & _U32)


def mae_mask(seed: torch.Tensor, batch: int, num_patches: int, num_keep: int):
    """MAE's random masking, the spec of ``fastssl::mae_mask``.

    Row b's permutation ``ids_shuffle`` is Durstenfeld's Fisher-Yates shuffle of
    ``0..L-1``: for i = L-1 down to 1, ``u = counter_hash(key_b, i)``
    (``key_b`` from :func:`mae_row_keys`), ``j = (u * (i + 1)) >> 32`` (in 0..i), swap
    positions i and j. Then, as MAE uses them: ``ids_keep = ids_shuffle[:, :num_keep]``,
    ``ids_restore = argsort(ids_shuffle)`` (the inverse permutation),
    ``mask[b, n] = ids_restore[b, n] >= num_keep`` (True = masked: MAE's 1 = remove).

    Vectorised over the rows (a loop over the L - 1 steps); no randperm.

    Returns:
        (mask [B, L] bool, ids_keep [B, num_keep] int64, ids_restore [B, L] int64), CPU.
    """
    key = mae_row_keys(seed, batch)
    rows = torch.arange(batch)
    perm = torch.arange(num_patches, dtype=torch.int64).repeat(batch, 1)
    for i in range(num_patches - 1, 0, -1):
        u = counter_hash(key, i)
        j = (u * (i + 1)) >> 32
        at_i = perm[:, i].clone()
        perm[:, i] = perm[rows, j]
        perm[rows, j] = at_i
    ids_restore = torch.empty_like(perm)
    ids_restore.scatter_(1, perm, torch.arange(num_patches, dtype=torch.int64).repeat(batch, 1))
    return ids_restore >= num_keep, perm[:, :num_keep].contiguous(), ids_restore


# Pretext tasks: denoising noise                                    [issue: pretext tasks]
# ---------------------------------------------------------------------------------------
#
# PretextAugment(task="denoising") draws its noise from the same counter-based hash as
# mae_mask (no stateful RNG, no torch.randn of the batch): value (sample b, counter c) is
# :func:`counter_hash` ``(key_b, c)`` with ``key_b`` from :func:`mae_row_keys`.
# The Gaussian is Box-Muller with a logarithm and a sine / cosine written out as float32
# polynomials below, so the C++ kernel (-ffp-contract=off), the Triton interpreter and this
# reference perform the same IEEE operations in the same order and agree bit for bit (on a
# GPU the compiler may fuse multiply-adds: a few ulps). Every constant is a float32 value.

_NOISE_SQRT2 = 1.4142135381698608  # float32(sqrt 2)
_NOISE_LN2_HI = 0.693359375  # ln 2 = HI + LO; e * HI is exact for |e| < 2^15
_NOISE_LN2_LO = -0.00021219444170128554
_NOISE_HALF_PI = 1.5707963705062866
# ln m = 2 s (1 + s^2/3 + s^4/5 + ... + s^10/11), s = (m - 1) / (m + 1), |s| <= 0.172 for m in
# [sqrt(2)/2, sqrt(2)]: truncation error 2 s^13 / 13 < 2e-11.
_NOISE_LOG_C = (0.3333333432674408, 0.20000000298023224, 0.1428571492433548,
                0.1111111119389534, 0.09090909361839294)  # 1/3, 1/5, ..., 1/11
# Taylor series on [0, pi/2]: truncation errors 7e-10 (sin, to psi^13) and 7e-11 (cos, psi^14).
_NOISE_SIN_C = (-0.1666666716337204, 0.008333333767950535, -0.00019841270113829523,
                2.7557318844628753e-06, -2.5052107943679403e-08, 1.6059044372074283e-10)
_NOISE_COS_C = (-0.5, 0.0416666679084301, -0.0013888889225199819, 2.4801587642286904e-05,
                -2.755731998149713e-07, 2.0876755879584152e-09, -1.147074536050896e-11)


def _horner(x: torch.Tensor, coeffs) -> torch.Tensor:
    """``((c[-1] x + c[-2]) x + ... + c[0]) x``: float32, one rounding per operation."""
    p = x * coeffs[-1] + coeffs[-2]
    for c in reversed(coeffs[:-2]):
        p = p * x + c
    return p * x


def box_muller_pairs(key: int, num_pairs: int):
    """Pair j of a sample: two standard normals ``(z0, z1)`` from counters 2j and 2j + 1.

    ``h1, h2`` = :func:`counter_hash` of 2j, 2j + 1; ``u1 = ((h1 >> 8) + 1) 2^-24`` in (0, 1];
    ``r = sqrt(-2 ln u1)`` (so |z| <= 5.77: the 24-bit uniform truncates the tails at
    P = 6e-8); ``psi = t pi/2``, t the 22 bits 8..29 of h2 plus a half (uniform in (0, 1));
    ``z0 = +-r cos psi``, ``z1 = +-r sin psi`` with the signs bits 31 and 30 of h2 (the two
    signs pick the quadrant: the angle is uniform on the circle). ln, cos, sin: the float32
    polynomials above; sqrt and the one division are IEEE (correctly rounded)."""
    f32 = torch.float32
    c = torch.arange(num_pairs, dtype=torch.int64) * 2
    h1, h2 = counter_hash(key, c), counter_hash(key, c + 1)
    u1 = ((h1 >> 8) + 1).to(f32) * 2.0 ** -24
    bits = u1.view(torch.int32).to(torch.int64)
    e = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(torch.int32).view(f32)
    big = m > _NOISE_SQRT2
    m = torch.where(big, m * 0.5, m)
    e = (e + big.to(torch.int64)).to(f32)
    s = (m - 1.0) / (m + 1.0)
    p = _horner(s * s, _NOISE_LOG_C)
    ln_m = (s + s * p) * 2.0
    ln_u = e * _NOISE_LN2_HI + (ln_m + e * _NOISE_LN2_LO)
    # Correctly rounded sqrt (what IEEE sqrtf gives): torch's float32 sqrt can be 1 ulp off
    # (vectorised through SLEEF); the float64 root rounds to the correctly rounded float32.
    r = torch.sqrt((ln_u * -2.0).double()).float()
    t = (((h2 >> 8) & 0x3FFFFF).to(f32) + 0.5) * 2.0 ** -22
    psi = t * _NOISE_HALF_PI
    q = psi * psi
    sin = psi + psi * _horner(q, _NOISE_SIN_C)
    cos = _horner(q, _NOISE_COS_C) + 1.0
    z0, z1 = r * cos, r * sin
    z0 = torch.where(((h2 >> 31) & 1) == 1, -z0, z0)
    z1 = torch.where(((h2 >> 30) & 1) == 1, -z1, z1)
    return z0, z1


def pretext_noise(clean: torch.Tensor, amount: torch.Tensor, seed: torch.Tensor,
                  masking: bool, fill: float) -> torch.Tensor:
    """Denoising's corruption of ``clean`` [B, C, H, W], the spec of ``fastssl::pretext_noise``.

    * Gaussian (``masking=False``; ``amount`` [B, C] float32, the noise std per sample and
      channel in ``clean``'s units): sample b's C·H·W values, flattened, get the n = C·H·W
      normals of ``half = ceil(n / 2)`` Box-Muller pairs (:func:`box_muller_pairs`): z0 of
      pair j at position j, z1 at position j + half (dropped if that is n). out =
      ``float32(clean) + amount[b, c] * z`` (product then sum, each rounded to float32), then
      cast to ``clean``'s dtype (round to nearest even).
    * masking (``masking=True``; ``amount`` [B, 1] float32, the drop probability): pixel p =
      y W + x of sample b is dropped, in every channel, iff ``(counter_hash(key_b, p) >> 8)
      2^-24 < amount[b, 0]``; dropped values become ``fill`` (rounded to float32, then to
      ``clean``'s dtype).

    ``key_b`` is :func:`mae_row_keys` of ``seed`` (2 int64 values, their low 32 bits used).
    """
    B, C, H, W = clean.shape
    keys = mae_row_keys(seed, B).tolist()
    amount = amount.detach().to("cpu", torch.float32)
    x = clean.detach().cpu()
    out = torch.empty_like(x)
    n, plane = C * H * W, H * W
    for b in range(B):
        if masking:
            u = (counter_hash(keys[b], torch.arange(plane, dtype=torch.int64)) >> 8).to(
                torch.float32) * 2.0 ** -24
            drop = (u < amount[b, 0]).view(1, H, W)
            fill_v = torch.tensor(float(torch.tensor(fill, dtype=torch.float32)),
                                  dtype=x.dtype)
            out[b] = torch.where(drop, fill_v, x[b])
        else:
            half = (n + 1) // 2
            z0, z1 = box_muller_pairs(keys[b], half)
            z = torch.cat([z0, z1])[:n].view(C, H, W)
            noisy = x[b].to(torch.float32) + amount[b].view(C, 1, 1) * z
            out[b] = noisy.to(x.dtype)
    return out.to(clean.device)
