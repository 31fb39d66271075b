"""Small embedded datasets for ``fastssl train``: no download, no extra dependency.

* :func:`shapes` -- procedural RGB 32x32 images of six shape classes (circle, ring, square,
  triangle, cross, half-disc) under the nuisance variation that SSL augmentations target:
  position, scale, rotation, foreground/background colour, a background gradient, clutter
  strokes and pixel noise. Fully determined by ``seed`` (a ``torch.Generator``); every
  nuisance is drawn independently of the class, uniformly over the ranges documented below.
  History, for honesty: a first version (radius 4.5-9 px, 3 long image-spanning strokes) left
  all three probes at chance (SSL 18.8%, random 16.6%, pixels 16.2%, simclr 20 epochs): the
  strokes, bigger than the shape, were what told images apart. The shapes were made larger
  and the strokes shorter once; the ranges were not tuned further.
* :func:`digits` -- scikit-learn's copy of the UCI optical-recognition handwritten digits
  (1,797 grey 8x8 images, values 0..16, 10 classes), shipped as ``fastssl/data/digits.npz``
  (BSD-3-Clause, as distributed by scikit-learn; originally from the UCI ML repository).

Both return a :class:`Dataset`: ``images`` uint8 (N, 3, 32, 32) for the SSL pipeline,
``labels`` int64 (N,), ``pixels`` float32 (N, P) in [0, 1] at the native resolution (the
raw-pixel probe), and a fixed ``train``/``test`` split (index tensors).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SHAPE_CLASSES = ("circle", "ring", "square", "triangle", "cross", "half-disc")
DATASETS = ("shapes", "digits")


@dataclass
class Dataset:
    name: str
    images: torch.Tensor   # uint8 (N, 3, 32, 32)
    labels: torch.Tensor   # int64 (N,)
    pixels: torch.Tensor   # float32 (N, P) in [0, 1], native resolution
    train: torch.Tensor    # int64 indices
    test: torch.Tensor     # int64 indices
    classes: tuple

    def __len__(self) -> int:
        return self.images.shape[0]


# ---------------------------------------------------------------------------------------
# shapes: signed-distance rendering, vectorised over the batch
# ---------------------------------------------------------------------------------------

def _sdf_box(px, py, bx, by):
    qx, qy = px.abs() - bx, py.abs() - by
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.minimum(torch.maximum(qx, qy), torch.zeros_like(qx))


def _sdf_triangle(px, py):
    # Equilateral triangle of circumradius ~1 (Inigo Quilez's exact SDF).
    k = math.sqrt(3.0)
    px = px.abs() - 1.0
    py = py + 1.0 / k
    flip = px + k * py > 0
    px, py = (torch.where(flip, (px - k * py) / 2, px), torch.where(flip, (-k * px - py) / 2, py))
    px = px - px.clamp(-2.0, 0.0)
    return -torch.sqrt(px * px + py * py) * torch.sign(py)


def _shape_sdf(cls, px, py):
    """SDF (unit-size local coordinates, negative inside) of class ``cls`` (N,) at (N, H, W)."""
    r = torch.sqrt(px * px + py * py)
    c = cls.view(-1, 1, 1)
    sdfs = [
        r - 1.0,                                                           # circle
        (r - 0.72).abs() - 0.28,                                           # ring
        _sdf_box(px, py, 0.8, 0.8),                                        # square
        _sdf_triangle(px, py),                               # triangle
        torch.minimum(_sdf_box(px, py, 1.0, 0.3), _sdf_box(px, py, 0.3, 1.0)),  # cross
        torch.maximum(r - 1.0, py - 0.15),                                 # half-disc
    ]
    out = sdfs[0]
    for i, s in enumerate(sdfs[1:], start=1):
        out = torch.where(c == i, s, out)
    return out


def _segment_dist(px, py, ax, ay, bx, by):
    vx, vy = bx - ax, by - ay
    wx, wy = px - ax, py - ay
    t = ((wx * vx + wy * vy) / (vx * vx + vy * vy + 1e-8)).clamp(0, 1)
    dx, dy = wx - t * vx, wy - t * vy
    return torch.sqrt(dx * dx + dy * dy)


def _u(g, n, lo, hi, *shape):
    return lo + (hi - lo) * torch.rand(n, *shape, generator=g)


def render_shapes(n: int, seed: int = 0, size: int = 32, *, clutter: int = 3,
                  noise: float = 0.03,
                  labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders ``n`` shape images, deterministically from ``seed``.

    Per image, independently of the class (coordinates: the image spans [-1, 1]):

    * class: ``labels`` if given, else uniform over :data:`SHAPE_CLASSES` (6 classes);
    * scale (circumradius): U(0.35, 0.65), i.e. 5.6 to 10.4 pixels at 32x32;
    * centre: U(-0.45, 0.45) per axis; rotation: U(0, 2*pi);
    * background: a random RGB colour U(0, 1)^3 plus a linear gradient of amplitude U(0, 0.3)
      in a random direction;
    * foreground colour: U(0, 1)^3, redrawn (up to 8 times) while its RGB distance to the
      background colour is < 0.35, so that the shape stays visible;
    * clutter: ``clutter`` strokes (line segments centred U(-1, 1)^2, length U(0.2, 0.6),
      random direction, half-width U(0.015, 0.04), random colour) drawn behind the shape;
    * Gaussian pixel noise of std ``noise``; anti-aliased edges (1-pixel ramp).

    Returns:
        images: uint8 (n, 3, size, size); labels: int64 (n,).

    Example:
        >>> imgs, labels = render_shapes(4, seed=1)
        >>> imgs.shape, imgs.dtype, labels.tolist() == render_shapes(4, seed=1)[1].tolist()
        (torch.Size([4, 3, 32, 32]), torch.uint8, True)
    """
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        labels = torch.randint(len(SHAPE_CLASSES), (n,), generator=g)
    elif labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    scale = _u(g, n, 0.35, 0.65)
    cx, cy = _u(g, n, -0.45, 0.45), _u(g, n, -0.45, 0.45)
    theta = _u(g, n, 0.0, 2 * math.pi)
    bg = torch.rand(n, 3, generator=g)
    grad_amp = _u(g, n, 0.0, 0.3)
    grad_dir = _u(g, n, 0.0, 2 * math.pi)
    fg = torch.rand(n, 3, generator=g)
    for _ in range(8):  # keep the shape visible: redraw colours too close to the background
        close = (fg - bg).norm(dim=1) < 0.35
        fg = torch.where(close[:, None], torch.rand(n, 3, generator=g), fg)
    seg_c = _u(g, n, -1.0, 1.0, clutter, 2)
    seg_len = _u(g, n, 0.2, 0.6, clutter)
    seg_dir = _u(g, n, 0.0, 2 * math.pi, clutter)
    half = torch.stack([torch.cos(seg_dir), torch.sin(seg_dir)], -1) * seg_len[..., None] / 2
    seg = torch.cat([seg_c - half, seg_c + half], -1)  # (n, clutter, [ax, ay, bx, by])
    seg_w = _u(g, n, 0.015, 0.04, clutter)
    seg_col = torch.rand(n, clutter, 3, generator=g)
    pix_noise = noise * torch.randn(n, 3, size, size, generator=g)

    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    xx, yy = xx.expand(n, size, size), yy.expand(n, size, size)
    px_size = 2.0 / size

    # background colour + linear gradient
    ramp = (xx * torch.cos(grad_dir)[:, None, None] + yy * torch.sin(grad_dir)[:, None, None])
    img = bg[:, :, None, None] + (grad_amp[:, None, None] * ramp)[:, None]
    # clutter strokes, behind the shape
    for k in range(clutter):
        d = _segment_dist(xx, yy, *(seg[:, k, j, None, None] for j in range(4)))
        a = (0.5 - (d - seg_w[:, k, None, None]) / px_size).clamp(0, 1)[:, None]
        img = img * (1 - a) + seg_col[:, k, :, None, None] * a
    # the shape: rotate into its frame, scale to unit size, anti-alias over one pixel
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    lx, ly = (c * dx + s * dy) / scale[:, None, None], (-s * dx + c * dy) / scale[:, None, None]
    sdf = _shape_sdf(labels, lx, ly) * scale[:, None, None]
    alpha = (0.5 - sdf / px_size).clamp(0, 1)[:, None]
    img = img * (1 - alpha) + fg[:, :, None, None] * alpha
    img = (img + pix_noise).clamp(0, 1)
    return (img * 255).round().to(torch.uint8), labels


