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

from .. import augment, pretext

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
                       title: str, names=None, centres=None) -> bool:
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
    if names is None:
        names, centres = column_names(pairs), column_centres(out_size, pairs)
    for x, name in zip(centres, names):
        ax.text(x, -4, name, ha="center", va="bottom", fontsize=fs, clip_on=False)
    for i, name in enumerate(ROW_NAMES[:(h - GAP) // (out_size + GAP)]):
        y = GAP + i * (out_size + GAP) + out_size / 2
        ax.text(-6, y, name, ha="right", va="center", fontsize=fs, clip_on=False)
    fig.text(0.5, 1 - 4 / (h + top), title, ha="center", va="top", fontsize=fs + 1)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


# ---- pretext tasks and multi-crop (fastssl.pretext) ------------------------------------------

PRETEXT_DEMOS = pretext.TASKS + ("multicrop",)


def _on_canvas(img: torch.Tensor, size: int) -> torch.Tensor:
    """[3, h, w] in [0, 1] centred on a white size x size canvas (smaller views, tiles)."""
    canvas = torch.ones(3, size, size)
    h, w = img.shape[-2:]
    y, x = (size - h) // 2, (size - w) // 2
    canvas[:, y:y + h, x:x + w] = img.float().clamp(0, 1)
    return canvas


def _tile_grid(tiles: torch.Tensor, size: int) -> torch.Tensor:
    """[g*g, 3, t, t] tiles in row-major slots on a white size x size canvas, one cell each."""
    g = int(round(tiles.shape[0] ** 0.5))
    cell = size // g
    canvas = torch.ones(3, size, size)
    t = tiles.shape[-1]
    off = (cell - t) // 2
    for p in range(tiles.shape[0]):
        r, c = divmod(p, g)
        y, x = r * cell + off, c * cell + off
        canvas[:, y:y + t, x:x + t] = tiles[p].float().clamp(0, 1)
    return canvas


def pretext_panels(task: str, out_size: int = 128, samples: int = 2, seed: int = 0,
                   backend: str = "auto"):
    """-> (list over the test images of lists of [3, S, S] panels in [0, 1], column names):
    per sample, the task's input view and what its target means, drawn side by side."""
    images = test_images()
    gen = torch.Generator().manual_seed(seed)
    unit = dict(mean=(0, 0, 0), std=(1, 1, 1), backend=backend, generator=gen)
    S = out_size
    rows = [[] for _ in range(images.shape[0])]
    names = []
    if task == "multicrop":
        aug = pretext.MultiCropAugment(S, max(8, S * 96 // 224), 4, **unit)
        for k in range(samples):
            views = aug(images)
            for i in range(images.shape[0]):
                rows[i] += [_on_canvas(v[i], S) for v in views]
            names += [f"{k + 1}: global 0", "global 1"] + [f"local {j}" for j in range(4)]
        return rows, names
    kw = {"fill": 0.5} if task == "inpainting" else {}
    if task == "mae":
        kw["patch_size"] = S // 8
    aug = pretext.PretextAugment(S, task, **unit, **kw)
    for k in range(samples):
        views, target = aug(images)
        for i in range(images.shape[0]):
            if task == "rotation":
                pair = [views[i], torch.rot90(views[i], -int(target[i]), dims=(-2, -1))]
                label = ["view (rotated k*90)", "rotated back by -k"]
            elif task == "jigsaw":
                perm = aug.permutations[target[i]]
                pair = [_tile_grid(views[i], S), _tile_grid(views[i][torch.argsort(perm)], S)]
                label = ["tiles (permuted)", "inverse permutation"]
            elif task == "colorization":
                pair = [views[i].expand(3, -1, -1), target[i]]
                label = ["input: luminance", "target: RGB"]
            elif task == "inpainting":
                pair = [views[i], target[0][i]]
                label = ["input: box erased", "target: clean"]
            elif task == "denoising":
                pair = [views[i], target[i]]
                label = ["input: noisy", "target: clean"]
            else:  # mae: masked patches grayed out
                mask = target[0][i].view(8, 8).repeat_interleave(S // 8, 0) \
                    .repeat_interleave(S // 8, 1)
                pair = [torch.where(mask, 0.5, views[i].float()), views[i]]
                label = ["75% masked", "target: view"]
            rows[i] += [p.float().clamp(0, 1) for p in pair]
        names += [f"{k + 1}: {label[0]}", label[1]]
    return rows, names


def make_panel_grid(rows: list, out_size: int) -> tuple:
    """Rows of [3, S, S] panels -> (uint8 [3, H, W] grid, x centres of the columns)."""
    s, g = out_size, GAP
    cols = len(rows[0])
    grid = torch.ones(3, len(rows) * s + (len(rows) + 1) * g, cols * s + (cols + 1) * g)
    centres = [g + c * (s + g) + s / 2 for c in range(cols)]
    for i, row in enumerate(rows):
        y = g + i * (s + g)
        for c, panel in enumerate(row):
            x = g + c * (s + g)
            grid[:, y:y + s, x:x + s] = panel
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8), centres


def add_arguments(p) -> None:
    p.add_argument("--recipe", default="simclr", choices=augment.RECIPES,
                   help="augmentation recipe")
    p.add_argument("--task", default=None, choices=PRETEXT_DEMOS,
                   help="draw a pretext task's (input, target) pairs or DINO's multi-crop "
                        "views instead of a recipe's view pairs (--pairs samples each)")
    p.add_argument("--out", default="views.png", help="PNG file to write")
    p.add_argument("--size", type=int, default=128, help="side of each view (pixels)")
    p.add_argument("--pairs", type=int, default=3, help="view pairs per image")
    p.add_argument("--seed", type=int, default=0, help="seeds the per-sample parameters")
    p.add_argument("--backend", default="auto", choices=("auto", "cpp", "triton", "reference"),
                   help="which implementation draws the views")


def run(args) -> int:
    if args.task is not None:
        rows, names = pretext_panels(args.task, args.size, args.pairs, args.seed, args.backend)
        grid, centres = make_panel_grid(rows, args.size)
        title = f"augment-demo --task {args.task} (seed {args.seed})"
        if not write_labelled_png(args.out, grid, args.size, args.pairs, title, names,
                                  centres):
            write_png(args.out, grid)
        print(f"wrote {args.out}: rows: {', '.join(ROW_NAMES)}; columns: {', '.join(names)}")
        return 0
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
