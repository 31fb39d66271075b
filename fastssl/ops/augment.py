"""Fused SSL augmentation in Triton (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

Spec: :func:`fastssl.reference.ssl_augment`; parameters: :class:`fastssl.augment.AugmentParams`.
The chain per sample: crop + bilinear resize (flip folded into the column index) -> colour
jitter in the sample's order, clamped after each op -> gray -> blur (separable, reflect
padding) -> solarize -> (x - mean) / std -> cast.

Four launches, each over (sample, block of output pixels); programs of a sample whose flags
make a pass unnecessary return at once:

1. ``augment_resize_kernel``: gathers the 4 bilinear neighbours per pixel and channel (uint8
   or fp32 input), applies the colour ops that come *before* contrast in the sample's order
   and, for jittered samples, writes one fp64 partial sum of the gray image per block (the
   contrast mean: a deterministic two-level reduction, no atomics). Samples without jitter are
   finished here (gray, and without blur the final store).
   read: 12 input bytes (uint8) per output pixel; write: 3 fp32 (or the output) per pixel.
2. ``augment_contrast_kernel`` (jittered samples): mean = sum of the block partials in a fixed
   order / out^2; contrast and the ops after it; gray; final store unless blurred.
3. ``augment_blur_h_kernel`` / 4. ``augment_blur_v_kernel`` (blurred samples): K taps each,
   reflect indices; the vertical pass fuses solarize, normalize and the cast into its store.

Rotation (the pretext task, optional ``rot`` (B,) of 0..3): every output store goes through
``_rotated``, which maps pixel (y, x) of the upright view to its place in
``torch.rot90(view, rot)``; the work buffers stay upright, so it costs no pass.

Comparability (docs/DESIGN.md, section 4.8): IEEE division via ``tl.div_rn``, launches with
``enable_fp_fusion=False`` (no FMA contraction), and the reference's operation order, so the
result equals the reference and the C++ kernel to ~1 ulp.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _library
from ._triton_utils import INTERPRET

# Output pixels per program. 1024: 8 warps x 128 pixels; every op is elementwise or a gather,
# so the block only has to be large enough to cover the latency of the gathers.
BLOCK = 1024
NUM_WARPS = 8
# flags columns (pack_params): flip, jitter, gray, blur, solarize
_FLIP, _JITTER, _GRAY, _BLUR, _SOLARIZE = 0, 1, 2, 3, 4


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _gray(r, g, b):
    return r * 0.2989 + g * 0.587 + b * 0.114


@triton.jit
def _hue(r, g, b, shift):
    # torchvision v2 _rgb_to_hsv -> h = frac(h + shift) -> _hsv_to_rgb, op for op.
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = tl.div_rn(cr, tl.where(eqc, 1.0, maxc))
    crd = tl.where(eqc, 1.0, cr)
    rc = tl.div_rn(maxc - r, crd)
    gc = tl.div_rn(maxc - g, crd)
    bc = tl.div_rn(maxc - b, crd)
    not_r = maxc != r
    is_g = maxc == g
    hr = tl.where(not_r, 0.0, bc - gc)
    hg = tl.where(is_g & not_r, (rc + 2.0) - bc, 0.0)
    hb = tl.where((maxc != g) & not_r, (gc + 4.0) - rc, 0.0)
    h = (hr + hg) + hb
    h = h * 0.16666667163372040 + 1.0  # float32(1/6)
    h = h - tl.floor(h)
    h = h + shift
    h = h - tl.floor(h)
    v = maxc
    h6 = h * 6.0
    fi = tl.floor(h6)
    f = h6 - fi
    sector = tl.where(fi >= 6.0, fi - 6.0, fi)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = _clamp01((1.0 - sxf) * v)
    t = _clamp01((sxf + one_minus_s) * v)
    p = _clamp01(one_minus_s * v)
    # sector -> (r, g, b): 0 (v,t,p) 1 (q,v,p) 2 (p,v,t) 3 (p,q,v) 4 (t,p,v) 5 (v,p,q)
    s0 = sector == 0.0
    s1 = sector == 1.0
    s2 = sector == 2.0
    s3 = sector == 3.0
    s4 = sector == 4.0
    s5 = sector == 5.0
    ro = tl.where(s0 | s5, v, tl.where(s1, q, tl.where(s4, t, p)))
    go = tl.where(s1 | s2, v, tl.where(s0, t, tl.where(s3, q, p)))
    bo = tl.where(s3 | s4, v, tl.where(s2, t, tl.where(s5, q, p)))
    return ro, go, bo


@triton.jit
def _color_op(op, f, m1, r, g, b):
    # One jitter op (0 brightness, 1 contrast, 2 saturation, 3 hue), clamped to [0, 1].
    if op == 0:
        r = _clamp01(r * f)
        g = _clamp01(g * f)
        b = _clamp01(b * f)
    elif op == 1:
        r = _clamp01(r * f + m1)
        g = _clamp01(g * f + m1)
        b = _clamp01(b * f + m1)
    elif op == 2:
        gm = _gray(r, g, b) * (1.0 - f)
        r = _clamp01(r * f + gm)
        g = _clamp01(g * f + gm)
        b = _clamp01(b * f + gm)
    else:
        if f != 0.0:  # a hue shift of exactly 0 is skipped (the spec)
            r, g, b = _hue(r, g, b, f)
    return r, g, b


@triton.jit
def _to_bf16_rne(y):
    # fp32 -> bf16, round to nearest even, on the bits (finite values). Only used under the
    # interpreter, whose fp32 -> bf16 cast truncates; on a GPU the cast is cvt.rn.bf16.f32.
    bits = y.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _rotated(offs, out_size, rot):
    # Where pixel (y, x) of the unrotated view lands in torch.rot90(view, rot): the rotation
    # is folded into the store index, so it costs no pass of its own.
    y = offs // out_size
    x = offs % out_size
    n1 = out_size - 1
    dy = tl.where(rot == 1, n1 - x, tl.where(rot == 2, n1 - y, tl.where(rot == 3, x, y)))
    dx = tl.where(rot == 1, y, tl.where(rot == 2, n1 - x, tl.where(rot == 3, n1 - y, x)))
    return dy * out_size + dx


@triton.jit
def _store_final(out_ptr, base, plane, offs, mask, r, g, b, solarize, thr, mean_ptr, std_ptr,
                 rot, out_size, MANUAL_BF16: tl.constexpr):
    # solarize -> (x - mean) / std -> cast, per channel, at the rotated position.
    offs = _rotated(offs, out_size, rot)
    for c in tl.static_range(3):
        x = r if c == 0 else (g if c == 1 else b)
        if solarize:
            x = tl.where(x >= thr, 1.0 - x, x)
        y = tl.div_rn(x - tl.load(mean_ptr + c), tl.load(std_ptr + c))
        if MANUAL_BF16:
            yo = _to_bf16_rne(y)
        else:
            yo = y.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + base + c * plane + offs, yo, mask=mask)


@triton.jit
def _bilinear(size, out_f, coord):
    # reference.bilinear_coords: src = max(scale * (x + 0.5) - 0.5, 0), scale = size / out.
    scale = tl.div_rn(size.to(tl.float32), out_f)
    src = tl.maximum(scale * (coord.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = src.to(tl.int32)  # truncation == floor for src >= 0
    i1 = i0 + (i0 < size - 1).to(tl.int32)
    w1 = src - i0.to(tl.float32)
    return i0, i1, 1.0 - w1, w1


@triton.jit
def _load_px(img_ptr, off, mask, IS_U8: tl.constexpr):
    v = tl.load(img_ptr + off, mask=mask, other=0)
    if IS_U8:
        return tl.div_rn(v.to(tl.float32), 255.0)
    return v.to(tl.float32)


@triton.jit
def _finish(r, g, bl, b, flags_ptr, work_ptr, out_ptr, out_base, plane, offs, mask, thr,
            mean_ptr, std_ptr, rot_ptr, out_size, MANUAL_BF16: tl.constexpr):
    """Shared last step of both colour kernels: grayscale, then either the work buffer (the
    sample is blurred next) or solarize + normalize + cast into the output."""
    if tl.load(flags_ptr + 5 * b + 2) != 0:
        r = _gray(r, g, bl)
        g = r
        bl = r
    if tl.load(flags_ptr + 5 * b + 3) != 0:
        tl.store(work_ptr + out_base + offs, r, mask=mask)
        tl.store(work_ptr + out_base + plane + offs, g, mask=mask)
        tl.store(work_ptr + out_base + 2 * plane + offs, bl, mask=mask)
    else:
        _store_final(out_ptr, out_base, plane, offs, mask, r, g, bl,
                     tl.load(flags_ptr + 5 * b + 4) != 0, thr, mean_ptr, std_ptr,
                     tl.load(rot_ptr + b), out_size, MANUAL_BF16)


@triton.jit
def augment_resize_kernel(img_ptr, img_off_ptr, hw_ptr, crop_ptr, flags_ptr, factors_ptr,
                          order_ptr, work_ptr, partial_ptr, out_ptr, mean_ptr, std_ptr,
                          rot_ptr, thr, out_size, n_blocks, IS_U8: tl.constexpr,
                          BLOCK: tl.constexpr,
                          MANUAL_BF16: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    plane = out_size * out_size
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < plane
    y = offs // out_size
    x = offs % out_size
    # 1. [Crop + resize] flip folded into the column index.
    H = tl.load(hw_ptr + 2 * b)
    W = tl.load(hw_ptr + 2 * b + 1)
    top = tl.load(crop_ptr + 4 * b)
    left = tl.load(crop_ptr + 4 * b + 1)
    ch = tl.load(crop_ptr + 4 * b + 2)
    cw = tl.load(crop_ptr + 4 * b + 3)
    flip = tl.load(flags_ptr + 5 * b) != 0
    jitter = tl.load(flags_ptr + 5 * b + 1) != 0
    out_f = out_size.to(tl.float32)
    xs = tl.where(flip, out_size - 1 - x, x)
    x0, x1, wx0, wx1 = _bilinear(cw, out_f, xs)
    y0, y1, wy0, wy1 = _bilinear(ch, out_f, y)
    base = tl.load(img_off_ptr + b)
    row0 = base + (top + y0).to(tl.int64) * W + left
    row1 = base + (top + y1).to(tl.int64) * W + left
    in_plane = H.to(tl.int64) * W
    r = tl.zeros([BLOCK], dtype=tl.float32)
    g = tl.zeros([BLOCK], dtype=tl.float32)
    bl = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.static_range(3):
        p00 = _load_px(img_ptr, c * in_plane + row0 + x0, mask, IS_U8)
        p01 = _load_px(img_ptr, c * in_plane + row0 + x1, mask, IS_U8)
        p10 = _load_px(img_ptr, c * in_plane + row1 + x0, mask, IS_U8)
        p11 = _load_px(img_ptr, c * in_plane + row1 + x1, mask, IS_U8)
        v = (p00 * wx0 + p01 * wx1) * wy0 + (p10 * wx0 + p11 * wx1) * wy1
        if c == 0:
            r = v
        elif c == 1:
            g = v
        else:
            bl = v
    # 2. [Colour ops before contrast] contrast needs this image's gray mean first.
    out_base = b.to(tl.int64) * 3 * plane
    if jitter:
        split = 0
        for step in tl.static_range(4):
            split = tl.where(tl.load(order_ptr + 4 * b + step) == 1, step, split)
        for step in tl.static_range(4):
            if step < split:
                op = tl.load(order_ptr + 4 * b + step)
                r, g, bl = _color_op(op, tl.load(factors_ptr + 4 * b + op), 0.0, r, g, bl)
        gray = tl.where(mask, _gray(r, g, bl), 0.0)
        tl.store(partial_ptr + b * n_blocks + blk, tl.sum(gray.to(tl.float64), axis=0))
        tl.store(work_ptr + out_base + offs, r, mask=mask)
        tl.store(work_ptr + out_base + plane + offs, g, mask=mask)
        tl.store(work_ptr + out_base + 2 * plane + offs, bl, mask=mask)
    else:
        # 3. [Finish] gray -> (blur: to the work buffer) or solarize + normalize + store.
        _finish(r, g, bl, b, flags_ptr, work_ptr, out_ptr, out_base, plane, offs, mask, thr,
                mean_ptr, std_ptr, rot_ptr, out_size, MANUAL_BF16)


@triton.jit
def augment_contrast_kernel(work_ptr, partial_ptr, flags_ptr, factors_ptr, order_ptr, out_ptr,
                            mean_ptr, std_ptr, rot_ptr, thr, out_size, n_blocks,
                            BLOCK: tl.constexpr, NB: tl.constexpr,
                            MANUAL_BF16: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    if tl.load(flags_ptr + 5 * b + 1) == 0:  # no jitter: finished by the resize kernel
        return
    plane = out_size * out_size
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < plane
    out_base = b.to(tl.int64) * 3 * plane
    r = tl.load(work_ptr + out_base + offs, mask=mask, other=0.0)
    g = tl.load(work_ptr + out_base + plane + offs, mask=mask, other=0.0)
    bl = tl.load(work_ptr + out_base + 2 * plane + offs, mask=mask, other=0.0)
    # 1. [Contrast mean] fp64 block partials, summed in a fixed order, rounded once to fp32.
    pb = tl.arange(0, NB)
    parts = tl.load(partial_ptr + b * n_blocks + pb, mask=pb < n_blocks, other=0.0)
    # fp64 `/` is IEEE division (div.rn.f64); tl.div_rn takes fp32 only.
    mean_gray = (tl.sum(parts, axis=0) / plane.to(tl.float64)).to(tl.float32)
    fc = tl.load(factors_ptr + 4 * b + 1)
    m1 = mean_gray * (1.0 - fc)
    # 2. [Contrast and the ops after it]
    split = 0
    for step in tl.static_range(4):
        split = tl.where(tl.load(order_ptr + 4 * b + step) == 1, step, split)
    for step in tl.static_range(4):
        if step >= split:
            op = tl.load(order_ptr + 4 * b + step)
            r, g, bl = _color_op(op, tl.load(factors_ptr + 4 * b + op), m1, r, g, bl)
    # 3. [Finish]
    _finish(r, g, bl, b, flags_ptr, work_ptr, out_ptr, out_base, plane, offs, mask, thr,
            mean_ptr, std_ptr, rot_ptr, out_size, MANUAL_BF16)


@triton.jit
def _reflect(i, n):
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= n, 2 * n - 2 - i, i)


@triton.jit
def augment_blur_h_kernel(work_ptr, tmp_ptr, flags_ptr, taps_ptr, out_size, K,
                          BLOCK: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    if tl.load(flags_ptr + 5 * b + 3) == 0:
        return
    plane = out_size * out_size
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < plane
    y = offs // out_size
    x = offs % out_size
    pad = K // 2
    # Horizontal taps in order: acc = t0 * x[. - pad]; acc += tj * x[. - pad + j].
    for c in tl.static_range(3):
        base = (b.to(tl.int64) * 3 + c) * plane + y * out_size
        acc = tl.load(taps_ptr + b * K) * tl.load(
            work_ptr + base + _reflect(x - pad, out_size), mask=mask, other=0.0)
        for j in range(1, K):
            acc = acc + tl.load(taps_ptr + b * K + j) * tl.load(
                work_ptr + base + _reflect(x + j - pad, out_size), mask=mask, other=0.0)
        tl.store(tmp_ptr + base + x, acc, mask=mask)


@triton.jit
def augment_blur_v_kernel(tmp_ptr, flags_ptr, taps_ptr, out_ptr, mean_ptr, std_ptr, rot_ptr,
                          thr, out_size, K, BLOCK: tl.constexpr, MANUAL_BF16: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    if tl.load(flags_ptr + 5 * b + 3) == 0:
        return
    plane = out_size * out_size
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < plane
    y = offs // out_size
    x = offs % out_size
    pad = K // 2
    out_base = b.to(tl.int64) * 3 * plane
    r = tl.zeros([BLOCK], dtype=tl.float32)
    g = tl.zeros([BLOCK], dtype=tl.float32)
    bl = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.static_range(3):
        base = out_base + c * plane + x
        acc = tl.load(taps_ptr + b * K) * tl.load(
            tmp_ptr + base + _reflect(y - pad, out_size) * out_size, mask=mask, other=0.0)
        for j in range(1, K):
            acc = acc + tl.load(taps_ptr + b * K + j) * tl.load(
                tmp_ptr + base + _reflect(y + j - pad, out_size) * out_size, mask=mask,
                other=0.0)
        if c == 0:
            r = acc
        elif c == 1:
            g = acc
        else:
            bl = acc
    _store_final(out_ptr, out_base, plane, offs, mask, r, g, bl,
                 tl.load(flags_ptr + 5 * b + 4) != 0, thr, mean_ptr, std_ptr,
                 tl.load(rot_ptr + b), out_size, MANUAL_BF16)


# ---------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------

def _launch_opts(out_dtype: torch.dtype) -> dict:
    # No FMA contraction: products round before they are added, as in the reference.
    return {"num_warps": NUM_WARPS, "enable_fp_fusion": False,
            "MANUAL_BF16": INTERPRET and out_dtype == torch.bfloat16}


def _flat_view(images: list):
    """The images of one contiguous batch tensor (as unbound by fastssl.augment) as one flat
    view of its storage, without a copy; None if they are not laid out that way."""
    first = images[0]
    n = first.numel()
    for i, im in enumerate(images):
        if (not im.is_contiguous() or im.shape != first.shape
                or im.data_ptr() != first.data_ptr() + i * n * first.element_size()):
            return None
    return first.as_strided((len(images) * n,), (1,))


# ---------------------------------------------------------------------------------------
# The op: ``fastssl::ssl_augment`` (CPU kernel csrc/cpu/augment.cpp; CUDA kernel below).
# No autograd: augmentation runs on data, before the model. The fake gives the output's shape
# contract, for torch.compile and torch.library.opcheck.
# ---------------------------------------------------------------------------------------

_library.define("ssl_augment", "(Tensor[] images, Tensor crop, Tensor flags, Tensor factors, "
                "Tensor order, Tensor taps, float solarize_threshold, Tensor mean, Tensor std, "
                "int out_size, ScalarType out_dtype, Tensor? rot=None) -> Tensor")


@torch.library.register_fake("fastssl::ssl_augment")
def _ssl_augment_fake(images, crop, flags, factors, order, taps, solarize_threshold, mean,
                      std, out_size, out_dtype, rot=None):
    return images[0].new_empty((len(images), 3, out_size, out_size), dtype=out_dtype)


def pack_params(params) -> tuple:
    """AugmentParams -> the op's (crop, flags, factors, order, taps) CPU tensors; flags
    columns: flip, jitter, gray, blur, solarize."""
    flags = torch.stack([params.flip, params.jitter, params.gray, params.blur,
                         params.solarize], dim=1).to(torch.bool).contiguous()
    return (params.crop.to(torch.int64).contiguous(), flags,
            params.factors.to(torch.float32).contiguous(),
            params.order.to(torch.int64).contiguous(),
            params.taps.to(torch.float32).contiguous())


def ssl_augment(images: list, params, out_size: int, mean: torch.Tensor, std: torch.Tensor,
                out_dtype: torch.dtype, rot=None) -> torch.Tensor:
    """Runs ``fastssl::ssl_augment`` (C++ on CPU images, Triton on CUDA images) on a list of B
    uint8 or float32 [3, H, W] images of one device."""
    crop, flags, factors, order, taps = pack_params(params)
    return torch.ops.fastssl.ssl_augment(
        [im.contiguous() for im in images], crop, flags, factors, order, taps,
        float(params.solarize_threshold), mean.to(torch.float32).contiguous(),
        std.to(torch.float32).contiguous(), int(out_size), out_dtype,
        None if rot is None else rot.to(torch.int64).contiguous())


@_library.triton_kernel("ssl_augment")
def ssl_augment_triton(images: list, crop, flags, factors, order, taps,
                       solarize_threshold: float, mean, std, out_size: int,
                       out_dtype: torch.dtype, rot=None) -> torch.Tensor:
    """The CUDA kernel: the Triton passes on a list of B uint8 or fp32 [3, H, W] images (one
    device). A list of differently sized images is packed into one flat buffer (one copy); the
    images of a batch tensor are used in place. The parameter tensors live on the host (they
    are sampled there) and are copied to the device here.
    """
    device = images[0].device
    B = len(images)
    is_u8 = images[0].dtype == torch.uint8
    sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    # One image may serve several samples (multi-crop locals, jigsaw tiles): each distinct
    # image is stored once and the samples index it.
    slot, index, distinct = [], {}, []
    for im in images:
        key = (im.data_ptr(), tuple(im.shape), tuple(im.stride()))
        if key not in index:
            index[key] = len(distinct)
            distinct.append(im)
        slot.append(index[key])
    flat = _flat_view(distinct)
    if flat is None:
        flat = torch.cat([im.contiguous().reshape(-1) for im in distinct])
    numels = torch.tensor([im.numel() for im in distinct], dtype=torch.int64)
    img_off = (torch.cumsum(numels, 0) - numels)[torch.tensor(slot, dtype=torch.int64)]
    K = int(taps.shape[1])
    if not (K // 2 < out_size or K == 1):
        raise ValueError(f"a blur kernel of {K} taps needs out_size > {K // 2}")
    if K == 1:  # one tap of weight 1: the blur is the identity, and its passes are skipped
        flags = flags.clone()
        flags[:, _BLUR] = False
    dev = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    hw = dev(torch.tensor(sizes, dtype=torch.int32).reshape(-1))
    img_off, crop = dev(img_off), dev(crop.to(torch.int32))
    factors, taps = dev(factors), dev(taps)
    flags, order = dev(flags.to(torch.int32)), dev(order.to(torch.int32))
    mean_d, std_d = dev(mean.float()), dev(std.float())
    if rot is None:
        rot_d = torch.zeros(B, dtype=torch.int32, device=device)
    else:
        if rot.shape != (B,) or bool(((rot < 0) | (rot > 3)).any()):
            raise ValueError("ssl_augment: rot must be (B,) with values in 0..3")
        rot_d = dev(rot.to(torch.int32))
    plane = out_size * out_size
    n_blocks = triton.cdiv(plane, BLOCK)
    out = torch.empty((B, 3, out_size, out_size), dtype=out_dtype, device=device)
    work = torch.empty((B, 3, out_size, out_size), dtype=torch.float32, device=device)
    partial = torch.zeros((B, n_blocks), dtype=torch.float64, device=device)
    thr = float(solarize_threshold)
    grid = (B, n_blocks)
    augment_resize_kernel[grid](flat, img_off, hw, crop, flags, factors, order, work, partial,
                                out, mean_d, std_d, rot_d, thr, out_size, n_blocks,
                                IS_U8=is_u8,
                                BLOCK=BLOCK, **_launch_opts(out_dtype))
    if bool(flags[:, _JITTER].any()):
        augment_contrast_kernel[grid](work, partial, flags, factors, order, out, mean_d, std_d,
                                      rot_d, thr, out_size, n_blocks, BLOCK=BLOCK,
                                      NB=triton.next_power_of_2(n_blocks),
                                      **_launch_opts(out_dtype))
    if bool(flags[:, _BLUR].any()):
        tmp = torch.empty_like(work)
        augment_blur_h_kernel[grid](work, tmp, flags, taps, out_size, K, BLOCK=BLOCK,
                                    num_warps=NUM_WARPS, enable_fp_fusion=False)
        augment_blur_v_kernel[grid](tmp, flags, taps, out, mean_d, std_d, rot_d, thr, out_size,
                                    K,
                                    BLOCK=BLOCK, **_launch_opts(out_dtype))
    return out


# What the launcher compiles, for `fastssl gpu-report` (sm_80 / sm_90 resource usage). None of
# these kernels multiplies matrices: tensor_cores is False.
_COMMON = {"flags_ptr": "*i32", "out_size": "i32"}
AOT_KERNELS = [
    {"name": f"augment_resize_kernel[{'u8' if u8 else 'f32'}->{o}]",
     "fn": augment_resize_kernel,
     "signature": {"img_ptr": "*u8" if u8 else "*fp32", "img_off_ptr": "*i64", "hw_ptr": "*i32",
                   "crop_ptr": "*i32", "flags_ptr": "*i32", "factors_ptr": "*fp32",
                   "order_ptr": "*i32", "work_ptr": "*fp32", "partial_ptr": "*fp64",
                   "out_ptr": f"*{o}", "mean_ptr": "*fp32", "std_ptr": "*fp32",
                   "rot_ptr": "*i32", "thr": "fp32",
                   "out_size": "i32", "n_blocks": "i32", "IS_U8": "constexpr",
                   "BLOCK": "constexpr", "MANUAL_BF16": "constexpr"},
     "constexprs": {"IS_U8": u8, "BLOCK": BLOCK, "MANUAL_BF16": False},
     "num_warps": NUM_WARPS, "tensor_cores": False}
    for u8, o in ((True, "fp32"), (True, "bf16"), (False, "fp32"))
] + [
    {"name": "augment_contrast_kernel", "fn": augment_contrast_kernel,
     "signature": {"work_ptr": "*fp32", "partial_ptr": "*fp64", "flags_ptr": "*i32",
                   "factors_ptr": "*fp32", "order_ptr": "*i32", "out_ptr": "*fp32",
                   "mean_ptr": "*fp32", "std_ptr": "*fp32", "rot_ptr": "*i32", "thr": "fp32",
                   "out_size": "i32",
                   "n_blocks": "i32", "BLOCK": "constexpr", "NB": "constexpr",
                   "MANUAL_BF16": "constexpr"},
     # NB: next power of two of the blocks per image: 64 at 224^2 with BLOCK = 1024.
     "constexprs": {"BLOCK": BLOCK, "NB": 64, "MANUAL_BF16": False}, "num_warps": NUM_WARPS,
     "tensor_cores": False},
    {"name": "augment_blur_h_kernel", "fn": augment_blur_h_kernel,
     "signature": {"work_ptr": "*fp32", "tmp_ptr": "*fp32", "flags_ptr": "*i32",
                   "taps_ptr": "*fp32", "out_size": "i32", "K": "i32", "BLOCK": "constexpr"},
     "constexprs": {"BLOCK": BLOCK}, "num_warps": NUM_WARPS, "tensor_cores": False},
    {"name": "augment_blur_v_kernel", "fn": augment_blur_v_kernel,
     "signature": {"tmp_ptr": "*fp32", "flags_ptr": "*i32", "taps_ptr": "*fp32",
                   "out_ptr": "*fp32", "mean_ptr": "*fp32", "std_ptr": "*fp32",
                   "rot_ptr": "*i32", "thr": "fp32", "out_size": "i32", "K": "i32",
                   "BLOCK": "constexpr",
                   "MANUAL_BF16": "constexpr"},
     "constexprs": {"BLOCK": BLOCK, "MANUAL_BF16": False}, "num_warps": NUM_WARPS,
     "tensor_cores": False},
]
