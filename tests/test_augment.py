"""fastssl.augment: per-sample SSL augmentation.

* the fused C++ kernel and the Triton kernels (interpreter, small images) equal the reference
  given the same parameters (max abs diff <= 1e-5 in [0, 1] space: mean 0, std 1);
* each op alone against hand-computed values and against torchvision v2's formulas, written
  out here (torchvision itself is not a dependency);
* per-sample parameters, generator determinism, recipes, list input of mixed sizes, bad input.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fastssl import _ext, augment, reference
from fastssl.augment import AugmentParams, AugmentRecipe, SSLAugment, apply, sample_params

needs_cpp = pytest.mark.skipif(not _ext.has_op("ssl_augment"),
                               reason=f"C++ extension: {_ext.why_unavailable()}")
UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # [0, 1] space
TOL = 1e-5
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "triton"]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images(kind: str, b: int, hw=(19, 23), seed=0):
    g = _gen(seed)
    if kind == "uint8":
        return torch.randint(0, 256, (b, 3, *hw), dtype=torch.uint8, generator=g)
    if kind == "float":
        return torch.rand((b, 3, *hw), generator=g)
    sizes = [(19, 23), (30, 17), (11, 11), (24, 40)][:b]
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


def _sizes(images):
    if isinstance(images, torch.Tensor):
        return tuple(images.shape[-2:])
    return [tuple(im.shape[-2:]) for im in images]


def _all_on(p: AugmentParams) -> AugmentParams:
    """Every op on for every sample (gray on for half), so each kernel path runs."""
    b = p.batch_size
    on = torch.ones(b, dtype=torch.bool)
    return dataclasses.replace(p, jitter=on, blur=on, solarize=on,
                               gray=torch.arange(b) % 2 == 1)


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------
# fused backends == reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["uint8", "float", "list"])
@pytest.mark.parametrize("recipe,view", [("simclr", 0), ("byol", 1), ("mocov2", 0)])
def test_matches_reference(backend, kind, recipe, view):
    b = 4 if kind == "list" else 6
    x = _images(kind, b)
    p = sample_params(b, _sizes(x), 11, recipe, view, _gen(1))
    for params in (p, _all_on(p)):
        out = apply(x, params, 11, **UNIT, backend=backend)
        ref = apply(x, params, 11, **UNIT, backend="reference")
        assert out.shape == (b, 3, 11, 11) and out.dtype == torch.float32
        assert _max_diff(out, ref) <= TOL, f"{backend} vs reference: {_max_diff(out, ref)}"


@needs_cpp
@pytest.mark.parametrize("recipe", ["simclr", "byol", "mocov2"])
def test_cpp_matches_reference_larger(recipe):
    # Larger, non-square crops and outputs: both downsampling and upsampling, 2 threads.
    x = _images("uint8", 8, hw=(67, 50), seed=3)
    for view in (0, 1):
        p = _all_on(sample_params(8, (67, 50), 37, recipe, view, _gen(view)))
        out = apply(x, p, 37, **UNIT, backend="cpp")
        ref = apply(x, p, 37, **UNIT, backend="reference")
        assert _max_diff(out, ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_normalize_and_cast(backend, out_dtype):
    x = _images("uint8", 4)
    p = _all_on(sample_params(4, (19, 23), 11, "simclr", 0, _gen(2)))
    out = apply(x, p, 11, out_dtype=out_dtype, backend=backend)
    ref32 = apply(x, p, 11, backend="reference")  # ImageNet mean / std
    assert out.dtype == out_dtype
    # One rounding of the same fp32 value: within half an ulp of the output dtype.
    ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
    bound = ulp[out_dtype] * ref32.abs() + 4 * TOL
    assert bool(((out.float() - ref32).abs() <= bound).all())
    if out_dtype != torch.float32:
        ref = apply(x, p, 11, out_dtype=out_dtype, backend="reference")
        assert _max_diff(out, ref) <= ulp[out_dtype] * ref32.abs().max().item() + 4 * TOL


@needs_cpp
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """One schema, two kernels: opcheck on the C++ kernel and on the Triton kernel (the
    conftest fixture puts the latter on the CPU key for backend="triton")."""
    x = _images("uint8", 3)
    p = sample_params(3, (19, 23), 11, "byol", 0, _gen(4))
    from fastssl.ops import augment as ops_augment
    crop, flags, factors, order, taps = ops_augment.pack_params(p)
    torch.library.opcheck(torch.ops.fastssl.ssl_augment,
                          (list(x.unbind(0)), crop, flags, factors, order, taps, 0.5,
                           torch.zeros(3), torch.ones(3), 11, torch.float32))


# ---------------------------------------------------------------------------------------
# each op alone: hand-computed values, through every backend
# ---------------------------------------------------------------------------------------


def _identity_params(b: int, h: int, w: int, k: int = 3, **kw) -> AugmentParams:
    """Full-image crop at out_size == size (an exact identity resize), every op off."""
    off = torch.zeros(b, dtype=torch.bool)
    fields = dict(
        crop=torch.tensor([[0, 0, h, w]] * b), flip=off, jitter=off,
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * b), order=torch.tensor([[0, 1, 2, 3]] * b),
        gray=off, blur=off, sigma=torch.ones(b), taps=augment.gaussian_taps(torch.ones(b), k),
        solarize=off, solarize_threshold=0.5, in_sizes=[(h, w)] * b)
    fields.update(kw)
    return AugmentParams(**fields)


def _one_op(img: torch.Tensor, op: int, factor: float) -> AugmentParams:
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    factors[0, op] = factor
    order = torch.tensor([[op] + [i for i in range(4) if i != op]])
    return _identity_params(1, img.shape[1], img.shape[2],
                            jitter=torch.ones(1, dtype=torch.bool), factors=factors, order=order)


ALL_BACKENDS = ["reference"] + BACKENDS


def _run(img, params, backend):
    """Runs a square image through ``params`` at out_size == its size."""
    return apply(img[None], params, img.shape[1], **UNIT, backend=backend)[0]


def _px(*rgb):
    """An n x n image whose columns are the n given (r, g, b) pixels."""
    n = len(rgb)
    return torch.tensor(rgb, dtype=torch.float32).T.reshape(3, 1, n).expand(3, n, n).contiguous()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_identity(backend):
    x = _images("float", 1, hw=(6, 6))[0]
    assert torch.equal(_run(x, _identity_params(1, 6, 6), backend), x)
    u = _images("uint8", 1, hw=(6, 6))[0]
    assert torch.equal(_run(u, _identity_params(1, 6, 6), backend), u.float() / 255)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_brightness_hand(backend):
    img = _px((0.2, 0.4, 0.8), (0.0, 0.5, 1.0))
    out = _run(img, _one_op(img, augment.BRIGHTNESS, 1.5), backend)
    want = _px((0.3, 0.6, 1.0), (0.0, 0.75, 1.0))  # 0.8 * 1.5 clamps to 1
    assert torch.allclose(out, want, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_contrast_hand(backend):
    img = _px((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))  # gray mean 0.9999 / 2
    m = (0.2989 + 0.587 + 0.114) / 2
    out = _run(img, _one_op(img, augment.CONTRAST, 0.5), backend)
    want = _px((0.5 + 0.5 * m,) * 3, (0.5 * m,) * 3)
    assert torch.allclose(out, want, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_saturation_hand(backend):
    img = _px((1.0, 0.0, 0.0), (0.5, 0.5, 0.5))
    out = _run(img, _one_op(img, augment.SATURATION, 0.0), backend)  # factor 0: gray
    want = _px((0.2989,) * 3, (0.5 * 0.9999,) * 3)
    assert torch.allclose(out, want, atol=1e-6)
    out = _run(img, _one_op(img, augment.SATURATION, 2.0), backend)  # 2 x - gray, clamped
    want = _px((1.0, 0.0, 0.0), (0.5 + 0.5 * 0.0001,) * 3)
    assert torch.allclose(out, want, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_hue_hand(backend):
    img = _px((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.5, 0.5), (1.0, 0.5, 0.0))
    # +1/3 of the hue circle: red -> green, blue -> red; gray has no hue; orange (h=1/12) ->
    # h = 5/12: spring green (0, 1, 0.5).
    out = _run(img, _one_op(img, augment.HUE, 1.0 / 3.0), backend)
    want = _px((0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.0, 1.0, 0.5))
    assert torch.allclose(out, want, atol=1e-6)
    out = _run(img, _one_op(img, augment.HUE, -0.5), backend)  # complement: red -> cyan
    want = _px((0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (0.5, 0.5, 0.5), (0.0, 0.5, 1.0))
    assert torch.allclose(out, want, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gray_and_solarize_hand(backend):
    img = _px((1.0, 0.0, 0.0), (0.2, 0.6, 0.9))
    on = torch.ones(1, dtype=torch.bool)
    out = _run(img, _identity_params(1, 2, 2, gray=on), backend)
    g2 = 0.2 * 0.2989 + 0.6 * 0.587 + 0.9 * 0.114
    assert torch.allclose(out, _px((0.2989,) * 3, (g2,) * 3), atol=1e-6)
    out = _run(img, _identity_params(1, 2, 2, solarize=on, solarize_threshold=0.5), backend)
    assert torch.allclose(out, _px((0.0, 0.0, 0.0), (0.2, 0.4, 0.1)), atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_blur_hand(backend):
    # A unit impulse in the middle of a 9 x 9 image blurs into the outer product of the taps;
    # a constant image stays constant (taps sum to 1, reflect padding).
    k, sigma = 5, 1.3
    taps = augment.gaussian_taps(torch.tensor([sigma]), k)
    x = torch.arange(k) - k // 2
    want_taps = torch.exp(-x.double() ** 2 / (2 * sigma ** 2))
    assert torch.allclose(taps[0].double(), want_taps / want_taps.sum(), atol=1e-7)
    img = torch.zeros(3, 9, 9)
    img[:, 4, 4] = 1.0
    on = torch.ones(1, dtype=torch.bool)
    params = _identity_params(1, 9, 9, k=k, blur=on, taps=taps)
    out = _run(img, params, backend)
    want = torch.zeros(9, 9)
    want[2:7, 2:7] = torch.outer(taps[0], taps[0])
    assert torch.allclose(out, want.expand(3, 9, 9), atol=1e-6)
    const = torch.full((3, 9, 9), 0.625)
    assert torch.allclose(_run(const, params, backend), const, atol=1e-6)
    # Reflect padding (no edge repeat): x[-1] reads x[1], x[-2] reads x[2], so an impulse at
    # column 1 reaches column 0 through taps 3 (directly) and 1 (as x[-1]), column 1 through
    # taps 2 and 0 (as x[-1]).
    img = torch.zeros(3, 9, 9)
    img[:, 4, 1] = 1.0
    out = _run(img, params, backend)
    t = taps[0]
    want_row = t[2] * torch.stack([t[1] + t[3], t[2] + t[0], t[1], t[0], torch.tensor(0.0)])
    assert torch.allclose(out[0, 4, :5], want_row, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_resize_and_flip_hand(backend):
    # 1 x 2 -> 2 x 4: align_corners=False bilinear, columns (x+0.5)/2-0.5 = -.25,.25,.75,1.25.
    img = torch.tensor([[0.0, 1.0]]).expand(3, 1, 2).contiguous()
    p = _identity_params(1, 1, 2, crop=torch.tensor([[0, 0, 1, 2]]))
    out = apply(img[None], p, 4, **UNIT, backend=backend)[0]
    assert torch.allclose(out[0], torch.tensor([0.0, 0.25, 0.75, 1.0]).expand(4, 4))
    p = dataclasses.replace(p, flip=torch.ones(1, dtype=torch.bool))
    out = apply(img[None], p, 4, **UNIT, backend=backend)[0]
    assert torch.allclose(out[0], torch.tensor([1.0, 0.75, 0.25, 0.0]).expand(4, 4))


# ---------------------------------------------------------------------------------------
# the reference against torchvision v2's formulas, written out
# ---------------------------------------------------------------------------------------


def tv_rgb_to_gray(img):  # torchvision v2 _rgb_to_grayscale_image
    r, g, b = img.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(dim=-3)


def tv_blend(image1, image2, ratio):
    return image1.mul(ratio).add_(image2.mul(1.0 - ratio)).clamp_(0, 1.0)


def tv_adjust_contrast(image, f):
    mean = torch.mean(tv_rgb_to_gray(image), dim=(-3, -2, -1), keepdim=True)
    return tv_blend(image, mean, f)


def tv_adjust_saturation(image, f):
    return tv_blend(image, tv_rgb_to_gray(image), f)


def tv_rgb_to_hsv(image):
    r, g, _ = image.unbind(dim=-3)
    minc, maxc = torch.aminmax(image, dim=-3)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    channels_range_divisor = torch.where(eqc, ones, channels_range).unsqueeze_(dim=-3)
    rc, gc, bc = ((maxc.unsqueeze(dim=-3) - image) / channels_range_divisor).unbind(dim=-3)
    mask_maxc_neq_r = maxc != r
    mask_maxc_eq_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(mask_maxc_eq_g & mask_maxc_neq_r)
    hr = bc.sub_(gc).mul_(~mask_maxc_neq_r)
    hb = gc.add_(4.0).sub_(rc).mul_(mask_maxc_neq_r.logical_and_(mask_maxc_eq_g.logical_not_()))
    h = hr.add_(hg).add_(hb)
    h = h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


def tv_hsv_to_rgb(img):
    h, s, v = img.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(dtype=torch.int32)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    i.remainder_(6)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]])
    select = select[:, i]
    if select.ndim > 3:
        select = select.transpose(0, 1)
    return vpqt.gather(-3, select.long()).reshape_as(img)


def tv_adjust_hue(image, f):
    image = tv_rgb_to_hsv(image)
    h, s, v = image.unbind(dim=-3)
    h.add_(f).remainder_(1.0)
    return tv_hsv_to_rgb(image)


def tv_gaussian_blur(img, kernel_size, sigma):
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    k1 = pdf / pdf.sum()
    k2 = k1[:, None] * k1[None, :]
    pad = kernel_size // 2
    out = F.pad(img[None], [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(out, k2.expand(3, 1, kernel_size, kernel_size), groups=3)[0]


def test_reference_vs_torchvision_formulas():
    img = torch.rand(3, 13, 17, generator=_gen(5))
    # gray values of exactly equal channels and of one dominant channel, where hue branches
    img[:, 0, :4] = torch.tensor([0.3, 0.3, 0.3])[:, None]
    img[:, 1, :4] = torch.tensor([0.8, 0.8, 0.1])[:, None]
    img[:, 2, :4] = torch.tensor([0.1, 0.8, 0.8])[:, None]
    for f in (0.3, 1.0, 1.7):
        ft = torch.tensor(f)
        assert _max_diff(reference.adjust_brightness(img, ft), img.mul(f).clamp_(0, 1)) <= 1e-6
        assert _max_diff(reference.adjust_contrast(img, ft), tv_adjust_contrast(img, f)) <= 1e-6
        assert _max_diff(reference.adjust_saturation(img, ft),
                         tv_adjust_saturation(img, f)) <= 1e-6
    for f in (-0.5, -0.27, 0.0001, 0.2, 0.5):
        assert _max_diff(reference.adjust_hue(img, torch.tensor(f)), tv_adjust_hue(img, f)) <= 2e-6
    assert _max_diff(reference.rgb_to_gray(img)[None], tv_rgb_to_gray(img)) <= 1e-6
    assert torch.equal(reference.solarize(img, 0.5),
                       torch.where(img >= 0.5, 1.0 - img, img))  # v2 solarize on floats
    for k, sigma in ((3, 0.5), (5, 1.7), (9, 2.0)):
        taps = augment.gaussian_taps(torch.tensor([sigma]), k)[0]
        want = tv_gaussian_blur(img, k, sigma)
        assert _max_diff(reference.gaussian_blur(img, taps), want) <= 1e-6
    # crop + resize: F.interpolate(bilinear, align_corners=False, antialias=False), then flip
    crop = img[:, 2:11, 3:15]
    for out in (5, 8, 21):
        want = F.interpolate(crop[None], size=(out, out), mode="bilinear", align_corners=False,
                             antialias=False)[0]
        got = reference.resized_crop(img, 2, 3, 9, 12, out)
        assert _max_diff(got, want) <= 1e-6
        assert _max_diff(reference.resized_crop(img, 2, 3, 9, 12, out, flip=True),
                         want.flip(-1)) <= 1e-6


# ---------------------------------------------------------------------------------------
# parameters: per sample, determinism, recipes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_identical_images_get_different_views(backend):
    x = _images("uint8", 1, hw=(40, 40)).expand(8, 3, 40, 40).contiguous()
    v0, v1 = SSLAugment(24, "simclr", **UNIT, backend=backend, generator=_gen(0))(x)
    flat = torch.cat([v0, v1]).reshape(16, -1)
    assert len({tuple(r.tolist()) for r in flat}) == 16
    assert not torch.equal(v0, v1)


def test_generator_determinism():
    a = sample_params(16, (64, 80), 32, "byol", 1, _gen(7))
    b = sample_params(16, (64, 80), 32, "byol", 1, _gen(7))
    c = sample_params(16, (64, 80), 32, "byol", 1, _gen(8))
    for f in dataclasses.fields(AugmentParams):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        assert (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb), f.name
    assert not torch.equal(a.crop, c.crop)
    x = _images("uint8", 4, hw=(30, 30))
    aug = lambda: SSLAugment(16, "mocov2", generator=_gen(3), backend="reference")  # noqa: E731
    for u, v in zip(aug()(x), aug()(x)):
        assert torch.equal(u, v)


def test_sample_params_distribution():
    n, hw = 4000, (60, 90)
    p = sample_params(n, hw, 32, "simclr", 0, _gen(11))
    top, left, h, w = p.crop.unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 60) & (left + w <= 90)).all())
    frac = (h * w).double() / (60 * 90)
    ratio = w.double() / h
    # torchvision's rounding of w, h can step just outside the sampled ranges
    assert frac.min() >= 0.08 * 0.8 and frac.max() <= 1.0
    assert ratio.min() >= 0.75 * 0.85 and ratio.max() <= 4 / 3 * 1.15
    for name, prob in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5),
                       ("solarize", 0.0)):
        rate = getattr(p, name).double().mean().item()
        assert abs(rate - prob) < 0.04, (name, rate)
    f = p.factors
    assert f[:, :3].min() >= 0.2 - 1e-6 and f[:, :3].max() <= 1.8 + 1e-6
    assert f[:, 3].abs().max() <= 0.2 + 1e-6
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    assert p.taps.shape == (n, 3) and torch.allclose(p.taps.sum(1), torch.ones(n))
    assert sample_params(2, (300, 300), 224, "simclr").taps.shape[1] == 23  # int(22.4) -> 23


def test_recipes():
    b0 = sample_params(2000, (50, 50), 32, "byol", 0, _gen(1))
    b1 = sample_params(2000, (50, 50), 32, "byol", 1, _gen(1))
    assert bool(b0.blur.all()) and not bool(b0.solarize.any())
    assert abs(b1.blur.double().mean().item() - 0.1) < 0.03
    assert abs(b1.solarize.double().mean().item() - 0.2) < 0.03
    assert b0.factors[:, 2].min() >= 0.8 - 1e-6 and b0.factors[:, 3].abs().max() <= 0.1 + 1e-6
    m = sample_params(2000, (50, 50), 32, "mocov2", 0, _gen(1))
    assert ((m.crop[:, 2] * m.crop[:, 3]).double() / 2500).min() >= 0.2 * 0.85
    weak = augment.get_recipe("simclr", strength=0.5)
    assert weak.brightness == pytest.approx(0.4) and weak.hue == pytest.approx(0.1)
    custom = AugmentRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                           jitter_p=0.0, gray_p=1.0, blur_p=0.0)
    c = sample_params(5, (20, 20), 20, custom, 0, _gen(0))
    assert torch.equal(c.crop, torch.tensor([[0, 0, 20, 20]] * 5)) and bool(c.gray.all())
    pair = sample_params(5, (20, 20), 20, (custom, AugmentRecipe()), 1, _gen(0))
    assert not bool(pair.gray.all()) or not torch.equal(pair.crop, c.crop)


# ---------------------------------------------------------------------------------------
# list input, SSLAugment, DataLoader
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_list_of_mixed_sizes(backend):
    x = _images("list", 4)
    p = _all_on(sample_params(4, _sizes(x), 9, "simclr", 0, _gen(6)))
    out = apply(x, p, 9, **UNIT, backend=backend)
    assert out.shape == (4, 3, 9, 9)
    for i in range(4):  # a sample does not depend on its batch mates
        one = apply([x[i]], p.select([i]), 9, **UNIT, backend="reference")
        assert _max_diff(out[i:i + 1], one) <= TOL


def test_dataloader_collate():
    data = [(torch.randint(0, 256, (3, 20 + i, 24), dtype=torch.uint8), i) for i in range(6)]
    aug = SSLAugment(16, "byol", generator=_gen(0))
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=aug.collate)
    (v0, v1), labels = next(iter(loader))
    assert v0.shape == v1.shape == (3, 3, 16, 16) and labels.tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


def test_bad_input():
    x = _images("uint8", 2)
    p = sample_params(2, (19, 23), 11)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        apply(torch.zeros(2, 4, 19, 23, dtype=torch.uint8), p, 11)
    with pytest.raises(ValueError, match="\\[3, H, W\\]"):
        apply([torch.zeros(1, 19, 23, dtype=torch.uint8)] * 2, p, 11)
    with pytest.raises(TypeError, match="uint8"):
        apply(x.to(torch.int32), p, 11)
    with pytest.raises(ValueError, match="empty batch"):
        apply(torch.zeros(0, 3, 19, 23, dtype=torch.uint8), p, 11)
    with pytest.raises(ValueError, match="empty list"):
        apply([], p, 11)
    with pytest.raises(ValueError, match="out_size must be >= 1"):
        apply(x, p, 0)
    with pytest.raises(ValueError, match="out_size must be >= 1"):
        sample_params(2, (19, 23), -3)
    with pytest.raises(ValueError, match="unknown recipe 'simclr2'"):
        sample_params(2, (19, 23), 11, "simclr2")
    with pytest.raises(ValueError, match="unknown recipe"):
        SSLAugment(32, recipe="dino")
    with pytest.raises(ValueError, match="drawn for 2 images, got 3"):
        apply(_images("uint8", 3), p, 11)
    with pytest.raises(ValueError, match="does not fit"):
        apply(_images("uint8", 2, hw=(5, 5)), p, 11)
    with pytest.raises(TypeError, match="out_dtype"):
        apply(x, p, 11, out_dtype=torch.float64)
    with pytest.raises(ValueError, match="std must be non-zero"):
        apply(x, p, 11, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="mean must have 3 values"):
        apply(x, p, 11, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="backend must be one of"):
        apply(x, p, 11, backend="gpu")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        apply([x[0], "image"], p, 11)
    with pytest.raises(ValueError, match="view must be 0 or 1"):
        sample_params(2, (19, 23), 11, "byol", view=2)
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentRecipe(crop_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="in_size lists 1 image sizes"):
        sample_params(2, [(19, 23)], 11)


def test_aot_kernels_describe_the_launched_kernels():
    import inspect

    from fastssl.ops import augment as ops_augment
    assert ops_augment.AOT_KERNELS
    for k in ops_augment.AOT_KERNELS:
        params = list(inspect.signature(k["fn"].fn).parameters)
        assert list(k["signature"]) == params, k["name"]
        assert set(k["constexprs"]) <= set(params) and k["tensor_cores"] is False


def test_augment_demo_png(tmp_path):
    import struct
    import zlib

    from fastssl.tools import augment_demo
    grid = augment_demo.make_grid("byol", out_size=24, pairs=1, backend="reference")
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3
    path = tmp_path / "views.png"
    augment_demo.write_png(str(path), grid)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (h, w) == tuple(grid.shape[1:])
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    rows = zlib.decompress(idat)
    assert len(rows) == h * (1 + 3 * w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_output_and_strided_input(backend):
    # out_size 1 (a one-tap blur: the identity) and 2; a channels_last (non-contiguous) batch.
    x = _images("uint8", 3, hw=(9, 7)).contiguous(memory_format=torch.channels_last)
    for out in (1, 2):
        p = _all_on(sample_params(3, (9, 7), out, "byol", 0, _gen(out)))
        got = apply(x, p, out, **UNIT, backend=backend)
        ref = apply(x, p, out, **UNIT, backend="reference")
        assert got.shape == (3, 3, out, out) and _max_diff(got, ref) <= TOL


@pytest.mark.parametrize("make,exc,match", [
    (lambda: SSLAugment(8, generator=0), TypeError, "generator must be a CPU torch.Generator"),
    (lambda: SSLAugment(8, generator="seed"), TypeError, "generator must be"),
    (lambda: SSLAugment(8, std=(1.0, 0.0, 1.0)), ValueError, "std must be non-zero"),
    (lambda: sample_params(2, (8, 8), 4, generator=0), TypeError, "generator must be"),
    (lambda: AugmentRecipe(blur_kernel_frac=math.inf),
     ValueError, "blur_kernel_frac must be finite"),
    (lambda: AugmentRecipe(blur_kernel_frac=math.nan), ValueError, "blur_kernel_frac"),
    (lambda: AugmentRecipe(brightness=math.inf), ValueError, "brightness must be finite"),
    (lambda: AugmentRecipe(flip_p="0.5"), TypeError, "flip_p must be a number"),
    (lambda: AugmentRecipe(crop_scale=0.5), ValueError, "crop_scale must be a \\(min, max\\) pair"),
    (lambda: AugmentRecipe(blur_sigma=(0.1, math.inf)), ValueError, "blur_sigma must be finite"),
    (lambda: sample_params(2, (8,), 4), ValueError, "in_size must be \\(H, W\\)"),
    (lambda: sample_params(2, (8, 8, 3), 4), ValueError, "in_size must be \\(H, W\\)"),
    (lambda: sample_params(2, [8, (8, 8)], 4), ValueError, "in_size"),
    (lambda: sample_params(2, 8, 4), TypeError, "in_size must be"),
    (lambda: SSLAugment(8)(torch.zeros(2, 3, 10, 10, device="meta")), ValueError, "meta"),
    (lambda: SSLAugment(8)([torch.zeros(3, 10, 10, device="meta")]), ValueError, "meta"),
])
def test_bad_input_gaps(make, exc, match):
    """Each raised an unclear error before (AttributeError, OverflowError at the first call,
    'int object is not iterable', a crash inside the reference on meta tensors)."""
    with pytest.raises(exc, match=match):
        make()
@needs_cpp
@pytest.mark.parametrize("out", [75, 130])
def test_cpp_matches_reference_wide_rows(out):
    # Rows wide enough for every block shape of the blur in every ISA clone (AVX2: blocks of
    # 8 x 8 floats, then 4 x 8, then single vectors; AVX-512: 4 x 16, then single vectors),
    # which the small images above never reach. Also the contrast mean's 8-lane gray sum over
    # long rows (AVX2 clone: two 4-double accumulators).
    x = _images("uint8", 3, hw=(out + 9, out + 4), seed=7)
    for view in (0, 1):
        p = _all_on(sample_params(3, (out + 9, out + 4), out, "simclr", view, _gen(10 + view)))
        got = apply(x, p, out, **UNIT, backend="cpp")
        ref = apply(x, p, out, **UNIT, backend="reference")
        assert _max_diff(got, ref) <= TOL


@pytest.mark.skipif(not _ext.has_op("simd_clone"),
                    reason=f"C++ extension: {_ext.why_unavailable() or 'no simd_clone op'}")
def test_simd_clone_matches_cpu_flags():
    # The clone `fastssl info` reports is the one GCC's dispatcher picks: never one this CPU
    # lacks the instructions for.
    clone = torch.ops.fastssl.simd_clone()
    assert clone in ("x86-64-v4 (AVX-512)", "x86-64-v3 (AVX2+FMA)", "x86-64 baseline (SSE2)",
                     "portable (no x86-64 ISA clones in this build)")
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
                    .split(":")[1].split())
    except (OSError, StopIteration):
        return
    if not {"avx2", "fma", "bmi2"} <= flags:
        assert "v3" not in clone and "v4" not in clone
    if not {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags:
        assert "v4" not in clone
    from fastssl.tools import info
    assert info.collect()["cpu_simd_clone"] == clone
