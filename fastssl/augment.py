"""SSL augmentation (SimCLR / BYOL / MoCo-v2 recipes) with per-sample parameters, fused.

torchvision v2 draws one random parameter set per call: one crop and one jitter for a whole
batch tensor, so SSL pipelines loop over images. Here the parameters are drawn once per batch,
on the host, into small per-sample tensors (:class:`AugmentParams`), and one fused kernel
applies them to every image of the batch:

* ``"cpp"``: ``csrc/cpu/augment.cpp``, CPU (also inside DataLoader workers);
* ``"triton"``: ``fastssl/ops/augment.py``, CUDA (or CPU tensors under ``TRITON_INTERPRET=1``);
* ``"reference"``: :func:`fastssl.reference.ssl_augment`, pure PyTorch, the specification.

All three consume the same :class:`AugmentParams`, so their outputs agree to ~1e-6 in [0, 1].

Pipeline (per sample, in this order; formulas in :mod:`fastssl.reference`):
random resized crop + bilinear resize (flip folded into the column index) -> colour jitter
(brightness, contrast, saturation, hue in the sample's random order, clamped to [0, 1] after
each) -> grayscale -> Gaussian blur (separable, reflect padding) -> solarize -> normalize -> cast.

Differences from torchvision v2 (deliberate, documented): the resize is plain bilinear
(``antialias=False``; v2's RandomResizedCrop antialiases when it shrinks a crop); the whole
chain runs in float [0, 1] (v2 on uint8 rounds back to uint8 between ops); the Gaussian taps
are torchvision's ``exp(-x^2 / (2 sigma^2))`` (docs/DESIGN.md, section 4.8); the contrast mean is a float64 reduction rounded once. Random draws follow v2's
distributions but come from one vectorised stream (see :func:`sample_params`), not v2's.

Example:
    >>> import torch, fastssl
    >>> images = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8)
    >>> aug = fastssl.SSLAugment(out_size=32, recipe="simclr",
    ...                          generator=torch.Generator().manual_seed(0))
    >>> v0, v1 = aug(images)
    >>> v0.shape, v0.dtype
    (torch.Size([4, 3, 32, 32]), torch.float32)
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from . import _dispatch, reference

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RECIPES = ("simclr", "byol", "mocov2")
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Index of each colour op in AugmentParams.order / .factors.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class AugmentRecipe:
    """The settings of one view's augmentation (a custom recipe is one of these).

    Attributes:
        crop_scale: (min, max) fraction of the image area kept by the random resized crop.
        crop_ratio: (min, max) aspect ratio w/h of the crop (sampled log-uniformly).
        flip_p: probability of a horizontal flip.
        jitter_p: probability of applying colour jitter.
        brightness, contrast, saturation: jitter strengths b; factors ~ U[max(0, 1-b), 1+b].
        hue: hue strength h in [0, 0.5]; factor ~ U[-h, h].
        gray_p: probability of converting to grayscale (3 equal channels).
        blur_p: probability of a Gaussian blur.
        blur_sigma: (min, max) of sigma, sampled uniformly.
        blur_kernel_frac: kernel size = this fraction of the output size, made odd (SimCLR:
            0.1, i.e. 23 taps at 224), at least 3 and at most 2 * out_size - 1.
        solarize_p: probability of solarizing (x >= threshold -> 1 - x).
        solarize_threshold: in [0, 1] units.
    """

    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5

    def __post_init__(self):
        def number(name, v):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"AugmentRecipe.{name} must be a number, got "
                                f"{type(v).__name__}")
            if not math.isfinite(v):
                raise ValueError(f"AugmentRecipe.{name} must be finite, got {v!r}")

        def pair(name, lo_min=0.0):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or len(v) != 2:
                raise ValueError(f"AugmentRecipe.{name} must be a (min, max) pair, got {v!r}")
            for x in v:
                number(name, x)
            if not (lo_min <= v[0] <= v[1]):
                raise ValueError(f"AugmentRecipe.{name} must be (min, max) with "
                                 f"{lo_min} <= min <= max, got {v!r}")
        pair("crop_scale")
        pair("crop_ratio", 1e-6)
        pair("blur_sigma", 1e-6)
        if not 0.0 < self.crop_scale[1] <= 1.0:
            raise ValueError(f"AugmentRecipe.crop_scale max must be in (0, 1], got "
                             f"{self.crop_scale!r}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p",
                     "solarize_threshold"):
            v = getattr(self, name)
            number(name, v)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"AugmentRecipe.{name} must be in [0, 1], got {v!r}")
        for name in ("brightness", "contrast", "saturation"):
            number(name, getattr(self, name))
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"AugmentRecipe.{name} must be >= 0, got {getattr(self, name)!r}")
        number("hue", self.hue)
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"AugmentRecipe.hue must be in [0, 0.5], got {self.hue!r}")
        # Finite too: an infinite fraction made kernel_size() raise OverflowError at the first
        # call instead of here.
        number("blur_kernel_frac", self.blur_kernel_frac)
        if not self.blur_kernel_frac >= 0.0:
            raise ValueError(f"AugmentRecipe.blur_kernel_frac must be >= 0, got "
                             f"{self.blur_kernel_frac!r}")

    def kernel_size(self, out_size: int) -> int:
        k = int(self.blur_kernel_frac * out_size)
        k = max(k + (k % 2 == 0), 3)
        return max(1, min(k, 2 * out_size - 1))


def get_recipe(recipe: Union[str, AugmentRecipe, Sequence[AugmentRecipe]] = "simclr",
               view: int = 0, *, strength: float = 1.0) -> AugmentRecipe:
    """The :class:`AugmentRecipe` of ``view`` (0 or 1) of a named recipe.

    * ``"simclr"`` (Chen et al. 2020): crop scale (0.08, 1), jitter (0.8s, 0.8s, 0.8s, 0.2s)
      p=0.8 with strength ``s``, gray p=0.2, blur p=0.5 sigma in (0.1, 2); both views alike.
    * ``"byol"`` (Grill et al. 2020): jitter (0.4, 0.4, 0.2, 0.1) p=0.8, gray p=0.2; blur
      p=1.0 / 0.1 and solarize p=0 / 0.2 for views 0 / 1.
    * ``"mocov2"`` (Chen et al. 2020): crop scale (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p=0.8,
      gray p=0.2, blur p=0.5.

    A custom recipe is an :class:`AugmentRecipe` (both views) or a pair of them (per view).
    """
    if view not in (0, 1):
        raise ValueError(f"view must be 0 or 1, got {view!r}")
    if isinstance(recipe, AugmentRecipe):
        return recipe
    if isinstance(recipe, (tuple, list)):
        if len(recipe) != 2 or not all(isinstance(r, AugmentRecipe) for r in recipe):
            raise TypeError("a per-view recipe must be a pair of AugmentRecipe")
        return recipe[view]
    if not isinstance(recipe, str):
        raise TypeError(f"recipe must be a name, an AugmentRecipe or a pair of them, got "
                        f"{type(recipe).__name__}")
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0):
        raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
    s = float(strength)
    if recipe == "simclr":
        return AugmentRecipe(brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s,
                             hue=min(0.2 * s, 0.5))
    if recipe == "byol":
        return AugmentRecipe(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                             blur_p=(1.0, 0.1)[view], solarize_p=(0.0, 0.2)[view])
    if recipe == "mocov2":
        return AugmentRecipe(crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4,
                             saturation=0.4, hue=0.1)
    raise ValueError(f"unknown recipe {recipe!r}: use one of {RECIPES}, an AugmentRecipe, or a "
                     "pair of AugmentRecipe")


@dataclass
class AugmentParams:
    """Per-sample augmentation parameters of a batch of B images (all on the host, CPU).

    Attributes:
        crop: (B, 4) int64 ``(top, left, height, width)`` of the crop, in input pixels.
        flip: (B,) bool, horizontal flip.
        jitter: (B,) bool, colour jitter applied.
        factors: (B, 4) float32 brightness, contrast, saturation factors and hue shift.
        order: (B, 4) int64, a permutation of (0, 1, 2, 3) = (brightness, contrast,
            saturation, hue): the order of the jitter ops.
        gray: (B,) bool, grayscale.
        blur: (B,) bool, Gaussian blur.
        sigma: (B,) float32, the blur's sigma.
        taps: (B, K) float32, the blur's normalised 1-D taps (K odd): what the kernels read.
        solarize: (B,) bool.
        solarize_threshold: float.
        in_sizes: the (H, W) of each image the crops were drawn for.
    """

    crop: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    taps: torch.Tensor
    solarize: torch.Tensor
    solarize_threshold: float
    in_sizes: list

    @property
    def batch_size(self) -> int:
        return self.crop.shape[0]

    def select(self, index) -> "AugmentParams":
        """The parameters of a subset of the samples (e.g. ``params.select([2])``)."""
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in fields.items()}
        out["in_sizes"] = [self.in_sizes[i] for i in idx.tolist()]
        return AugmentParams(**out)


def gaussian_taps(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B,) sigmas -> (B, K) normalised taps, torchvision's ``_get_gaussian_kernel1d``:
    ``x = linspace(-(K-1)/2, (K-1)/2, K)``, ``exp(-x^2 / (2 sigma^2))`` / sum.

    (docs/DESIGN.md, section 4.8: torchvision's kernel, with its factor 1/2.)
    """
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (x[None, :] / sigma.float()[:, None]).pow(2))
    return pdf / pdf.sum(dim=1, keepdim=True)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _in_sizes(batch_size: int, in_size) -> list:
    if not isinstance(in_size, (tuple, list)):
        raise TypeError(f"in_size must be (H, W) or a list of (H, W), got "
                        f"{type(in_size).__name__}")
    if in_size and all(_is_int(v) for v in in_size):  # one (H, W) for every image
        if len(in_size) != 2:
            raise ValueError(f"in_size must be (H, W) (two ints) or a list of (H, W), got "
                             f"{in_size!r}")
        sizes = [tuple(in_size)] * batch_size
    else:
        for i, s in enumerate(in_size):
            if not isinstance(s, (tuple, list)):
                raise ValueError(f"in_size must be (H, W) or a list of (H, W); in_size[{i}] "
                                 f"is {s!r}")
        sizes = [tuple(s) for s in in_size]
        if len(sizes) != batch_size:
            raise ValueError(f"in_size lists {len(sizes)} image sizes for batch_size "
                             f"{batch_size}")
    for s in sizes:
        if len(s) != 2 or not all(_is_int(v) and v >= 1 for v in s):
            raise ValueError(f"every image size must be (H, W) with H, W >= 1, got {s!r}")
    return sizes


