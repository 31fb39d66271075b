"""``fastssl augment-demo``: a PNG grid of built-in test images and their augmented view pairs,
so a person can check that the augmentations look right.

The test images are drawn procedurally (no downloads): a landscape (sky gradient, sun, hills,
a house with a checkered roof), a hue wheel (hue jitter rotates it, saturation jitter fades it,
gray removes it) and a test card (colour bars, gray ramp, fine stripes that show the blur).

Each row: the original (resized to the view size), then ``--pairs`` pairs of views (view 0,
view 1) drawn with per-sample parameters; a white gap separates the pairs. The PNG carries its
own labels (column titles above, row titles on the left), drawn with matplotlib; without
matplotlib the bare grid is written and the labels are printed instead.
"""
from __future__ import annotations

import math
import struct
import zlib

import torch

from .. import augment

GAP = 6  # pixels between tiles


def _landscape(h: int, w: int) -> torch.Tensor:
    y = torch.linspace(0, 1, h)[:, None].expand(h, w)
    x = torch.linspace(0, 1, w)[None, :].expand(h, w)
    img = torch.stack([0.35 + 0.4 * y, 0.6 + 0.3 * y, torch.ones_like(y)])  # sky
    sun = ((x - 0.78) ** 2 + (y - 0.2) ** 2) < 0.09 ** 2
    img[:, sun] = torch.tensor([1.0, 0.85, 0.2])[:, None]
    far = y > 0.55 + 0.08 * torch.sin(x * 9.0)
    img[:, far] = torch.tensor([0.25, 0.55, 0.3])[:, None]
    near = y > 0.72 + 0.05 * torch.sin(x * 5.0 + 1.0)
    img[:, near] = torch.tensor([0.15, 0.7, 0.2])[:, None]
    wall = (x > 0.15) & (x < 0.42) & (y > 0.5) & (y < 0.8)
    img[:, wall] = torch.tensor([0.85, 0.8, 0.65])[:, None]
    roof = (y > 0.3) & (y <= 0.5) & ((x - 0.285).abs() < (y - 0.3) * 0.9)
    checker = ((x * 40).floor() + (y * 40).floor()) % 2 == 0
    img[:, roof & checker] = torch.tensor([0.75, 0.1, 0.1])[:, None]
    img[:, roof & ~checker] = torch.tensor([0.45, 0.05, 0.05])[:, None]
    door = (x > 0.25) & (x < 0.32) & (y > 0.63) & (y < 0.8)
    img[:, door] = torch.tensor([0.35, 0.2, 0.1])[:, None]
    return img


def _hue_wheel(h: int, w: int) -> torch.Tensor:
    y = torch.linspace(-1, 1, h)[:, None].expand(h, w)
    x = torch.linspace(-1, 1, w)[None, :].expand(h, w)
    r = torch.sqrt(x ** 2 + y ** 2)
    hue = (torch.atan2(y, x) / (2 * math.pi)) % 1.0
    sat = r.clamp(max=1.0)
    hsv = torch.stack([hue, sat, torch.ones_like(hue)])
    img = augment.reference.hsv_to_rgb(hsv)
    img[:, r > 0.95] = torch.linspace(0.1, 0.9, w).expand(h, w)[r > 0.95]  # a gray ramp
    return img


