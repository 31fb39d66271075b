"""Benchmark spec of the SSL augmentation: two views per image, SimCLR recipe, 256^2 uint8
-> 224^2 fp32 (ImageNet-normalised), per-sample parameters drawn on the host each call.

Providers: ``fused`` (``fastssl.SSLAugment``, backend auto: C++ on CPU, Triton on CUDA),
``reference`` (the same with ``backend="reference"``, the pure-PyTorch spec), ``compiled``
(``torch.compile`` of the reference), and, when importable, ``torchvision_v2`` (one v2
``Compose`` call per image: v2 draws one parameter set per call) and ``kornia`` (batched
``AugmentationSequential``). Throughput: images per second, both views of each image.
"""
from __future__ import annotations

import importlib.util

import torch

from ...augment import IMAGENET_MEAN, IMAGENET_STD, OUT_DTYPES, SSLAugment
from .spec import OpBench

IN_SIZE, OUT_SIZE = 256, 224


def make_inputs(size: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (size, 3, IN_SIZE, IN_SIZE), dtype=torch.uint8, generator=g)
    return {"images": images.to(device),
            "out_dtype": dtype if dtype in OUT_DTYPES else torch.float32}


def _views(backend: str):
    augs = {}

    def fn(inputs: dict):
        key = inputs["out_dtype"]
        if key not in augs:
            augs[key] = SSLAugment(OUT_SIZE, "simclr", out_dtype=key, backend=backend,
                                   generator=torch.Generator().manual_seed(0))
        return augs[key](inputs["images"])

    return fn


fused = _views("auto")
reference = _views("reference")


def torchvision_v2_compose():
    """The SimCLR recipe as one torchvision v2 ``Compose`` (draws one parameter set per call;
    benchmarks/augment_throughput.py uses it per image and on a whole batch)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(OUT_SIZE, scale=(0.08, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _torchvision_v2():
    t = torchvision_v2_compose()
    return lambda inputs: tuple(torch.stack([t(im) for im in inputs["images"]])
                                for _ in range(2))


def _kornia():
    import kornia.augmentation as K

    seq = K.AugmentationSequential(
        K.RandomResizedCrop((OUT_SIZE, OUT_SIZE), scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((23, 23), (0.1, 2.0), p=0.5),
        K.Normalize(torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)),
    )
    return lambda inputs: tuple(seq(inputs["images"].float() / 255) for _ in range(2))


def _extra_providers() -> dict:
    extra = {}
    if importlib.util.find_spec("torchvision") is not None:
        extra["torchvision_v2"] = _torchvision_v2()
    if importlib.util.find_spec("kornia") is not None:
        extra["kornia"] = _kornia()
    return extra


def _skip(provider: str, size: int, device: torch.device):
    if provider == "compiled" and size > 8:
        # The reference loops over samples with data-dependent crop shapes and op orders:
        # torch.compile graph-breaks per op and recompiles per crop shape, so at large batches
        # the run measures recompilation, not augmentation (measured here: batch 4, 64^2 -> 32^2:
        # 63 s for the first call, then 1.0 s per call once the recompile limit is hit).
        return "torch.compile of the per-sample reference recompiles per crop shape"
    return None


BENCHES = [
    OpBench(
        name="augment",
        x_label="batch",
        sizes=[16, 64],
        make_inputs=make_inputs,
        fused=fused,
        reference=reference,
        extra_providers=_extra_providers(),
        differentiable=False,
        skip=_skip,
        unit=lambda size, seconds: (size / seconds, "img/s (2 views)"),
        describe=f"SimCLR two views, uint8 {IN_SIZE}^2 -> {OUT_SIZE}^2, per-sample params",
    )
]