def _check_generator(generator) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a CPU torch.Generator or None, got "
                        f"{type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator: parameters are drawn on "
                         f"the host, got one on {generator.device}")


def _check_out_size(out_size) -> int:
    if isinstance(out_size, bool) or not isinstance(out_size, int):
        raise TypeError(f"out_size must be an int, got {type(out_size).__name__}")
    if out_size < 1:
        raise ValueError(f"out_size must be >= 1, got {out_size}")
    return out_size


# RandomResizedCrop's rejection sampling: 10 attempts, then a central-crop fallback.
_CROP_ATTEMPTS = 10


def sample_params(batch_size: int, in_size, out_size: int, recipe="simclr", view: int = 0,
                  generator: Optional[torch.Generator] = None, *,
                  strength: float = 1.0) -> AugmentParams:
    """Draws the per-sample parameters of one view for a batch, on the host.

    Draw order from ``generator`` (CPU; ``None`` = torch's default generator), every draw
    made whatever the probabilities, so the stream is fixed by the batch size alone:

    1. crop: ``rand(B, 10)`` area fractions, ``rand(B, 10)`` log-aspect ratios, ``rand(B)``
       and ``rand(B)`` for the top and left offsets. torchvision's RandomResizedCrop logic:
       the first of the 10 attempts whose (w, h) fits is used, else the central-crop fallback.
    2. flip: ``rand(B) < flip_p``.
    3. jitter: ``rand(B) < jitter_p``; factors ``rand(B, 4)`` mapped to
       ``U[max(0, 1-b), 1+b]`` (brightness, contrast, saturation) and ``U[-h, h]`` (hue);
       order ``argsort(rand(B, 4))``.
    4. gray: ``rand(B) < gray_p``.
    5. blur: ``rand(B) < blur_p``; sigma ``U[sigma_min, sigma_max]`` from ``rand(B)``.
    6. solarize: ``rand(B) < solarize_p``.

    Args:
        batch_size: B >= 1.
        in_size: (H, W) of every image, or a list of B per-image (H, W).
        out_size: the output side (the blur's kernel size is derived from it).
        recipe: ``"simclr"``, ``"byol"``, ``"mocov2"``, an :class:`AugmentRecipe`, or a pair.
        view: 0 or 1 (BYOL's two views differ).
        generator: a CPU ``torch.Generator`` for reproducible draws.
        strength: SimCLR's colour-jitter strength ``s``.

    Returns:
        :class:`AugmentParams` (CPU tensors).

    Example:
        >>> import torch, fastssl
        >>> p = fastssl.augment.sample_params(2, (64, 48), 32, "byol", view=1,
        ...                                   generator=torch.Generator().manual_seed(0))
        >>> p.crop.shape, p.taps.shape
        (torch.Size([2, 4]), torch.Size([2, 3]))
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    out_size = _check_out_size(out_size)
    rec = get_recipe(recipe, view, strength=strength)
    sizes = _in_sizes(batch_size, in_size)
    _check_generator(generator)
    B, g = batch_size, generator

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    # 1. RandomResizedCrop (torchvision's get_params, vectorised over samples and attempts).
    H = torch.tensor([s[0] for s in sizes], dtype=torch.float64)
    W = torch.tensor([s[1] for s in sizes], dtype=torch.float64)
    area = (H * W)[:, None]
    lo, hi = rec.crop_scale
    target = area * (lo + (hi - lo) * rand(B, _CROP_ATTEMPTS))
    lr0, lr1 = math.log(rec.crop_ratio[0]), math.log(rec.crop_ratio[1])
    aspect = torch.exp(lr0 + (lr1 - lr0) * rand(B, _CROP_ATTEMPTS))
    w_try = torch.round(torch.sqrt(target * aspect))
    h_try = torch.round(torch.sqrt(target / aspect))
    ok = (w_try > 0) & (w_try <= W[:, None]) & (h_try > 0) & (h_try <= H[:, None])
    first = torch.argmax(ok.to(torch.int8), dim=1)
    found = ok.any(dim=1)
    h = h_try.gather(1, first[:, None])[:, 0]
    w = w_try.gather(1, first[:, None])[:, 0]
    u_top, u_left = rand(B), rand(B)
    top = torch.floor(u_top * (H - h + 1))
    left = torch.floor(u_left * (W - w + 1))
    # Fallback: central crop with the aspect ratio clamped into crop_ratio.
    in_ratio = W / H
    rmin, rmax = rec.crop_ratio
    fw = torch.where(in_ratio < rmin, W, torch.where(in_ratio > rmax, torch.round(H * rmax), W))
    fh = torch.where(in_ratio < rmin, torch.round(W / rmin),
                     torch.where(in_ratio > rmax, H, H))
    fh, fw = fh.clamp(1, None), fw.clamp(1, None)
    h, w = torch.where(found, h, fh), torch.where(found, w, fw)
    top = torch.where(found, top, torch.floor((H - fh) / 2))
    left = torch.where(found, left, torch.floor((W - fw) / 2))
    crop = torch.stack([top, left, h, w], dim=1).to(torch.int64)

    # 2. flip
    flip = rand(B) < rec.flip_p
    # 3. colour jitter
    jitter = rand(B) < rec.jitter_p
    u = rand(B, 4)
    ranges = [(max(0.0, 1.0 - rec.brightness), 1.0 + rec.brightness),
              (max(0.0, 1.0 - rec.contrast), 1.0 + rec.contrast),
              (max(0.0, 1.0 - rec.saturation), 1.0 + rec.saturation),
              (-rec.hue, rec.hue)]
    factors = torch.stack([a + (b - a) * u[:, i] for i, (a, b) in enumerate(ranges)], dim=1)
    order = torch.argsort(rand(B, 4), dim=1)
    # 4. grayscale
    gray = rand(B) < rec.gray_p
    # 5. blur
    blur = rand(B) < rec.blur_p
    s0, s1 = rec.blur_sigma
    sigma = (s0 + (s1 - s0) * rand(B)).to(torch.float32)
    # 6. solarize
    solarize = rand(B) < rec.solarize_p
    return AugmentParams(
        crop=crop, flip=flip, jitter=jitter, factors=factors.to(torch.float32), order=order,
        gray=gray, blur=blur, sigma=sigma, taps=gaussian_taps(sigma, rec.kernel_size(out_size)),
        solarize=solarize, solarize_threshold=float(rec.solarize_threshold), in_sizes=sizes)


# ---------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------


def _check_images(images):
    """-> (list of [3, H, W] tensors, is_uint8, device). Raises on bad input."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a [B, 3, H, W] batch, got shape "
                             f"{tuple(images.shape)}")
        items = list(images.unbind(0)) if images.shape[0] > 0 else []
        shape_desc = f"shape {tuple(images.shape)}"
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch (B = 0)")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 (RGB) channels, got {shape_desc}")
        dtype, device = images.dtype, images.device
    elif isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images is an empty list")
        items = list(images)
        for i, im in enumerate(items):
            if not isinstance(im, torch.Tensor):
                raise TypeError(f"images[{i}] must be a torch.Tensor, got {type(im).__name__}")
            if im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"images[{i}] must be [3, H, W] (RGB), got shape "
                                 f"{tuple(im.shape)}")
        dtype, device = items[0].dtype, items[0].device
        for i, im in enumerate(items):
            if im.dtype != dtype or im.device != device:
                raise ValueError(f"images[{i}] is {im.dtype} on {im.device}, but images[0] is "
                                 f"{dtype} on {device}: all images must match")
    else:
        raise TypeError(f"images must be a [B, 3, H, W] tensor or a list of [3, H, W] tensors, "
                        f"got {type(images).__name__}")
    if device.type == "meta":
        raise ValueError("images are meta tensors (shapes without data): augmentation reads "
                         "pixel values, pass CPU or CUDA images")
    if dtype != torch.uint8 and dtype not in (torch.float32, torch.float64, torch.float16,
                                              torch.bfloat16):
        raise TypeError(f"images must be uint8 (0..255) or floating point in [0, 1], got "
                        f"{dtype}")
    for i, im in enumerate(items):
        if im.shape[1] < 1 or im.shape[2] < 1:
            raise ValueError(f"images[{i}] is empty: shape {tuple(im.shape)}")
    return items, dtype == torch.uint8, device


