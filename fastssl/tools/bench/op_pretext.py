"""Benchmark specs of the pretext-task views (:mod:`fastssl.pretext`) and of MAE masking.

``pretext_<task>`` (rotation, jigsaw, colorization, inpainting, denoising, mae) and
``multicrop``: uint8 256^2 batches -> 224^2 views (jigsaw: a 225^2 grid of 3 x 3 64^2 tiles,
Noroozi & Favaro's sizes; multicrop: 2 x 224^2 + 6 x 96^2), parameters drawn on the host each
call. Providers:

* ``fused``: :class:`fastssl.PretextAugment` / :class:`fastssl.MultiCropAugment` (C++ on CPU,
  Triton on CUDA);
* ``reference``: the same with ``backend="reference"`` (the spec: per image, plain PyTorch);
* ``per_image``: the way a DataLoader pipeline does it without fastssl, one image at a time
  in plain PyTorch (slice the crop, ``F.interpolate`` bilinear, flip, then the task's op:
  ``torch.rot90`` / tile crops + resizes / gray / box erase / noise), with the task's random
  draws per image from Python's ``random`` (as torchvision transforms do).

``compiled`` is skipped: both per-image pipelines change shapes with every crop, so
``torch.compile`` measures recompilation.

``mae_mask``: B x 196 patches at ratio 0.75 (MAE ViT-B/16 at 224^2). Providers: ``fused``
(:func:`fastssl.mae_mask`), ``reference`` (:func:`fastssl.reference.mae_mask`, the spec: a
Python loop over the L - 1 shuffle steps, vectorised over rows), ``randperm_loop`` (a
``torch.randperm`` per sample, the acceptance baseline), ``argsort`` (MAE's own way: argsort of
[B, L] uniform noise, twice).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from ... import reference as ref_mod
from ...augment import IMAGENET_MEAN, IMAGENET_STD
from ...pretext import MultiCropAugment, PretextAugment, jigsaw_permutations, mae_mask
from .spec import OpBench

IN_SIZE, OUT_SIZE = 256, 224
JIGSAW_SIZE = 225  # 3 x 75-pixel cells, 64-pixel tiles
TASKS = ("rotation", "jigsaw", "colorization", "inpainting", "denoising", "mae")
MAE_PATCHES, MAE_RATIO = 196, 0.75


def make_inputs(size: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (size, 3, IN_SIZE, IN_SIZE), dtype=torch.uint8, generator=g)
    return {"images": images.to(device)}


def _fastssl(task: str, backend: str):
    made = {}

    def fn(inputs: dict):
        if "aug" not in made:
            gen = torch.Generator().manual_seed(0)
            if task == "multicrop":
                made["aug"] = MultiCropAugment(OUT_SIZE, 96, 6, backend=backend, generator=gen)
            else:
                made["aug"] = PretextAugment(JIGSAW_SIZE if task == "jigsaw" else OUT_SIZE,
                                             task, backend=backend, generator=gen)
        return made["aug"](inputs["images"])

    return fn


# ---- the per-image plain-PyTorch pipeline (what fastssl replaces) ---------------------------

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _random_resized_crop(img: torch.Tensor, size: int, scale=(0.2, 1.0)) -> torch.Tensor:
    """torchvision's RandomResizedCrop logic for one [3, H, W] float image + flip p=0.5."""
    _, H, W = img.shape
    for _ in range(10):
        area = H * W * random.uniform(*scale)
        ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < w <= W and 0 < h <= H:
            top, left = random.randint(0, H - h), random.randint(0, W - w)
            break
    else:
        h, w, top, left = H, W, 0, 0
    out = F.interpolate(img[None, :, top:top + h, left:left + w], size=(size, size),
                        mode="bilinear", align_corners=False)[0]
    return out.flip(-1) if random.random() < 0.5 else out


def _per_image_view(im: torch.Tensor, size: int) -> torch.Tensor:
    return _random_resized_crop(im.float() / 255.0, size)


def _norm(x):
    return (x - _MEAN.to(x.device)) / _STD.to(x.device)


def _per_image(task: str):
    perms = jigsaw_permutations(9, 100) if task == "jigsaw" else None

    def one(im: torch.Tensor):
        if task == "rotation":
            k = random.randrange(4)
            return torch.rot90(_norm(_per_image_view(im, OUT_SIZE)), k, dims=(-2, -1)), k
        if task == "jigsaw":
            view = _per_image_view(im, JIGSAW_SIZE)
            label = random.randrange(100)
            tiles = []
            for cell in perms[label].tolist():
                r, c = divmod(cell, 3)
                y = r * 75 + random.randint(0, 11)
                x = c * 75 + random.randint(0, 11)
                tiles.append(_norm(view[:, y:y + 64, x:x + 64]))
            return torch.stack(tiles), label
        if task == "colorization":
            rgb = _per_image_view(im, OUT_SIZE)
            lum = rgb[0] * 0.2989 + rgb[1] * 0.587 + rgb[2] * 0.114
            return lum[None], rgb
        clean = _norm(_per_image_view(im, OUT_SIZE))
        if task == "inpainting":
            h = int(round(random.uniform(0.25, 0.5) * OUT_SIZE))
            w = int(round(random.uniform(0.25, 0.5) * OUT_SIZE))
            top, left = random.randint(0, OUT_SIZE - h), random.randint(0, OUT_SIZE - w)
            erased = clean.clone()
            erased[:, top:top + h, left:left + w] = 0.0
            mask = torch.zeros(1, OUT_SIZE, OUT_SIZE, dtype=torch.bool)
            mask[:, top:top + h, left:left + w] = True
            return erased, (clean, mask)
        if task == "denoising":
            sigma = random.uniform(0.05, 0.3)
            return clean + torch.randn_like(clean) * (sigma / _STD.to(clean.device)), clean
        return clean, None  # mae: the view (the mask is timed in the batch below)

    def fn(inputs: dict):
        outs = [one(im) for im in inputs["images"]]
        views = torch.stack([o[0] for o in outs])
        if task == "mae":
            return views, _randperm_loop(len(outs))
        return views, [o[1] for o in outs]

    return fn