def _test_card(h: int, w: int) -> torch.Tensor:
    img = torch.zeros(3, h, w)
    bars = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1], [0, 1, 0], [1, 0, 1], [1, 0, 0],
                         [0, 0, 1], [0, 0, 0]], dtype=torch.float32)
    top = h // 2
    for i in range(8):
        img[:, :top, i * w // 8:(i + 1) * w // 8] = bars[i][:, None, None]
    ramp = torch.linspace(0, 1, w)
    img[:, top:top + h // 6, :] = ramp
    x = torch.arange(w, dtype=torch.float32)
    stripes = 0.5 + 0.5 * torch.sign(torch.sin(x * math.pi / (1 + (x / w * 6).floor())))
    img[:, top + h // 6:, :] = stripes
    return img


def test_images(size: int = 256) -> torch.Tensor:
    """[3, 3, size, size] uint8: landscape, hue wheel, test card."""
    imgs = torch.stack([f(size, size) for f in (_landscape, _hue_wheel, _test_card)])
    return (imgs.clamp(0, 1) * 255).round().to(torch.uint8)


def write_png(path: str, image: torch.Tensor) -> None:
    """Writes a uint8 [3, H, W] image as an 8-bit RGB PNG (zlib only, no imaging library)."""
    _, h, w = image.shape
    rows = image.permute(1, 2, 0).contiguous().numpy()
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def make_grid(recipe: str = "simclr", out_size: int = 128, pairs: int = 3, seed: int = 0,
              backend: str = "auto") -> torch.Tensor:
    """The demo grid as a uint8 [3, H, W] image."""
    images = test_images()
    n = images.shape[0]
    aug = augment.SSLAugment(out_size, recipe, mean=(0, 0, 0), std=(1, 1, 1),
                             backend=backend, generator=torch.Generator().manual_seed(seed))
    originals = torch.nn.functional.interpolate(images.float() / 255, size=(out_size, out_size),
                                                mode="bilinear", antialias=True,
                                                align_corners=False).clamp(0, 1)
    views = [aug(images) for _ in range(pairs)]  # each (view0, view1) of [n, 3, s, s]
    cols = 1 + 2 * pairs
    s, g = out_size, GAP
    width = cols * s + (pairs + 2) * g + (cols - 1 - pairs) * 1
    grid = torch.ones(3, n * s + (n + 1) * g, width)
    for i in range(n):
        y = g + i * (s + g)
        x = g
        grid[:, y:y + s, x:x + s] = originals[i]
        x += s + g
        for v0, v1 in views:
            grid[:, y:y + s, x:x + s] = v0[i].float()
            grid[:, y:y + s, x + s + 1:x + 2 * s + 1] = v1[i].float()
            x += 2 * s + 1 + g
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8)


ROW_NAMES = ("landscape", "hue wheel", "test card")


def column_names(pairs: int) -> list[str]:
    names = ["original"]
    for k in range(1, pairs + 1):
        names += [f"pair {k}: view 0", f"pair {k}: view 1"]
    return names


def column_centres(out_size: int, pairs: int) -> list[float]:
    """x of each tile's centre in :func:`make_grid`'s layout, in pixels."""
    s, g = out_size, GAP
    xs = [g + s / 2]
    x = g + s + g
    for _ in range(pairs):
        xs += [x + s / 2, x + s + 1 + s / 2]
        x += 2 * s + 1 + g
    return xs


def write_labelled_png(path: str, grid: torch.Tensor, out_size: int, pairs: int,
                       title: str) -> bool:
    """Writes ``grid`` with column titles above, row titles on the left and ``title`` on
    top, at one image pixel per PNG pixel. Returns False (and writes nothing) when
    matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    _, h, w = grid.shape
    top, left, dpi = 44, 78, 100
    fig = plt.figure(figsize=((w + left) / dpi, (h + top) / dpi), dpi=dpi)
    ax = fig.add_axes([left / (w + left), 0, w / (w + left), h / (h + top)])
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    fs = max(6.0, min(9.0, out_size / 14))
    for x, name in zip(column_centres(out_size, pairs), column_names(pairs)):
        ax.text(x, -4, name, ha="center", va="bottom", fontsize=fs, clip_on=False)
    for i, name in enumerate(ROW_NAMES[:(h - GAP) // (out_size + GAP)]):
        y = GAP + i * (out_size + GAP) + out_size / 2
        ax.text(-6, y, name, ha="right", va="center", fontsize=fs, clip_on=False)
    fig.text(0.5, 1 - 4 / (h + top), title, ha="center", va="top", fontsize=fs + 1)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


def add_arguments(p) -> None:
    p.add_argument("--recipe", default="simclr", choices=augment.RECIPES,
                   help="augmentation recipe")
    p.add_argument("--out", default="views.png", help="PNG file to write")
    p.add_argument("--size", type=int, default=128, help="side of each view (pixels)")
    p.add_argument("--pairs", type=int, default=3, help="view pairs per image")
    p.add_argument("--seed", type=int, default=0, help="seeds the per-sample parameters")
    p.add_argument("--backend", default="auto", choices=("auto", "cpp", "triton", "reference"),
                   help="which implementation draws the views")


def run(args) -> int:
    grid = make_grid(args.recipe, args.size, args.pairs, args.seed, args.backend)
    title = (f"fastssl augment-demo: {args.recipe} recipe, {args.pairs} view pairs per image "
             f"(per-sample parameters), seed {args.seed}")
    labelled = write_labelled_png(args.out, grid, args.size, args.pairs, title)
    if not labelled:
        write_png(args.out, grid)
    print(f"wrote {args.out}: rows: {', '.join(ROW_NAMES)}; columns: original, then "
          f"{args.pairs} pairs (view 0 | view 1) of the {args.recipe} recipe"
          + ("" if labelled else " (no labels in the PNG: matplotlib is not installed)"))
    return 0