def _check_params(params: AugmentParams, items: list) -> None:
    if not isinstance(params, AugmentParams):
        raise TypeError(f"params must be AugmentParams (from sample_params), got "
                        f"{type(params).__name__}")
    B = len(items)
    if params.batch_size != B:
        raise ValueError(f"params were drawn for {params.batch_size} images, got {B}")
    crop = params.crop
    hw = torch.tensor([[im.shape[1], im.shape[2]] for im in items], dtype=torch.int64)
    bad = ((crop[:, 0] < 0) | (crop[:, 1] < 0) | (crop[:, 2] < 1) | (crop[:, 3] < 1)
           | (crop[:, 0] + crop[:, 2] > hw[:, 0]) | (crop[:, 1] + crop[:, 3] > hw[:, 1]))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"crop {tuple(crop[i].tolist())} of sample {i} does not fit its image "
                         f"of size {tuple(hw[i].tolist())}: were the params drawn for these "
                         "images' sizes?")
    if params.taps.dim() != 2 or params.taps.shape[0] != B or params.taps.shape[1] % 2 != 1:
        raise ValueError(f"params.taps must be (B, K) with K odd, got {tuple(params.taps.shape)}")


def _norm_vector(name: str, v) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).reshape(-1).cpu()
    if t.numel() != 3:
        raise ValueError(f"{name} must have 3 values (one per channel), got {t.numel()}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t


def apply(images, params: AugmentParams, out_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
          out_dtype: torch.dtype = torch.float32, backend: str = "auto", *,
          rot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Applies per-sample augmentation parameters to a batch of images, in one fused pass.

    Args:
        images: a uint8 batch [B, 3, H, W] (0..255), a floating batch [B, 3, H, W] in [0, 1],
            or a list of B uint8 (or float) images [3, H_i, W_i] of different sizes. CPU or
            CUDA. Floats are computed in float32 and not clamped on input (values outside
            [0, 1] are clamped by the first jitter op only).
        params: from :func:`sample_params` for these images' sizes.
        out_size: side of the square output.
        mean, std: per-channel normalisation ``(x - mean) / std`` of the [0, 1] result
            (``mean=(0,0,0), std=(1,1,1)`` keeps [0, 1]). std must be non-zero.
        out_dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"cpp"``, ``"triton"`` or
            ``"reference"``.
        rot: optional (B,) integer tensor of 0..3 (CPU): view b is ``torch.rot90(view, rot[b])``
            (counter-clockwise), folded into the kernels' store index (the rotation pretext
            task, :mod:`fastssl.pretext`).

    Returns:
        [B, 3, out_size, out_size] in ``out_dtype``, on the images' device.

    Raises:
        TypeError: non-tensor images, dtypes other than uint8 / floating point, bad out_dtype.
        ValueError: channel count != 3, an empty batch, out_size < 1, params drawn for another
            batch size or other image sizes, mean/std of the wrong length, zero std.

    Example:
        >>> import torch
        >>> from fastssl import augment
        >>> x = torch.randint(0, 256, (2, 3, 20, 30), dtype=torch.uint8)
        >>> p = augment.sample_params(2, (20, 30), 16, generator=torch.Generator().manual_seed(1))
        >>> y = augment.apply(x, p, 16, mean=(0, 0, 0), std=(1, 1, 1))
        >>> ref = augment.apply(x, p, 16, mean=(0, 0, 0), std=(1, 1, 1), backend="reference")
        >>> bool((y - ref).abs().max() <= 1e-5)
        True
    """
    out_size = _check_out_size(out_size)
    items, is_u8, device = _check_images(images)
    _check_params(params, items)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    mean_t, std_t = _norm_vector("mean", mean), _norm_vector("std", std)
    if bool((std_t == 0).any()):
        raise ValueError(f"std must be non-zero, got {std_t.tolist()}")
    if rot is not None:
        if not isinstance(rot, torch.Tensor) or rot.dtype.is_floating_point \
                or rot.dtype == torch.bool or rot.shape != (len(items),):
            raise ValueError(f"rot must be an integer tensor of shape ({len(items)},)")
        rot = rot.to("cpu", torch.int64)
        if bool(((rot < 0) | (rot > 3)).any()):
            raise ValueError(f"rot must hold values in 0..3, got {rot.tolist()}")
    be = _dispatch.resolve(backend, device, op="augment", cpp_op="ssl_augment",
                           has_triton=True)
    if be == "reference":
        return reference.ssl_augment(items, params, out_size, mean_t, std_t, out_dtype, rot)
    if not is_u8:
        items = [im.float() for im in items]
    # C++ on CPU images, Triton on CUDA images: the op's dispatcher picks.
    from .ops import augment as ops_augment
    return ops_augment.ssl_augment(items, params, out_size, mean_t, std_t, out_dtype, rot)


class SSLAugment:
    """Two-view SSL augmentation with per-sample parameters: ``view0, view1 = aug(images)``.

    Usable as a DataLoader ``collate_fn`` (CPU, inside workers: see :meth:`collate`) or on a
    GPU batch after the transfer.

    Args:
        out_size: side of the square views (224).
        recipe: ``"simclr"``, ``"byol"``, ``"mocov2"``, an :class:`AugmentRecipe`, or a pair
            of them (views 0 and 1).
        strength: SimCLR's colour-jitter strength ``s``.
        mean, std: normalisation (ImageNet's by default).
        out_dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.
        backend: as in :func:`apply`.
        generator: CPU ``torch.Generator`` for the parameters (None: torch's default one; in
            DataLoader workers that one is seeded differently per worker, whereas one
            generator object passed here is copied into every worker with the same state).

    Example:
        >>> import torch, fastssl
        >>> aug = fastssl.SSLAugment(out_size=24, recipe="byol")
        >>> v0, v1 = aug([torch.zeros(3, 30, 40, dtype=torch.uint8),
        ...               torch.zeros(3, 50, 20, dtype=torch.uint8)])
        >>> tuple(v1.shape)
        (2, 3, 24, 24)
    """

    def __init__(self, out_size: int = 224, recipe="simclr", *, strength: float = 1.0,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, out_dtype: torch.dtype = torch.float32,
                 backend: str = "auto", generator: Optional[torch.Generator] = None):
        self.out_size = _check_out_size(out_size)
        self.recipes = (get_recipe(recipe, 0, strength=strength),
                        get_recipe(recipe, 1, strength=strength))
        if out_dtype not in OUT_DTYPES:
            raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        self.mean, self.std = _norm_vector("mean", mean), _norm_vector("std", std)
        if bool((self.std == 0).any()):
            raise ValueError(f"std must be non-zero, got {self.std.tolist()}")
        _check_generator(generator)
        self.out_dtype, self.backend, self.generator = out_dtype, backend, generator

    def sample(self, images) -> tuple:
        """The (params view 0, params view 1) that :meth:`__call__` would draw."""
        items, _, _ = _check_images(images)
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in items]
        return tuple(sample_params(len(items), sizes, self.out_size, self.recipes[v], v,
                                   self.generator) for v in (0, 1))

    def __call__(self, images) -> tuple:
        p0, p1 = self.sample(images)
        return tuple(apply(images, p, self.out_size, self.mean, self.std, self.out_dtype,
                           self.backend) for p in (p0, p1))

    def collate(self, batch: list) -> tuple:
        """A DataLoader ``collate_fn``: a list of images or of (image, label, ...) tuples ->
        ``((view0, view1), labels)`` (labels None for bare images)."""
        if len(batch) and isinstance(batch[0], (tuple, list)):
            images = [b[0] for b in batch]
            rest = torch.utils.data.default_collate([tuple(b[1:]) for b in batch])
            labels = rest[0] if len(rest) == 1 else rest
        else:
            images, labels = list(batch), None
        return self(images), labels

    def __repr__(self) -> str:
        return (f"SSLAugment(out_size={self.out_size}, recipes={self.recipes}, "
                f"out_dtype={self.out_dtype}, backend={self.backend!r})")