def _per_image_multicrop(inputs: dict):
    ims = inputs["images"]
    views = [torch.stack([_norm(_random_resized_crop(im.float() / 255.0, OUT_SIZE, (0.4, 1.0)))
                          for im in ims]) for _ in range(2)]
    views += [torch.stack([_norm(_random_resized_crop(im.float() / 255.0, 96, (0.05, 0.4)))
                           for im in ims]) for _ in range(6)]
    return views


def _skip_compiled(provider: str, size: int, device: torch.device):
    if provider == "compiled":
        return "torch.compile of a per-image pipeline recompiles per crop shape"
    return None


def _img_per_s(size: int, seconds: float):
    return size / seconds, "img/s"


BENCHES = [
    OpBench(
        name=f"pretext_{task}",
        x_label="batch",
        sizes=[64],
        make_inputs=make_inputs,
        fused=_fastssl(task, "auto"),
        reference=_fastssl(task, "reference"),
        extra_providers={"per_image": _per_image(task)},
        differentiable=False,
        skip=_skip_compiled,
        unit=_img_per_s,
        describe=f"{task}: uint8 {IN_SIZE}^2 -> "
                 + (f"3x3 tiles of 64^2 ({JIGSAW_SIZE}^2 grid)" if task == "jigsaw"
                    else f"{OUT_SIZE}^2") + ", per-sample params, view + target",
    )
    for task in TASKS
] + [
    OpBench(
        name="multicrop",
        x_label="batch",
        sizes=[64],
        make_inputs=make_inputs,
        fused=_fastssl("multicrop", "auto"),
        reference=_fastssl("multicrop", "reference"),
        extra_providers={"per_image": _per_image_multicrop},
        differentiable=False,
        skip=_skip_compiled,
        unit=_img_per_s,
        describe=f"DINO multi-crop: uint8 {IN_SIZE}^2 -> 2 x {OUT_SIZE}^2 + 6 x 96^2",
    )
]


# ---- MAE masking ----------------------------------------------------------------------------

def _mae_inputs(size: int, dtype: torch.dtype, device: torch.device) -> dict:
    return {"batch": size, "device": device}


def _randperm_loop(batch: int, device=None):
    """The per-sample way: a randperm per row, MAE's outputs built from it."""
    keep = int(MAE_PATCHES * (1 - MAE_RATIO))
    masks, ids_keep, ids_restore = [], [], []
    for _ in range(batch):
        perm = torch.randperm(MAE_PATCHES, device=device)
        ids_keep.append(perm[:keep])
        ids_restore.append(torch.argsort(perm))
        m = torch.ones(MAE_PATCHES, dtype=torch.bool, device=device)
        m[perm[:keep]] = False
        masks.append(m)
    return torch.stack(masks), torch.stack(ids_keep), torch.stack(ids_restore)


def _mae_argsort(inputs: dict):
    keep = int(MAE_PATCHES * (1 - MAE_RATIO))
    noise = torch.rand(inputs["batch"], MAE_PATCHES, device=inputs["device"])
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    return restore >= keep, shuffle[:, :keep], restore


def _mae_reference(inputs: dict):
    seed = torch.randint(0, 2 ** 32, (2,), dtype=torch.int64)
    return ref_mod.mae_mask(seed, inputs["batch"], MAE_PATCHES,
                            int(MAE_PATCHES * (1 - MAE_RATIO)))


BENCHES.append(OpBench(
    name="mae_mask",
    x_label="batch",
    sizes=[256],
    make_inputs=_mae_inputs,
    fused=lambda inputs: mae_mask(inputs["batch"], MAE_PATCHES, MAE_RATIO,
                                  device=inputs["device"]),
    reference=_mae_reference,
    extra_providers={"randperm_loop": lambda inputs: _randperm_loop(inputs["batch"],
                                                                    inputs["device"]),
                     "argsort": _mae_argsort},
    differentiable=False,
    skip=_skip_compiled,
    unit=lambda size, seconds: (size / seconds, "masks/s"),
    describe=f"MAE masking: B x {MAE_PATCHES} patches, ratio {MAE_RATIO}",
))