def _split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    n_test = int(round(n * test_fraction))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def _balanced_labels(n: int, n_classes: int, g: torch.Generator) -> torch.Tensor:
    """``n`` labels in random order with every class count within one of ``n / n_classes``."""
    return (torch.arange(n) % n_classes)[torch.randperm(n, generator=g)]


def shapes(n_train: int = 2048, n_test: int = 1024, seed: int = 0) -> Dataset:
    """The procedural shapes dataset (see :func:`render_shapes`): the first ``n_train``
    images are the training split (unlabelled for SSL, labelled for the probes), the next
    ``n_test`` the held-out split.

    Both splits are class-balanced (counts within one of each other), so chance on the
    held-out split is exactly 1 / 6 for any classifier that ignores its input, and a probe's
    accuracy is not shifted by which classes a small split happens to over-represent."""
    g = torch.Generator().manual_seed(seed + 104729)
    k = len(SHAPE_CLASSES)
    labels = torch.cat([_balanced_labels(n_train, k, g), _balanced_labels(n_test, k, g)])
    images, labels = render_shapes(n_train + n_test, seed=seed, labels=labels)
    idx = torch.arange(n_train + n_test)
    return Dataset("shapes", images, labels, images.flatten(1).float() / 255,
                   idx[:n_train], idx[n_train:], SHAPE_CLASSES)


DIGITS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.npz")


def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images), from the file shipped in the package.

    ``images`` are the 8x8 grey images scaled to 0..255, upsampled bilinearly to 32x32 and
    repeated over 3 channels (the SSL pipeline's input); ``pixels`` are the native 64 values
    / 16. The split is a seeded random ``test_fraction`` held out.
    """
    with np.load(DIGITS_PATH) as f:
        x = torch.from_numpy(f["images"].astype(np.float32))  # (1797, 8, 8), 0..16
        y = torch.from_numpy(f["target"].astype(np.int64))
    x01 = x / 16.0
    big = F.interpolate(x01[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    train, test = _split(x.shape[0], test_fraction, seed)
    return Dataset("digits", images, y, x01.flatten(1), train, test,
                   tuple(str(i) for i in range(10)))


def load(name: str, seed: int = 0) -> Dataset:
    if name == "shapes":
        return shapes(seed=seed)
    if name == "digits":
        return digits(seed=seed)
    raise ValueError(f"unknown dataset {name!r}: expected one of {DATASETS}")
