"""Pretext-task views with per-sample random parameters, on :mod:`fastssl.augment`'s fused pass.

``views, target = fastssl.PretextAugment(out_size, task)(images)``, for ``task`` in:

=================  ==========================================  ===============================
task               views                                       target
=================  ==========================================  ===============================
``"rotation"``     [B, 3, S, S] ``out_dtype``: the view turned  [B] int64 k in 0..3
                   by ``torch.rot90(view, k)`` (k x 90 deg,     (``torch.rot90(views[b],
                   counter-clockwise)                           -k[b])`` is the upright view)
``"jigsaw"``       [B, g*g, 3, t, t] ``out_dtype``: tile slot   [B] int64 permutation index
                   p holds grid cell ``perms[label][p]``        into :func:`jigsaw_permutations`
                   (cells row-major)
``"colorization"`` [B, 1, S, S] float32 luminance in [0, 1]     [B, 3, S, S] float32 RGB in
                   (0.2989 R + 0.587 G + 0.114 B)               [0, 1]
``"inpainting"``   [B, 3, S, S] ``out_dtype``: boxes set to     (clean [B, 3, S, S]
                   ``fill``                                     ``out_dtype``, mask [B, 1, S, S]
                                                                bool, True inside the boxes)
``"denoising"``    [B, 3, S, S] ``out_dtype``: clean + noise    clean [B, 3, S, S] ``out_dtype``
``"mae"``          [B, 3, S, S] ``out_dtype`` (the plain view)  (mask [B, L] bool, ids_keep
                                                                [B, L_keep] int64, ids_restore
                                                                [B, L] int64), L = (S / p)^2:
                                                                :func:`mae_mask`
=================  ==========================================  ===============================

Every view starts from the same fused crop + resize (+ colour, if the recipe asks) pass as
:class:`fastssl.SSLAugment`, so the tasks compose with its recipes: ``recipe=`` takes a name
(``"simclr"``, ...), an :class:`~fastssl.augment.AugmentRecipe`, or None for
:data:`PRETEXT_RECIPE` (random resized crop of scale (0.2, 1) + flip, no colour: MAE's and
RotNet's input pipeline). Where each task's own work happens:

* rotation: folded into the kernels' store index (``augment.apply(..., rot=)``): no extra pass.
* jigsaw: each tile is one sample of the fused kernel whose crop box is its grid cell of the
  image's crop, shrunk to the tile and jittered inside the cell (the gap), resized to t x t;
  the permutation only decides which box goes to which slot. So a tile is resampled straight
  from the input image (not cut out of a resized view), and colour ops, when the recipe has
  them, draw one parameter set per image, applied to its tiles (contrast takes each tile's own
  mean). The g*g boxes of an image are B * g * g samples of one kernel call: no extra pass.
* colorization: the fused kernel gives the colour view in [0, 1] (gray forced off); the
  luminance input is one weighted channel sum over it (a batched elementwise pass, not fused).
  The target is **RGB**, not Lab ab: the input is then exactly a linear function of the target
  (a model's prediction can be checked against its input), it is the kernel's own output (no
  non-linear Lab conversion, in the loop or in the loss), and MSE / L1 on it are the usual
  regression losses; a user who wants Zhang et al.'s Lab classification converts the target.
* inpainting: the fused kernel gives the clean view (the target); the boxes are erased in a
  copy of it (only the boxes are written).
* denoising: the fused kernel gives the clean view (the target); :func:`pretext_noise` adds
  the noise in one more pass, drawing it inside its kernel from a counter-based hash (no
  ``torch.randn`` of the batch, which was 70% of this view's time; measured figures:
  ``fastssl bench --op pretext_denoising``).
* mae: the view is the plain fused view; the mask is :func:`mae_mask`.

Random draws come from ``generator`` (a CPU ``torch.Generator``) in a fixed order, so a
seeded generator reproduces views and targets exactly on one device.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import _dispatch, augment, reference
from .augment import (IMAGENET_MEAN, IMAGENET_STD, OUT_DTYPES, AugmentParams, AugmentRecipe,
                      _check_generator, _check_images, _check_out_size, _norm_vector)

TASKS = ("rotation", "jigsaw", "colorization", "inpainting", "denoising", "mae")
NOISE_KINDS = ("gaussian", "masking")
# The crop + flip of MAE (scale (0.2, 1), flip) and RotNet, without colour ops.
PRETEXT_RECIPE = AugmentRecipe(crop_scale=(0.2, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0)

# Beyond 9 tiles the permutations are not enumerated: candidates are this many random ones.
_JIGSAW_POOL = 100_000


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------
# jigsaw permutations
# ---------------------------------------------------------------------------------------

def _all_permutations(n: int) -> torch.Tensor:
    """[n!, n] int8, every permutation of 0..n-1, the identity first (built by inserting the
    next value at every position, vectorised: 0.05 s for n = 9)."""
    perms = torch.zeros(1, 0, dtype=torch.int8)
    for k in range(1, n + 1):
        new = torch.full((perms.shape[0], 1), k - 1, dtype=torch.int8)
        perms = torch.cat([torch.cat([perms[:, :p], new, perms[:, p:]], 1) for p in range(k)])
    return (n - 1) - perms  # the first row was n-1, ..., 0: now the identity


# The default 3x3 set (100 permutations), shipped: a jigsaw head's labels mean these exact
# permutations, so the set a trained model depends on is a file in the package, not only the
# output of an algorithm (the test regenerates it and compares); it also skips the 1-3 s
# selection over 9! candidates on first use.
SHIPPED_PERMUTATIONS = (9, 100, "jigsaw_permutations_9x100.txt")


def _load_shipped_permutations() -> torch.Tensor:
    tiles, count, name = SHIPPED_PERMUTATIONS
    path = os.path.join(os.path.dirname(__file__), "data", name)
    with open(path) as f:
        rows = [[int(v) for v in line.split()] for line in f
                if line.strip() and not line.startswith("#")]
    perms = torch.tensor(rows, dtype=torch.int64)
    if perms.shape != (count, tiles):
        raise RuntimeError(f"{path}: expected {count} rows of {tiles} cells, got "
                           f"{tuple(perms.shape)} (a damaged install?)")
    return perms


@functools.lru_cache(maxsize=8)
def _jigsaw_permutations(num_tiles: int, count: int) -> torch.Tensor:
    if num_tiles == SHIPPED_PERMUTATIONS[0] and count <= SHIPPED_PERMUTATIONS[1]:
        return _load_shipped_permutations()[:count].clone()  # the greedy set is prefix-stable
    return _generate_permutations(num_tiles, count)


def _generate_permutations(num_tiles: int, count: int) -> torch.Tensor:
    if num_tiles <= 9:
        cands = _all_permutations(num_tiles)
    else:
        g = torch.Generator().manual_seed(num_tiles)
        cands = torch.argsort(torch.rand(_JIGSAW_POOL, num_tiles, generator=g), dim=1)
        cands = torch.cat([torch.arange(num_tiles)[None], cands]).to(torch.int8)
    if count > cands.shape[0]:
        raise ValueError(f"there are only {cands.shape[0]} candidate permutations of "
                         f"{num_tiles} tiles, asked for {count}")
    by_pos = cands.t().contiguous()  # [tiles, candidates]: one contiguous compare per position

    def hamming_to(n: int) -> torch.Tensor:
        d = torch.zeros(by_pos.shape[1], dtype=torch.int16)
        for i in range(num_tiles):
            d += by_pos[i] != by_pos[i, n]
        return d

    chosen = [0]  # the identity
    dmin = hamming_to(0)
    for _ in range(count - 1):
        nxt = int(torch.argmax(dmin))  # the first candidate farthest from the chosen set
        chosen.append(nxt)
        dmin = torch.minimum(dmin, hamming_to(nxt))
    return cands[chosen].to(torch.int64)


def jigsaw_permutations(num_tiles: int = 9, count: int = 100) -> torch.Tensor:
    """The fixed jigsaw permutation set: [count, num_tiles] int64, row p = label p.

    The default set (9 tiles, up to 100 permutations) is shipped with the package
    (``fastssl/data/jigsaw_permutations_9x100.txt``, read once); any other is generated on
    first use (then cached per process). Both come from Noroozi & Favaro's greedy
    maximal-Hamming-distance selection: start from the identity, then repeatedly add the
    candidate whose minimum Hamming distance to the chosen set is largest (ties: the first in
    the order of ``_all_permutations``). Candidates: all ``num_tiles!`` permutations for up
    to 9 tiles (3x3: 362,880; the selection takes 1-3 s on a loaded 2-core machine); beyond
    that, the identity and 100,000 random permutations from a generator
    seeded with ``num_tiles``. The set is a pure function of (num_tiles, count): the same on
    every machine and torch version (integer ops only).

    Example:
        >>> import fastssl
        >>> p = fastssl.pretext.jigsaw_permutations(4, 5)
        >>> p[0].tolist()
        [0, 1, 2, 3]
    """
    if not _is_int(num_tiles) or num_tiles < 2:
        raise ValueError(f"num_tiles must be an int >= 2, got {num_tiles!r}")
    if not _is_int(count) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    return _jigsaw_permutations(int(num_tiles), int(count)).clone()


# ---------------------------------------------------------------------------------------
# MAE masking
# ---------------------------------------------------------------------------------------

def mae_mask(batch: int, num_patches: int, ratio: float, *,
             generator: Optional[torch.Generator] = None, device=None,
             backend: str = "auto"):
    """MAE / SimMIM random masking: ``mask, ids_keep, ids_restore`` exactly as MAE uses them.

    ``L_keep = int(num_patches * (1 - ratio))`` patches are kept in every row (so the ratio is
    exact per sample, as in MAE). Each row is a uniformly random permutation ``ids_shuffle``
    (a Fisher-Yates shuffle from a counter-based hash of a seed drawn from ``generator``, one
    O(L) pass per row: no per-sample ``randperm``, no argsort):

    * ``ids_keep = ids_shuffle[:, :L_keep]``: the kept patches, in random order
      (``x_kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))``);
    * ``ids_restore = argsort(ids_shuffle)``: its inverse (MAE's decoder unshuffles with it);
    * ``mask[b, n]``: True where patch n is masked (removed), i.e. ``ids_restore >= L_keep``
      (MAE's 1 = remove). SimMIM uses ``mask`` alone.

    Args:
        batch: B >= 1.
        num_patches: L >= 1 (196 for 224^2 images and 16^2 patches).
        ratio: the masked fraction, in [0, 1].
        generator: CPU ``torch.Generator`` (None: torch's default generator); one 64-bit seed
            is drawn from it per call.
        device: where the outputs live (default CPU); CUDA runs the Triton kernel.
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"``.

    Returns:
        (mask [B, L] bool, ids_keep [B, L_keep] int64, ids_restore [B, L] int64).

    Example:
        >>> import torch, fastssl
        >>> m, keep, restore = fastssl.mae_mask(2, 196, 0.75,
        ...                                     generator=torch.Generator().manual_seed(0))
        >>> m.sum(1).tolist(), tuple(keep.shape)
        ([147, 147], (2, 49))
    """
    if not _is_int(batch) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if not _is_int(num_patches) or not 1 <= num_patches < 2 ** 31:
        raise ValueError(f"num_patches must be an int in [1, 2^31), got {num_patches!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) \
            or not math.isfinite(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
    _check_generator(generator)
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "meta":
        raise ValueError("mae_mask: meta device: pass a CPU or CUDA device")
    num_keep = int(num_patches * (1.0 - float(ratio)))
    seed = torch.randint(0, 2 ** 32, (2,), generator=generator, dtype=torch.int64)
    be = _dispatch.resolve(backend, device, op="mae_mask", cpp_op="mae_mask", has_triton=True)
    if be == "reference":
        out = reference.mae_mask(seed, int(batch), int(num_patches), num_keep)
        return tuple(t.to(device) for t in out)
    from .ops import pretext as _ops  # noqa: F401  (defines the op)
    return torch.ops.fastssl.mae_mask(seed.to(device), int(batch), int(num_patches), num_keep)


# ---------------------------------------------------------------------------------------
# denoising noise
# ---------------------------------------------------------------------------------------

def pretext_noise(clean: torch.Tensor, amount: torch.Tensor, seed: int, masking: bool = False,
                  fill: float = 0.0, *, backend: str = "auto") -> torch.Tensor:
    """The denoising task's corruption of ``clean``: Gaussian noise or dropped pixels, drawn
    inside the kernel from a counter-based hash of ``seed`` (spec:
    :func:`fastssl.reference.pretext_noise`).

    * ``masking=False``: ``clean + amount[b, c] * z``, z standard normal (Box-Muller; |z| is
      at most 5.77, the 24-bit uniform's tail), computed in float32, rounded once to
      ``clean``'s dtype;
    * ``masking=True``: each pixel (all its channels at once) is set to ``fill`` with
      probability ``amount[b, 0]``.

    The values depend only on (seed, sample, position): not on the backend, the device (up to
    a GPU's fp32 rounding) or the thread count.

    Args:
        clean: [B, C, H, W] float32 / bfloat16 / float16 (CPU or CUDA).
        amount: [B, C] (Gaussian: std per sample and channel, in ``clean``'s units) or
            [B, 1] (masking: drop probability), float32, finite, >= 0.
        seed: an int in [0, 2^64): its low and high 32 bits key the hash.
        masking: the noise kind.
        fill: the dropped pixels' value (masking).
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"``.

    Returns:
        noisy: like ``clean``.

    Example:
        >>> import torch
        >>> from fastssl.pretext import pretext_noise
        >>> x = torch.zeros(2, 3, 8, 8)
        >>> y = pretext_noise(x, torch.full((2, 3), 0.5), seed=7)
        >>> y.shape, bool(y.abs().max() <= 0.5 * 5.77)
        (torch.Size([2, 3, 8, 8]), True)
    """
    if not isinstance(clean, torch.Tensor) or clean.dim() != 4:
        raise ValueError(f"pretext_noise: clean must be a [B, C, H, W] tensor, got "
                         f"{getattr(clean, 'shape', type(clean).__name__)}")
    if clean.dtype not in OUT_DTYPES:
        raise TypeError(f"pretext_noise: clean must be float32, bfloat16 or float16, got "
                        f"{clean.dtype}")
    B, C = clean.shape[:2]
    want = (B, 1 if masking else C)
    if not isinstance(amount, torch.Tensor) or tuple(amount.shape) != want:
        raise ValueError(f"pretext_noise: amount must be a {list(want)} tensor for "
                         f"{'masking' if masking else 'Gaussian'} noise, got "
                         f"{getattr(amount, 'shape', type(amount).__name__)}")
    amount = amount.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(amount).all()) or bool((amount < 0).any()):
        raise ValueError("pretext_noise: amount must be finite and >= 0")
    if not _is_int(seed) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"pretext_noise: seed must be an int in [0, 2^64), got {seed!r}")
    if not isinstance(fill, numbers.Real) or not math.isfinite(fill):
        raise ValueError(f"pretext_noise: fill must be a finite number, got {fill!r}")
    device = clean.device
    seed_t = torch.tensor([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], dtype=torch.int64)
    be = _dispatch.resolve(backend, device, op="pretext_noise", cpp_op="pretext_noise",
                           has_triton=True)
    if be == "reference":
        return reference.pretext_noise(clean, amount, seed_t, bool(masking), float(fill))
    from .ops import pretext as _ops  # noqa: F401  (defines the op)
    return torch.ops.fastssl.pretext_noise(clean, amount.to(device), seed_t.to(device),
                                           bool(masking), float(fill))


# ---------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------

@dataclass
class PretextParams:
    """Per-sample parameters of one :class:`PretextAugment` call (host tensors).

    Attributes:
        task: the task name.
        aug: :class:`~fastssl.augment.AugmentParams` of the B views (jigsaw: of the B images;
            the tiles' own parameters are ``tile_aug``).
        label: rotation: (B,) k in 0..3; jigsaw: (B,) permutation index; else None.
        tile_aug: jigsaw: the B * g * g tiles' AugmentParams (sample ``b * g * g + p`` is slot
            p of image b); else None.
        boxes: inpainting: (B, n, 4) int64 ``(top, left, height, width)`` in output pixels.
        level: denoising: (B,) float32, the noise's std in [0, 1] pixel units (gaussian) or
            the fraction of pixels dropped (masking).
        noise_seed: denoising: the 64-bit seed of the noise (:func:`pretext_noise`: a
            counter-based hash, so the same noise on every backend and device).
        mae_seed: mae: the generator the mask is drawn from (a CPU generator seeded here).
    """

    task: str
    aug: AugmentParams
    label: Optional[torch.Tensor] = None
    tile_aug: Optional[AugmentParams] = None
    boxes: Optional[torch.Tensor] = None
    level: Optional[torch.Tensor] = None
    noise_seed: Optional[int] = None
    mae_seed: Optional[int] = None


def _range(name: str, v, lo: float, hi: float) -> tuple:
    if not isinstance(v, (tuple, list)) or len(v) != 2 or not all(
            isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
            for x in v) or not lo <= v[0] <= v[1] <= hi:
        raise ValueError(f"{name} must be a (min, max) pair with {lo} <= min <= max <= {hi}, "
                         f"got {v!r}")
    return float(v[0]), float(v[1])


class PretextAugment:
    """Pretext-task views: ``views, target = PretextAugment(out_size, task)(images)``.

    Shapes and dtypes of each task's output: the table in :mod:`fastssl.pretext`.

    Args:
        out_size: S, side of the square view (jigsaw: of the whole grid; the tiles are
            ``tile_size``).
        task: one of :data:`TASKS`.
        recipe: the crop / colour recipe (a name, an AugmentRecipe, or None for
            :data:`PRETEXT_RECIPE`). colorization forces gray off.
        mean, std: normalisation of the views (not of colorization's [0, 1] input / target).
        out_dtype: float32, bfloat16 or float16 (colorization: always float32).
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"``.
        generator: CPU ``torch.Generator`` for every random draw.
        grid: jigsaw's g (g x g tiles), >= 2.
        num_permutations: jigsaw's P (the label's range).
        tile_size: jigsaw's t; default ``round(S / g * 64 / 75)`` (Noroozi & Favaro: 64-pixel
            tiles in 75-pixel cells, so the gap averages 11 pixels).
        box_size: inpainting box side as a fraction of S, each side drawn in this range.
        num_boxes: inpainting boxes per image (their union is erased).
        fill: the value erased pixels / dropped pixels take, in the views' units (after
            mean / std: 0 is the mean colour).
        noise: ``"gaussian"`` (additive) or ``"masking"`` (pixels set to ``fill``).
        noise_level: (min, max) of the per-sample level (std in [0, 1] pixel units, or the
            drop probability).
        patch_size: mae's p (S must be a multiple).
        mask_ratio: mae's masked fraction.
    """

    def __init__(self, out_size: int = 224, task: str = "rotation", recipe=None, *,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, out_dtype: torch.dtype = torch.float32,
                 backend: str = "auto", generator: Optional[torch.Generator] = None,
                 grid: int = 3, num_permutations: int = 100, tile_size: Optional[int] = None,
                 box_size: Sequence[float] = (0.25, 0.5), num_boxes: int = 1,
                 fill: float = 0.0, noise: str = "gaussian",
                 noise_level: Sequence[float] = (0.05, 0.3), patch_size: int = 16,
                 mask_ratio: float = 0.75):
        self.out_size = _check_out_size(out_size)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task = task
        rec = PRETEXT_RECIPE if recipe is None else augment.get_recipe(recipe, 0)
        if task == "colorization":
            rec = dataclasses.replace(rec, gray_p=0.0)
        self.recipe = rec
        if out_dtype not in OUT_DTYPES:
            raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        self.mean, self.std = _norm_vector("mean", mean), _norm_vector("std", std)
        if bool((self.std == 0).any()):
            raise ValueError(f"std must be non-zero, got {self.std.tolist()}")
        _check_generator(generator)
        self.out_dtype, self.backend, self.generator = out_dtype, backend, generator
        if not _is_int(grid) or grid < 2:
            raise ValueError(f"grid must be an int >= 2, got {grid!r}")
        self.grid = int(grid)
        if not _is_int(num_permutations) or num_permutations < 1:
            raise ValueError(f"num_permutations must be an int >= 1, got {num_permutations!r}")
        self.num_permutations = int(num_permutations)
        cell = self.out_size / self.grid
        if tile_size is None:
            tile_size = max(1, int(round(cell * 64.0 / 75.0)))
        if not _is_int(tile_size) or not 1 <= tile_size <= int(cell):
            raise ValueError(f"tile_size must be an int in [1, out_size // grid = {int(cell)}],"
                             f" got {tile_size!r}")
        self.tile_size = int(tile_size)
        if task == "jigsaw" and self.out_size < self.grid:
            raise ValueError(f"out_size {self.out_size} is smaller than the grid {self.grid}")
        self.box_size = _range("box_size", box_size, 0.0, 1.0)
        if not _is_int(num_boxes) or num_boxes < 1:
            raise ValueError(f"num_boxes must be an int >= 1, got {num_boxes!r}")
        self.num_boxes = int(num_boxes)
        if isinstance(fill, bool) or not isinstance(fill, numbers.Real) \
                or not math.isfinite(fill):
            raise ValueError(f"fill must be a finite number, got {fill!r}")
        self.fill = float(fill)
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
        self.noise = noise
        self.noise_level = _range("noise_level", noise_level, 0.0,
                                  1.0 if noise == "masking" else math.inf)
        if not _is_int(patch_size) or patch_size < 1:
            raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}")
        if task == "mae" and self.out_size % patch_size:
            raise ValueError(f"out_size {self.out_size} is not a multiple of patch_size "
                             f"{patch_size}")
        self.patch_size = int(patch_size)
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real) \
                or not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio!r}")
        self.mask_ratio = float(mask_ratio)
        if task == "jigsaw":
            self.permutations = jigsaw_permutations(self.grid ** 2, self.num_permutations)

    # -- sampling -----------------------------------------------------------------------

    def sample(self, images) -> PretextParams:
        """The parameters :meth:`__call__` would draw for ``images``, in a fixed order:
        the view's AugmentParams (:func:`fastssl.augment.sample_params`), then the task's."""
        items, _, _ = _check_images(images)
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in items]
        B, g = len(items), self.generator
        aug = augment.sample_params(B, sizes, self.out_size, self.recipe, 0, g)
        p = PretextParams(self.task, aug)
        if self.task == "rotation":
            p.label = torch.randint(0, 4, (B,), generator=g, dtype=torch.int64)
        elif self.task == "jigsaw":
            p.label = torch.randint(0, self.num_permutations, (B,), generator=g,
                                    dtype=torch.int64)
            p.tile_aug = self._tile_params(aug, p.label, torch.rand(
                B, self.grid ** 2, 2, generator=g, dtype=torch.float64))
        elif self.task == "inpainting":
            u = torch.rand(B, self.num_boxes, 4, generator=g, dtype=torch.float64)
            lo, hi = self.box_size
            S = self.out_size
            h = torch.clamp(torch.round((lo + (hi - lo) * u[..., 0]) * S), 1, S)
            w = torch.clamp(torch.round((lo + (hi - lo) * u[..., 1]) * S), 1, S)
            top = torch.floor(u[..., 2] * (S - h + 1))
            left = torch.floor(u[..., 3] * (S - w + 1))
            p.boxes = torch.stack([top, left, h, w], dim=-1).to(torch.int64)
        elif self.task == "denoising":
            lo, hi = self.noise_level
            p.level = (lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)).float()
            p.noise_seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
        elif self.task == "mae":
            p.mae_seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
        return p

    def _tile_params(self, aug: AugmentParams, label: torch.Tensor,
                     jitter: torch.Tensor) -> AugmentParams:
        """AugmentParams of the B * g * g tiles: slot p of image b is the tile of grid cell
        ``perms[label[b], p]`` (row-major cells of the image's crop; with a flip, cell column
        c is taken from crop column g - 1 - c, the tile content flipped by the kernel)."""
        G, B = self.grid, aug.batch_size
        cells = self.permutations[label]  # [B, G*G]: cell shown in slot p
        row, col = cells // G, cells % G
        col = torch.where(aug.flip[:, None], G - 1 - col, col)
        top, left, ch, cw = (aug.crop[:, i, None].double() for i in range(4))
        frac = self.tile_size * G / self.out_size  # tile side / cell side
        cell_h, cell_w = ch / G, cw / G
        th = torch.clamp(torch.round(cell_h * frac), min=1).expand(B, G * G)
        tw = torch.clamp(torch.round(cell_w * frac), min=1).expand(B, G * G)
        ty = top + torch.floor(row * cell_h + jitter[..., 0] * torch.clamp(cell_h - th, min=0))
        tx = left + torch.floor(col * cell_w + jitter[..., 1] * torch.clamp(cell_w - tw, min=0))
        H = torch.tensor([s[0] for s in aug.in_sizes], dtype=torch.float64)[:, None]
        W = torch.tensor([s[1] for s in aug.in_sizes], dtype=torch.float64)[:, None]
        th, tw = torch.minimum(th, H), torch.minimum(tw, W)
        ty = torch.minimum(ty, H - th)
        tx = torch.minimum(tx, W - tw)
        crop = torch.stack([ty, tx, th, tw], dim=-1).reshape(B * G * G, 4).to(torch.int64)
        tiles = aug.select(torch.arange(B).repeat_interleave(G * G))
        # The blur's taps were sized for the full view: re-derive them for the tile size.
        tiles.taps = augment.gaussian_taps(tiles.sigma, self.recipe.kernel_size(self.tile_size))
        return dataclasses.replace(tiles, crop=crop)

    # -- applying -----------------------------------------------------------------------

    def apply(self, images, params: PretextParams):
        """Applies drawn parameters: ``(views, target)`` (shapes: :mod:`fastssl.pretext`)."""
        if not isinstance(params, PretextParams) or params.task != self.task:
            raise TypeError(f"params must be PretextParams of task {self.task!r}")
        items, _, device = _check_images(images)
        S, be = self.out_size, self.backend
        if self.task == "rotation":
            views = augment.apply(images, params.aug, S, self.mean, self.std, self.out_dtype,
                                  be, rot=params.label)
            return views, params.label.to(device)
        if self.task == "jigsaw":
            G2 = self.grid ** 2
            tiles = augment.apply([im for im in items for _ in range(G2)], params.tile_aug,
                                  self.tile_size, self.mean, self.std, self.out_dtype, be)
            return (tiles.view(len(items), G2, 3, self.tile_size, self.tile_size),
                    params.label.to(device))
        if self.task == "colorization":
            rgb = augment.apply(images, params.aug, S, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                                torch.float32, be)
            return luminance(rgb), rgb
        clean = augment.apply(images, params.aug, S, self.mean, self.std, self.out_dtype, be)
        if self.task == "mae":
            L = (S // self.patch_size) ** 2
            gen = torch.Generator().manual_seed(params.mae_seed)
            return clean, mae_mask(len(items), L, self.mask_ratio, generator=gen,
                                   device=device, backend=be)
        if self.task == "inpainting":
            # A copy, then only the boxes written (~10-25% of the pixels each): cheaper than
            # a select over the whole batch.
            erased = clean.clone()
            for b, boxes in enumerate(params.boxes.tolist()):
                for top, left, h, w in boxes:
                    erased[b, :, top:top + h, left:left + w] = self.fill
            return erased, (clean, box_mask(params.boxes.to(device), S))
        # denoising: the noise is drawn inside the kernel (pretext_noise), not by torch.randn
        level = params.level.to(torch.float32)
        masking = self.noise == "masking"
        amount = level[:, None] if masking else level[:, None] / self.std.float()[None, :]
        noisy = pretext_noise(clean, amount, params.noise_seed, masking, self.fill,
                              backend=be)
        return noisy, clean

    def __call__(self, images):
        return self.apply(images, self.sample(images))

    def __repr__(self) -> str:
        return (f"PretextAugment(out_size={self.out_size}, task={self.task!r}, "
                f"recipe={self.recipe}, backend={self.backend!r})")


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] -> [B, 1, S, S]: 0.2989 R + 0.587 G + 0.114 B (the kernels' gray), in
    three passes (a product, then two scaled adds) instead of five."""
    lum = rgb[:, 0:1] * reference.GRAY_WEIGHTS[0]
    lum.add_(rgb[:, 1:2], alpha=reference.GRAY_WEIGHTS[1])
    return lum.add_(rgb[:, 2:3], alpha=reference.GRAY_WEIGHTS[2])


def box_mask(boxes: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, n, 4) ``(top, left, height, width)`` boxes -> [B, 1, S, S] bool, True inside any
    box (one broadcast compare per axis, no per-sample loop)."""
    r = torch.arange(out_size, device=boxes.device)
    top, left = boxes[..., 0, None], boxes[..., 1, None]
    in_y = (r >= top) & (r < top + boxes[..., 2, None])  # [B, n, S]
    in_x = (r >= left) & (r < left + boxes[..., 3, None])
    return (in_y[..., :, None] & in_x[..., None, :]).any(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------------
# multi-crop (DINO, SwAV)
# ---------------------------------------------------------------------------------------

class MultiCropAugment:
    """DINO's multi-crop: 2 global views (scale ``global_scale``, side ``global_size``) and
    ``n_local`` local views (scale ``local_scale``, side ``local_size``) of every image:
    ``views = aug(images)``, a list ``[global0, global1, local0, ..., local{n-1}]`` of
    [B, 3, side, side] tensors.

    Recipes (Caron et al. 2021, DINO's ``DataAugmentationDINO``): flip p=0.5, colour jitter
    (0.4, 0.4, 0.2, 0.1) p=0.8, gray p=0.2; global 0: blur p=1.0; global 1: blur p=0.1,
    solarize p=0.2; locals: blur p=0.5. Pass ``global_recipes`` (a pair) / ``local_recipe``
    (an :class:`~fastssl.augment.AugmentRecipe`) to change them (their crop_scale is replaced
    by ``global_scale`` / ``local_scale``). The blur's sigma is (0.1, 2) as in DINO; its
    kernel is 10% of the view side (the SimCLR rule of :mod:`fastssl.augment`).

    Each global view is one fused kernel call; all ``n_local * B`` local crops are one call
    (the images are indexed, not copied).
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 6, *,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), global_recipes=None,
                 local_recipe: Optional[AugmentRecipe] = None, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, out_dtype: torch.dtype = torch.float32,
                 backend: str = "auto", generator: Optional[torch.Generator] = None):
        self.global_size = _check_out_size(global_size)
        self.local_size = _check_out_size(local_size)
        if not _is_int(n_local) or n_local < 0:
            raise ValueError(f"n_local must be an int >= 0, got {n_local!r}")
        self.n_local = int(n_local)
        gs, ls = _range("global_scale", global_scale, 0.0, 1.0), \
            _range("local_scale", local_scale, 0.0, 1.0)
        if gs[1] <= 0 or ls[1] <= 0:
            raise ValueError("global_scale / local_scale max must be > 0")
        base = AugmentRecipe(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        if global_recipes is None:
            global_recipes = (dataclasses.replace(base, blur_p=1.0),
                              dataclasses.replace(base, blur_p=0.1, solarize_p=0.2))
        if not isinstance(global_recipes, (tuple, list)) or len(global_recipes) != 2 \
                or not all(isinstance(r, AugmentRecipe) for r in global_recipes):
            raise TypeError("global_recipes must be a pair of AugmentRecipe")
        local_recipe = dataclasses.replace(base, blur_p=0.5) if local_recipe is None \
            else local_recipe
        if not isinstance(local_recipe, AugmentRecipe):
            raise TypeError("local_recipe must be an AugmentRecipe")
        self.global_recipes = tuple(dataclasses.replace(r, crop_scale=gs)
                                    for r in global_recipes)
        self.local_recipe = dataclasses.replace(local_recipe, crop_scale=ls)
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
        """(params global 0, params global 1, params of the n_local * B local crops; sample
        ``i * B + b`` is local view i of image b), drawn in that order."""
        items, _, _ = _check_images(images)
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in items]
        B, g = len(items), self.generator
        glob = [augment.sample_params(B, sizes, self.global_size, self.global_recipes[v], 0, g)
                for v in (0, 1)]
        loc = augment.sample_params(B * self.n_local, sizes * self.n_local, self.local_size,
                                    self.local_recipe, 0, g) if self.n_local else None
        return glob[0], glob[1], loc

    def apply(self, images, params: tuple) -> list:
        items, _, _ = _check_images(images)
        g0, g1, loc = params
        args = (self.mean, self.std, self.out_dtype, self.backend)
        views = [augment.apply(images, p, self.global_size, *args) for p in (g0, g1)]
        if self.n_local:
            local = augment.apply(items * self.n_local, loc, self.local_size, *args)
            views += list(local.view(self.n_local, len(items), 3, self.local_size,
                                     self.local_size).unbind(0))
        return views

    def __call__(self, images) -> list:
        return self.apply(images, self.sample(images))

    def __repr__(self) -> str:
        return (f"MultiCropAugment(global_size={self.global_size}, local_size="
                f"{self.local_size}, n_local={self.n_local}, backend={self.backend!r})")
