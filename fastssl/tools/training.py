"""``fastssl train``: SSL pre-training on an embedded dataset with the fused parts, then
three linear probes on the same held-out split.

The pieces a user would copy live here too: a small ResNet-style encoder (a small ViT for
``mae``), one class per SSL method in a registry (:data:`SSL_METHODS`: its views, heads, loss
and after-step updates -- EMA, queue, centre), the training step they share
(:class:`SSLModel`, also what ``fastssl profile`` times), and a torch-only logistic-regression
probe (no scikit-learn).

Methods: contrastive ``simclr``, ``moco``; predictor / stop-gradient ``byol``, ``simsiam``;
redundancy reduction ``barlow``, ``vicreg``; self-distillation ``dino`` (multi-crop); pretext
tasks ``rotation``, ``jigsaw``, ``colorization``, ``inpainting``, ``denoising``; masked image
modelling ``mae``.

Default data: scikit-learn's 8x8 digits (upsampled to 32x32). The procedural ``shapes`` stay
available (``--data shapes``) but are a poor default: their class is defined up to a uniformly
random rotation, which no recipe here augments, and at the 2-3 minute budget SimCLR's loss
barely leaves its starting value on them (SSL 20-26% vs random init 20-21%, chance 16.7%, in
every recipe tried: README).

Probes (identical procedure for all three; held-out split never seen by SSL or by the probe's
fitting):

* **SSL** -- the pre-trained encoder, frozen: global-average-pooled features;
* **random** -- the *same* encoder at its random initialisation (the very weights SSL started
  from), features computed the same way;
* **pixels** -- the raw pixels (native resolution, scaled to [0, 1]).

"The same way" means: BatchNorm running statistics re-estimated on the clean training images
(both encoders), eval mode, features standardised with training-split statistics, then
multinomial logistic regression by L-BFGS with the L2 strength picked on a 20% validation cut of
the training split from {1e-1, 1e-2, 1e-3, 1e-4}, refitted on the whole training split.

Example:
    $ fastssl train --method simclr --json
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import data as datasets
from ._progress import Progress
from ..augment import AugmentRecipe, SSLAugment
from ..functional import (barlow_twins, dino_loss, info_nce, masked_patch_loss, nt_xent,
                          symmetric_negative_cosine, vicreg)
from ..moco import MoCoQueue, ema_update_, momentum_schedule
from ..pretext import PRETEXT_RECIPE, MultiCropAugment, PretextAugment

BACKENDS = ("fused", "reference")
PHASES = ("augmentation", "encoder_forward", "loss_forward", "backward", "optimizer",
          "ema_queue")
# The normalisation SSLAugment applies to its views; features for the probes use the same.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------
# Encoders: a small ResNet for 32x32 inputs (every method but mae), a small ViT (mae)
# ---------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                       nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNetEncoder(nn.Module):
    """ResNet-style encoder: stem conv (stride 2) then 3 stages of one basic block each
    (widths w, 2w, 4w; strides 1, 2, 2), global average pool. (B, 3, 32, 32) -> (B, 4w).
    :meth:`feature_map` is the map before the pool, (B, 4w, H/8, W/8), for the dense heads.

    Example:
        >>> enc = ResNetEncoder(width=8)
        >>> enc(torch.randn(2, 3, 32, 32)).shape, enc.feature_map(torch.randn(2, 3, 32, 32)).shape
        (torch.Size([2, 32]), torch.Size([2, 32, 4, 4]))
    """

    def __init__(self, width: int = 32, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(BasicBlock(width, width), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 4 * width, 2))
        self.out_dim = 4 * width

    def feature_map(self, x):
        return self.stages(self.stem(x))

    def forward(self, x):
        return self.feature_map(x).mean((2, 3))


def mlp(d_in: int, d_hidden: int, d_out: int, *, out_norm: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU-Linear (SimCLR / BYOL heads); ``out_norm`` adds SimSiam's output BN."""
    layers = [nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden), nn.ReLU(inplace=True),
              nn.Linear(d_hidden, d_out)]
    if out_norm:
        layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------
# Phase timer: perf_counter boundaries that tile the step
# ---------------------------------------------------------------------------------------

class PhaseTimer:
    """``phase(name)`` ends the running phase and starts ``name``; ``end()`` ends the last.
    Consecutive phases share their boundary, so the phases tile the step exactly. On CUDA each
    boundary synchronises the device (so the time lands in the phase that queued the work).
    With ``annotate``, each phase is also a ``torch.profiler.record_function`` range."""

    def __init__(self, device: torch.device, annotate: bool = False):
        self.sync = device.type == "cuda"
        self.annotate = annotate
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._name = None
        self._t = 0.0
        self._rf = None

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def phase(self, name: str) -> None:
        now = self._now()
        if self._name is not None:
            self.totals[self._name] += now - self._t
        if self._rf is not None:
            self._rf.__exit__(None, None, None)
            self._rf = None
        self._name, self._t = name, now
        if self.annotate and name is not None:
            self._rf = torch.profiler.record_function(f"fastssl::{name}")
            self._rf.__enter__()

    def end(self) -> None:
        self.phase(None)


class _NoTimer:
    def phase(self, name):
        pass

    def end(self):
        pass


NO_TIMER = _NoTimer()


# ---------------------------------------------------------------------------------------
# The method registry: one class per SSL method (its views, heads, loss, EMA)
# ---------------------------------------------------------------------------------------

@dataclass
class MethodConfig:
    """What every method is built from. ``op_backend`` is the fastssl ops' backend
    (``"auto"`` for the fused kernels, ``"reference"`` for their plain-PyTorch references)."""
    op_backend: str = "auto"
    width: int = 32
    proj_dim: int = 64
    hidden: int = 256
    image_size: int = 32
    queue_size: int = 4096
    momentum: float | None = None
    seed: int = 0
    # Replaces the crop / colour recipe of the method's views (None: the method's own):
    # ``fastssl train`` passes one fitted to its 32x32 data (:data:`DATA_SETTINGS`).
    recipe: AugmentRecipe | None = None


SSL_METHODS: dict = {}  # name -> SSLMethod subclass, in registration order


def register(cls):
    SSL_METHODS[cls.name] = cls
    return cls


class SSLMethod(nn.Module):
    """One SSL method: the encoder it trains and the heads, views and loss it trains it with.

    A training step (:meth:`SSLModel.step`) calls, in its timed phases:
    ``make_views(images)`` (augmentation) -> ``forward_views(views)`` (encoder forward)
    -> ``loss(outputs)`` (loss forward) -> backward and optimiser -> ``after_optimizer_step``
    (EMA / queue / centre updates). Parameters with ``requires_grad=False`` (momentum targets)
    are not given to the optimiser."""

    name = ""
    summary = ""
    # `fastssl train` defaults where a method needs its own (None: the command's default;
    # epochs per dataset name).
    default_lr: float | None = None
    default_epochs: dict = {}

    def __init__(self, cfg: MethodConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = self.build_encoder(cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)  # views' randomness

    def build_encoder(self, cfg: MethodConfig) -> nn.Module:
        return ResNetEncoder(cfg.width)

    def make_views(self, images: torch.Tensor) -> tuple:
        raise NotImplementedError

    def forward_views(self, views: tuple):
        raise NotImplementedError

    def loss(self, outputs) -> torch.Tensor:
        raise NotImplementedError

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        pass

    # -- shared helpers --------------------------------------------------------------------
    def _momentum_copy(self, module: nn.Module) -> nn.Module:
        target = copy.deepcopy(module)
        target.requires_grad_(False)
        return target

    def _ema(self, target: nn.Module, online: nn.Module, momentum: float) -> None:
        ema_update_(target, online, momentum, backend=self.cfg.op_backend)


class TwoViewMethod(SSLMethod):
    """Two augmented views of every image (``SSLAugment`` with the method's ``recipe``)."""

    recipe = "simclr"

    def __init__(self, cfg: MethodConfig):
        super().__init__(cfg)
        self.augment = SSLAugment(cfg.image_size, recipe=cfg.recipe or self.recipe,
                                  backend=cfg.op_backend, generator=self.generator)

    def make_views(self, images):
        return self.augment(images)


@register
class SimCLR(TwoViewMethod):
    name = "simclr"
    summary = "NT-Xent over both views' projections (tau 0.2)"
    temperature = 0.2

    def __init__(self, cfg):
        super().__init__(cfg)
        self.projector = mlp(self.encoder.out_dim, cfg.hidden, cfg.proj_dim)

    def forward_views(self, views):
        z = self.projector(self.encoder(torch.cat(views)))
        return z.chunk(2)

    def loss(self, outputs):
        z0, z1 = outputs
        return nt_xent(z0, z1, self.temperature, backend=self.cfg.op_backend)


@register
class MoCo(TwoViewMethod):
    """MoCo v2: query encoder+projector on view 0, momentum key encoder on view 1 (keys in
    2 shuffled halves: single-process ShuffleBN), InfoNCE against a queue of keys (tau 0.2),
    EMA (momentum, default 0.99) and enqueue after the optimiser step."""
    name = "moco"
    summary = "InfoNCE against a queue of momentum-encoder keys (MoCo v2)"
    recipe = "mocov2"
    temperature = 0.2

    def __init__(self, cfg):
        super().__init__(cfg)
        self.projector = mlp(self.encoder.out_dim, cfg.hidden, cfg.proj_dim)
        self.momentum = cfg.momentum if cfg.momentum is not None else 0.99
        self.target_encoder = self._momentum_copy(self.encoder)
        self.target_projector = self._momentum_copy(self.projector)
        self.queue = MoCoQueue(cfg.proj_dim, cfg.queue_size, backend=cfg.op_backend)
        self._shuffle_generator = torch.Generator().manual_seed(cfg.seed + 2)
        self._keys = None

    def forward_views(self, views):
        v0, v1 = views
        q = self.projector(self.encoder(v0))
        with torch.no_grad():  # ShuffleBN: keys in 2 halves of a shuffled batch
            perm = torch.randperm(v1.shape[0], generator=self._shuffle_generator).to(v1.device)
            halves = [self.target_projector(self.target_encoder(h)) for h in v1[perm].chunk(2)]
            k = torch.empty_like(q)
            k[perm] = torch.cat(halves)
        self._keys = k
        return q, k

    def loss(self, outputs):
        q, k = outputs
        return info_nce(q, k, self.queue.buffer, self.temperature, backend=self.cfg.op_backend)

    def after_optimizer_step(self, step, total_steps):
        self._ema(self.target_encoder, self.encoder, self.momentum)
        self._ema(self.target_projector, self.projector, self.momentum)
        self.queue.enqueue(F.normalize(self._keys, dim=1))
        self._keys = None


@register
class BYOL(TwoViewMethod):
    """Online encoder+projector+predictor on both views, momentum target on both, symmetric
    2 - 2 cos (:func:`fastssl.symmetric_negative_cosine`), target momentum on BYOL's cosine schedule from ``momentum`` (0.99) to 1."""
    name = "byol"
    summary = "predictor regresses the momentum target's projection of the other view"
    recipe = "byol"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.projector = mlp(self.encoder.out_dim, cfg.hidden, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.hidden, cfg.proj_dim)
        self.momentum = cfg.momentum if cfg.momentum is not None else 0.99
        self.target_encoder = self._momentum_copy(self.encoder)
        self.target_projector = self._momentum_copy(self.projector)

    def forward_views(self, views):
        both = torch.cat(views)
        p = self.predictor(self.projector(self.encoder(both)))
        with torch.no_grad():
            t = self.target_projector(self.target_encoder(both))
        return p.chunk(2), t.chunk(2)

    def loss(self, outputs):
        (p0, p1), (t0, t1) = outputs
        # BYOL sums the two directions: twice the symmetric mean.
        return 2 * symmetric_negative_cosine(p0, p1, t0, t1, backend=self.cfg.op_backend)

    def after_optimizer_step(self, step, total_steps):
        m = momentum_schedule(min(step, total_steps), total_steps, base=self.momentum)
        self._ema(self.target_encoder, self.encoder, m)
        self._ema(self.target_projector, self.projector, m)


@register
class SimSiam(TwoViewMethod):
    """Encoder+projector (output BatchNorm) on both views, a predictor, no momentum target:
    each view's prediction regresses the other view's projection under a stop-gradient
    (:func:`fastssl.symmetric_negative_cosine`, which applies it)."""
    name = "simsiam"
    summary = "predictor regresses the other view's projection, stop-gradient, no target"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.projector = mlp(self.encoder.out_dim, cfg.hidden, cfg.proj_dim, out_norm=True)
        # SimSiam's bottleneck predictor: hidden = dim / 4.
        self.predictor = mlp(cfg.proj_dim, max(cfg.proj_dim // 4, 8), cfg.proj_dim)

    def forward_views(self, views):
        z = self.projector(self.encoder(torch.cat(views)))
        p = self.predictor(z)
        return p.chunk(2), z.chunk(2)

    def loss(self, outputs):
        (p0, p1), (z0, z1) = outputs
        return symmetric_negative_cosine(p0, p1, z0, z1, backend=self.cfg.op_backend)


class RedundancyMethod(TwoViewMethod):
    """Encoder + a wide projector (4x the representation, as Barlow Twins and VICReg want) on
    both views; ``loss_fn`` (a redundancy-reduction loss) on the two projections."""
    recipe = "byol"
    loss_fn = None

    def __init__(self, cfg):
        super().__init__(cfg)
        self.projector = mlp(self.encoder.out_dim, cfg.hidden, 4 * self.encoder.out_dim)

    def forward_views(self, views):
        return self.projector(self.encoder(torch.cat(views))).chunk(2)

    def loss(self, outputs):
        z0, z1 = outputs
        return type(self).loss_fn(z0, z1, backend=self.cfg.op_backend)


@register
class BarlowTwins(RedundancyMethod):
    """Barlow Twins' redundancy reduction (:func:`fastssl.barlow_twins`, lightly's
    conventions, lambda 5e-3) on the projections."""
    name = "barlow"
    summary = "cross-correlation of the two views' projections driven to the identity"
    loss_fn = barlow_twins


@register
class VICReg(RedundancyMethod):
    """VICReg's invariance + variance + covariance terms (:func:`fastssl.vicreg`, weights
    25 / 25 / 1) on the projections."""
    name = "vicreg"
    summary = "invariance, variance and covariance terms on the two views' projections"
    loss_fn = vicreg


class DINOHead(nn.Module):
    """DINO's projection head up to the bottleneck (3-layer MLP, GELU), and the prototype
    weight V (K, bottleneck) of its weight-normalised last layer; :func:`fastssl.dino_loss`
    normalises the bottleneck rows and V's rows itself (``norm_last_layer=True``)."""

    def __init__(self, d_in: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, features):
        return self.mlp(features)


@register
class DINO(SSLMethod):
    """Self-distillation with multi-crop (:class:`fastssl.MultiCropAugment`: 2 global crops
    at the image size, ``n_local`` local crops at half of it): the student (encoder + head)
    sees every crop, the momentum teacher the global ones; :func:`fastssl.dino_loss` (teacher
    centring + sharpening, streamed over the K prototypes) and the centre's EMA."""
    name = "dino"
    summary = "student matches the momentum teacher's centred, sharpened prototype scores"
    n_local = 4
    prototypes = 512
    bottleneck = 64

    def __init__(self, cfg):
        super().__init__(cfg)
        recipes = {} if cfg.recipe is None else dict(global_recipes=(cfg.recipe, cfg.recipe),
                                                     local_recipe=cfg.recipe)
        self.augment = MultiCropAugment(cfg.image_size, max(cfg.image_size // 2, 8),
                                        self.n_local, backend=cfg.op_backend,
                                        generator=self.generator, **recipes)
        self.head = DINOHead(self.encoder.out_dim, cfg.hidden, self.bottleneck,
                             self.prototypes)
        self.momentum = cfg.momentum if cfg.momentum is not None else 0.99
        self.target_encoder = self._momentum_copy(self.encoder)
        self.target_head = self._momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(self.prototypes))
        self._new_center = None

    def make_views(self, images):
        return tuple(self.augment(images))

    def forward_views(self, views):
        global_crops, local_crops = torch.cat(views[:2]), torch.cat(views[2:])
        # Crop-major rows (crop c, sample b at c * B + b), the order dino_loss expects.
        student = torch.cat([self.head(self.encoder(global_crops)),
                             self.head(self.encoder(local_crops))])
        with torch.no_grad():
            teacher = self.target_head(self.target_encoder(global_crops))
        return student, teacher

    def loss(self, outputs):
        student, teacher = outputs
        loss, self._new_center = dino_loss(student, teacher, self.head.prototypes,
                                           self.target_head.prototypes, self.center,
                                           n_global=2, backend=self.cfg.op_backend)
        return loss

    def after_optimizer_step(self, step, total_steps):
        m = momentum_schedule(min(step, total_steps), total_steps, base=self.momentum)
        self._ema(self.target_encoder, self.encoder, m)
        self._ema(self.target_head, self.head, m)
        self.center.copy_(self._new_center.detach().reshape(self.center.shape))
        self._new_center = None


# -- pretext tasks (issue 11): one view with a label or a target -------------------------

class PretextMethod(SSLMethod):
    """A pretext task: ``(view, target) = PretextAugment(task)(images)`` and a head on the
    encoder. ``task_options`` are :class:`fastssl.PretextAugment` keyword arguments."""

    task = ""
    task_options: dict = {}

    def __init__(self, cfg):
        super().__init__(cfg)
        # The pretext views take only the crop and flip of a given recipe (no colour ops:
        # MAE's and RotNet's pipeline).
        recipe = None if cfg.recipe is None else dataclasses.replace(
            PRETEXT_RECIPE, crop_scale=cfg.recipe.crop_scale, flip_p=cfg.recipe.flip_p)
        self.augment = PretextAugment(cfg.image_size, self.task, recipe,
                                      backend=cfg.op_backend, generator=self.generator,
                                      **self.task_options)

    def make_views(self, images):
        view, target = self.augment(images)
        return (view, *(target if isinstance(target, tuple) else (target,)))


class DenseDecoder(nn.Module):
    """From the encoder's (B, 4w, S/8, S/8) map back to (B, out_channels, S, S): three
    (upsample x2, conv 3x3, BN, ReLU) stages and a 1x1 conv to the output channels."""

    def __init__(self, c_in: int, out_channels: int = 3):
        super().__init__()
        layers, c = [], c_in
        for _ in range(3):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(c, c // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(c // 2),
                       nn.ReLU(inplace=True)]
            c //= 2
        layers.append(nn.Conv2d(c, out_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, feature_map):
        return self.net(feature_map)


@register
class Rotation(PretextMethod):
    """RotNet (Gidaris et al. 2018): predict which of 0/90/180/270 degrees the view was
    turned by; a linear classifier on the encoder's pooled features."""
    name = "rotation"
    summary = "4-way classification of the view's k x 90 degree rotation"
    task = "rotation"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.classifier = nn.Linear(self.encoder.out_dim, 4)

    def forward_views(self, views):
        view, label = views
        return self.classifier(self.encoder(view)), label

    def loss(self, outputs):
        logits, label = outputs
        return F.cross_entropy(logits, label)


@register
class Jigsaw(PretextMethod):
    """Jigsaw puzzles (Noroozi & Favaro 2016) on a 2 x 2 grid (32-pixel images give 3 x 3
    tiles of 9 pixels, too small for the encoder): every tile through the shared encoder,
    the tiles' features concatenated in slot order, an MLP names the permutation (all 24)."""
    name = "jigsaw"
    summary = "which of 24 permutations shuffled the 2 x 2 tiles"
    task = "jigsaw"
    task_options = {"grid": 2, "num_permutations": 24}

    def __init__(self, cfg):
        super().__init__(cfg)
        tiles = self.task_options["grid"] ** 2
        self.classifier = mlp(tiles * self.encoder.out_dim, cfg.hidden,
                              self.task_options["num_permutations"])

    def forward_views(self, views):
        tiles, label = views
        B, T = tiles.shape[:2]
        features = self.encoder(tiles.flatten(0, 1)).view(B, T * self.encoder.out_dim)
        return self.classifier(features), label

    def loss(self, outputs):
        logits, label = outputs
        return F.cross_entropy(logits, label)


@register
class Colorization(PretextMethod):
    """Colorization (Zhang et al. 2016, as regression): the encoder sees the luminance
    (repeated over 3 channels and normalised like every input), a dense decoder predicts
    the RGB view in [0, 1]; MSE."""
    name = "colorization"
    summary = "RGB regressed from the luminance (MSE)"
    task = "colorization"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.decoder = DenseDecoder(self.encoder.out_dim, 3)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward_views(self, views):
        luminance, rgb = views
        x = (luminance.expand(-1, 3, -1, -1) - self.mean) / self.std
        return torch.sigmoid(self.decoder(self.encoder.feature_map(x))), rgb

    def loss(self, outputs):
        pred, rgb = outputs
        return F.mse_loss(pred, rgb)


@register
class Inpainting(PretextMethod):
    """Context encoder (Pathak et al. 2016): a random box of the view erased to 0 (the mean
    colour after normalisation); the dense decoder reconstructs the view, scored inside the
    box (MSE, in the views' normalised units)."""
    name = "inpainting"
    summary = "the erased box reconstructed (MSE inside the box)"
    task = "inpainting"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.decoder = DenseDecoder(self.encoder.out_dim, 3)

    def forward_views(self, views):
        erased, clean, box = views
        return self.decoder(self.encoder.feature_map(erased)), clean, box

    def loss(self, outputs):
        pred, clean, box = outputs
        inside = box.expand_as(clean).to(pred.dtype)
        return ((pred - clean) ** 2 * inside).sum() / inside.sum().clamp(min=1)


@register
class Denoising(PretextMethod):
    """Denoising autoencoder (Vincent et al. 2008): Gaussian noise of a per-sample level;
    the dense decoder predicts the clean view (MSE, normalised units)."""
    name = "denoising"
    summary = "the clean view predicted from a noisy one (MSE)"
    task = "denoising"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.decoder = DenseDecoder(self.encoder.out_dim, 3)

    def forward_views(self, views):
        noisy, clean = views
        return self.decoder(self.encoder.feature_map(noisy)), clean

    def loss(self, outputs):
        pred, clean = outputs
        return F.mse_loss(pred, clean)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) (GELU, 4x)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def _sincos_positions(num_patches_side: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE's), (side * side, dim)."""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(num_patches_side, dtype=torch.float64)
    yy, xx = torch.meshgrid(pos, pos, indexing="ij")
    parts = []
    for coord in (yy.reshape(-1), xx.reshape(-1)):
        angle = coord[:, None] * freq[None]
        parts += [angle.sin(), angle.cos()]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()


class ViTEncoder(nn.Module):
    """A small ViT written with ``torch.nn`` only: p x p patch embedding (a strided conv),
    fixed sine-cosine positions, ``depth`` pre-norm transformer blocks, a final LayerNorm.
    ``forward`` mean-pools the tokens of the whole image, (B, dim) (what the probes use);
    :meth:`forward_tokens` runs the blocks on the kept patches only (MAE)."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, dim: int = 128,
                 depth: int = 4, heads: int = 4):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size "
                             f"{patch_size}")
        self.patch_size, self.out_dim = patch_size, dim
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.register_buffer("positions", _sincos_positions(image_size // patch_size, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def patch_tokens(self, images):
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, L, dim)
        if tokens.shape[1] != self.positions.shape[0]:
            raise ValueError(f"ViTEncoder was built for {self.positions.shape[0]} patches, got "
                             f"{tokens.shape[1]} (image size differs)")
        return tokens + self.positions

    def forward_tokens(self, images, ids_keep=None):
        tokens = self.patch_tokens(images)
        if ids_keep is not None:
            tokens = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, tokens.shape[2]))
        return self.norm(self.blocks(tokens))

    def forward(self, images):
        return self.forward_tokens(images).mean(1)


@register
class MAE(PretextMethod):
    """Masked autoencoder (He et al. 2022) with the small :class:`ViTEncoder` (4 x 4 patches,
    75% masked by :func:`fastssl.mae_mask`): the encoder sees the kept patches, a 1-block
    decoder fills mask tokens back in (``ids_restore``) and predicts every patch's pixels;
    :func:`fastssl.masked_patch_loss` scores the masked ones (per-patch normalised target)."""
    name = "mae"
    summary = "masked 4 x 4 patches reconstructed by a small ViT (75% masked)"
    task = "mae"
    patch_size = 4
    task_options = {"patch_size": 4, "mask_ratio": 0.75}
    decoder_dim = 64
    # Measured on digits (seed 0, 1 thread; random-init ViT probe 95.3%): lr 5e-3 / 15 epochs
    # 88.0%, lr 5e-3 / 45 epochs 95.0%, lr 1e-3 / 15 epochs 92.8%, lr 1e-3 / 45 epochs 96.7%;
    # mask ratio 0.5 at lr 1e-3 / 45 epochs 94.4%. MAE learns slowly, and a high learning rate
    # first wrecks the random ViT's pixel-like features, which probe well here.
    default_lr = 1e-3
    default_epochs = {"digits": 45}

    def build_encoder(self, cfg):
        return ViTEncoder(cfg.image_size, self.patch_size, dim=4 * cfg.width, depth=4,
                          heads=4)

    def __init__(self, cfg):
        super().__init__(cfg)
        enc = self.encoder
        self.decoder_embed = nn.Linear(enc.out_dim, self.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        side = cfg.image_size // self.patch_size
        self.register_buffer("decoder_positions", _sincos_positions(side, self.decoder_dim))
        self.decoder = nn.Sequential(TransformerBlock(self.decoder_dim, 4),
                                     nn.LayerNorm(self.decoder_dim))
        self.decoder_pred = nn.Linear(self.decoder_dim, self.patch_size ** 2 * 3)

    def forward_views(self, views):
        images, mask, ids_keep, ids_restore = views
        kept = self.decoder_embed(self.encoder.forward_tokens(images, ids_keep))
        B, L = ids_restore.shape
        tokens = torch.cat([kept, self.mask_token.expand(B, L - kept.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, tokens.shape[2]))
        pred = self.decoder_pred(self.decoder(tokens + self.decoder_positions))
        return pred, images, mask

    def loss(self, outputs):
        pred, images, mask = outputs
        return masked_patch_loss(pred, images, mask, patch_size=self.patch_size,
                                 backend=self.cfg.op_backend)

METHODS = tuple(SSL_METHODS)


# ---------------------------------------------------------------------------------------
# The training step shared by every method
# ---------------------------------------------------------------------------------------

class SSLModel(nn.Module):
    """One registered SSL method (:data:`SSL_METHODS`) + AdamW + its learning-rate schedule,
    and the training :meth:`step` (also what ``fastssl profile`` times, phase by phase).

    ``backend="fused"`` uses fastssl's fused losses / augmentation / EMA / queue (each op's
    ``backend="auto"``: C++ on CPU, Triton on CUDA), ``"reference"`` their plain-PyTorch
    references, so ``fastssl profile --backend both`` compares the two on the same model.
    ``initial_encoder`` keeps the encoder's random initialisation for the random-init probe.
    """

    def __init__(self, method: str, *, backend: str = "fused", width: int = 32,
                 proj_dim: int = 64, hidden: int = 256, image_size: int = 32,
                 queue_size: int = 4096, momentum: float | None = None, lr: float = 2e-3,
                 weight_decay: float = 1e-5, total_steps: int = 1000, warmup_steps: int = 0,
                 device="cpu", seed: int = 0, recipe: AugmentRecipe | None = None):
        super().__init__()
        if method not in SSL_METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.method_name, self.backend = method, backend
        self.device = torch.device(device)
        torch.manual_seed(seed)
        cfg = MethodConfig(op_backend="auto" if backend == "fused" else "reference",
                           width=width, proj_dim=proj_dim, hidden=hidden,
                           image_size=image_size, queue_size=queue_size, momentum=momentum,
                           seed=seed, recipe=recipe)
        self.method = SSL_METHODS[method](cfg)
        self.initial_encoder = copy.deepcopy(self.method.encoder).requires_grad_(False)
        self.to(self.device)
        params = [p for p in self.method.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.lr, self.warmup_steps, self.total_steps = lr, warmup_steps, total_steps
        self.step_count = 0

    @property
    def encoder(self) -> nn.Module:
        return self.method.encoder

    def _lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        frac = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    def step_phases(self, images: torch.Tensor):
        """One SSL step on a uint8 batch (B, 3, H, W) as a generator: it yields each phase's
        name (:data:`PHASES`) just before running that phase, and returns the detached loss
        (``StopIteration.value``). :meth:`step` drives it with a timer; ``fastssl profile
        --backend both`` drives two models' generators in turn, one phase at a time."""
        self.train()
        yield "augmentation"
        views = tuple(v.to(self.device, non_blocking=True)
                      for v in self.method.make_views(images))

        yield "encoder_forward"
        outputs = self.method.forward_views(views)

        yield "loss_forward"
        loss = self.method.loss(outputs)

        yield "backward"
        loss.backward()

        yield "optimizer"
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr_at(self.step_count)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        yield "ema_queue"
        self.method.after_optimizer_step(self.step_count, self.total_steps)
        self.step_count += 1
        return loss.detach()

    def step(self, images: torch.Tensor, timer=NO_TIMER) -> torch.Tensor:
        """One SSL step on a uint8 batch (B, 3, H, W); returns the detached loss."""
        phases = self.step_phases(images)
        while True:
            try:
                name = next(phases)
            except StopIteration as done:
                timer.end()
                return done.value
            timer.phase(name)


# ---------------------------------------------------------------------------------------
# Frozen features and the linear probe
# ---------------------------------------------------------------------------------------

def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def encode(encoder: nn.Module, image_sets, calibrate: torch.Tensor,
           batch: int = 512) -> list:
    """Frozen features of each uint8 tensor in ``image_sets``, from a copy of ``encoder``
    whose BatchNorm running statistics were re-estimated on ``calibrate`` (clean uint8)."""
    enc = copy.deepcopy(encoder)
    dev = next(enc.parameters()).device
    for m in enc.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    enc.train()
    for i in range(0, calibrate.shape[0], batch):
        enc(_normalise(calibrate[i:i + batch].to(dev)))
    enc.eval()
    return [torch.cat([enc(_normalise(images[i:i + batch].to(dev))).cpu()
                       for i in range(0, images.shape[0], batch)]) for images in image_sets]


def _fit_logreg(x, y, n_classes, l2, init=None, max_iter=50):
    w = (torch.zeros(x.shape[1], n_classes) if init is None else init[0].clone())
    b = (torch.zeros(n_classes) if init is None else init[1].clone())
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(x_train, y_train, x_test, y_test, *, l2_grid=(1e-1, 1e-2, 1e-3, 1e-4),
                 seed: int = 0) -> float:
    """Held-out accuracy of a multinomial logistic regression on standardised features.

    The L2 strength is chosen on a 20% validation cut of the training split (fits along
    ``l2_grid`` from strong to weak, each warm-started from the previous one), then the model
    is refitted on the whole training split. Pure torch (L-BFGS), no scikit-learn.
    """
    x_train, x_test = x_train.float(), x_test.float()
    mu, sd = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    perm = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = x_train.shape[0] // 5
    val, fit = perm[:n_val], perm[n_val:]
    x_fit, y_fit = x_train[fit].contiguous(), y_train[fit]
    best, init = None, None
    for l2 in l2_grid:
        init = _fit_logreg(x_fit, y_fit, n_classes, l2, init)
        acc = ((x_train[val] @ init[0] + init[1]).argmax(1) == y_train[val]).float().mean().item()
        if best is None or acc > best[0]:
            best = (acc, l2, init)
    w, b = _fit_logreg(x_train, y_train, n_classes, best[1], best[2])
    return ((x_test @ w + b).argmax(1) == y_test).float().mean().item()


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------

# Per dataset: SSL epochs, batch, and the crop / colour recipe of every method's views
# (32x32 images: ImageNet's recipes crop down to 8% of the area and blur with sigma up to 2
# pixels, which leaves too little of a 32x32 image; digits are not mirror-symmetric, so no
# flip; the shapes' colours are uniformly random, so hue is fully randomised and gray more
# often).
DATA_SETTINGS = {
    "digits": dict(epochs=15, batch=128,
                   recipe=AugmentRecipe(crop_scale=(0.3, 1.0), flip_p=0.0, blur_p=0.0)),
    "shapes": dict(epochs=40, batch=128,
                   recipe=AugmentRecipe(crop_scale=(0.25, 1.0), hue=0.5, gray_p=0.5,
                                        blur_p=0.0)),
}
DEFAULT_DATA = "digits"
DEFAULT_WIDTH = 16
DEFAULT_LR = 5e-3


def add_arguments(p) -> None:
    p.add_argument("--method", choices=METHODS, default="simclr", help="the SSL method")
    p.add_argument("--data", choices=datasets.DATASETS, default=DEFAULT_DATA,
                   help="built-in dataset: scikit-learn's 8x8 digits (default), or procedural "
                        "shapes")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"SSL epochs (default: {DATA_SETTINGS['digits']['epochs']} on digits, "
                        f"{DATA_SETTINGS['shapes']['epochs']} on shapes; "
                        + "; ".join(f"{m}: {e} on {d}" for m, c in SSL_METHODS.items()
                                    for d, e in c.default_epochs.items()) + ")")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 128)")
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH,
                   help=f"encoder width w: features 4w; mae: the ViT's token width 4w "
                        f"(default: {DEFAULT_WIDTH})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW peak learning rate, 1-epoch warm-up, cosine decay "
                        f"(default: {DEFAULT_LR:g}; "
                        + "; ".join(f"{m}: {c.default_lr:g}" for m, c in SSL_METHODS.items()
                                    if c.default_lr is not None) + ")")
    p.add_argument("--n-train", type=int, default=None,
                   help="shapes only: training images (default 2048); the held-out split is "
                        "always 1024 class-balanced images")
    p.add_argument("--seed", type=int, default=0, help="seeds data, weights and augmentation")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a busy machine 1 "
                        "can be several times faster than oversubscribed threads)")
    p.add_argument("--out-dir", default="train_out", help="where the loss-curve PNG goes")
    p.add_argument("--no-plot", action="store_true", help="do not draw the loss curve")
    p.add_argument("--json", action="store_true", help="last stdout line: a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _plot(losses, steps_per_epoch, path, title) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(losses)), losses, lw=0.6, alpha=0.5, label="step")
    e = [sum(losses[i:i + steps_per_epoch]) / len(losses[i:i + steps_per_epoch])
         for i in range(0, len(losses), steps_per_epoch)]
    ax.plot([steps_per_epoch * (i + 0.5) for i in range(len(e))], e, marker="o", ms=3,
            label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("SSL loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SHAPES_HELD_OUT = 1024  # held-out images of the shapes data, whatever --n-train is


def _log(msg: str, enabled: bool) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def ci95(acc: float, n: int) -> float:
    """Half-width of the normal-approximation 95% interval of an accuracy measured on ``n``
    held-out images: the probe figures' sampling noise (at 1/6 and n = 1024: 2.3 points)."""
    return 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / n)


def method_defaults(method: str, data: str) -> tuple[int, float]:
    """``(epochs, lr)`` that ``fastssl train`` uses for ``method`` on ``data`` when the command
    line gives none: the dataset's epochs and :data:`DEFAULT_LR`, unless the method sets its
    own (:attr:`SSLMethod.default_epochs`, :attr:`SSLMethod.default_lr`)."""
    if method not in SSL_METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if data not in DATA_SETTINGS:
        raise ValueError(f"data must be one of {tuple(DATA_SETTINGS)}, got {data!r}")
    cls = SSL_METHODS[method]
    return (cls.default_epochs.get(data, DATA_SETTINGS[data]["epochs"]),
            cls.default_lr if cls.default_lr is not None else DEFAULT_LR)


def train(method: str = "simclr", data: str = DEFAULT_DATA, *, epochs=None, batch=None,
          width: int = DEFAULT_WIDTH, lr: float | None = None, n_train=None, seed: int = 0,
          device="cpu", progress: bool = True) -> dict:
    """Pre-trains, probes, and returns the summary dict (plus ``losses``).

    Progress goes to stderr from the first second (flushed): what is being built, a bar for
    the SSL steps, then each probe as it runs. The baselines are probed after SSL, from the
    encoder's saved initial weights, so the bar starts at once."""
    t0 = time.perf_counter()
    _log(f"fastssl train: {method} on {data}: building the data and the model ...", progress)
    if data not in DATA_SETTINGS:
        raise ValueError(f"data must be one of {tuple(DATA_SETTINGS)}, got {data!r}")
    if n_train is not None and data != "shapes":
        raise ValueError(f"--n-train applies to the shapes data only (got data={data!r})")
    if data == "shapes" and n_train is not None:
        ds = datasets.shapes(n_train=n_train, n_test=SHAPES_HELD_OUT, seed=seed)
    else:
        ds = datasets.load(data, seed=seed)
    settings = DATA_SETTINGS[data]
    default_epochs, default_lr = method_defaults(method, data)
    epochs = epochs if epochs is not None else default_epochs
    lr = lr if lr is not None else default_lr
    batch = batch if batch is not None else settings["batch"]
    x_train = ds.images[ds.train]
    batch = min(batch, x_train.shape[0])
    steps_per_epoch = x_train.shape[0] // batch
    total = epochs * steps_per_epoch
    # MoCo's queue: at most half the training set, so that it never holds a stale key of
    # the very image it serves as a negative for (4096 keys on 1,437 digits would hold each
    # image ~3 times).
    queue_size = max(batch, min(4096, x_train.shape[0] // 2 // batch * batch))
    model = SSLModel(method, width=width, lr=lr, total_steps=total,
                     warmup_steps=min(steps_per_epoch, total // 10), device=device, seed=seed,
                     recipe=settings["recipe"], queue_size=queue_size)
    y_tr, y_te = ds.labels[ds.train], ds.labels[ds.test]
    _log(f"  {ds.train.numel()} training / {ds.test.numel()} held-out images, "
         f"{len(ds.classes)} classes; {epochs} epochs x {steps_per_epoch} steps of {batch}, "
         f"{torch.get_num_threads()} threads", progress)

    gen = torch.Generator().manual_seed(seed + 3)
    losses = []
    t_ssl = time.perf_counter()
    bar = Progress(total, f"{method}/{data}", enabled=progress)
    for _ in range(epochs):
        perm = torch.randperm(x_train.shape[0], generator=gen)
        for s in range(steps_per_epoch):
            imgs = x_train[perm[s * batch:(s + 1) * batch]].to(model.device)
            losses.append(float(model.step(imgs)))
            bar.update(loss=losses[-1])
    bar.close()
    t_ssl = time.perf_counter() - t_ssl

    acc = {}

    def probe(name, label, features):
        t = time.perf_counter()
        _log(f"  linear probe: {label} ...", progress)
        f_tr, f_te = features()
        acc[name] = linear_probe(f_tr, y_tr, f_te, y_te, seed=seed)
        _log(f"    {100 * acc[name]:.1f}% ({time.perf_counter() - t:.0f} s)", progress)

    def frozen(enc):
        return lambda: encode(enc, [x_train, ds.images[ds.test]], calibrate=x_train)

    probe("ssl", "SSL encoder (frozen)", frozen(model.encoder))
    # The same encoder at its random initialisation (the very weights SSL started from).
    probe("random", "same encoder at random init", frozen(model.initial_encoder))
    probe("pixel", "raw pixels", lambda: (ds.pixels[ds.train], ds.pixels[ds.test]))
    n_test = int(ds.test.numel())
    return {"method": method, "data": data, "epochs": epochs,
            "ssl_probe_acc": round(acc["ssl"], 4), "random_probe_acc": round(acc["random"], 4),
            "pixel_probe_acc": round(acc["pixel"], 4),
            "seconds": round(time.perf_counter() - t0, 1), "ssl_seconds": round(t_ssl, 1),
            "n_train": int(ds.train.numel()), "n_test": n_test, "batch": batch,
            "chance": round(1 / len(ds.classes), 4),
            "ci95": {k: round(ci95(v, n_test), 4) for k, v in acc.items()},
            "steps": total, "losses": losses, "steps_per_epoch": steps_per_epoch}


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    res = train(args.method, args.data, epochs=args.epochs, batch=args.batch, width=args.width,
                lr=args.lr, n_train=args.n_train, seed=args.seed, device=args.device,
                progress=not args.quiet)
    plot = None
    if not args.no_plot:
        os.makedirs(args.out_dir, exist_ok=True)
        plot = os.path.join(args.out_dir, f"loss_{res['method']}_{res['data']}.png")
        _plot(res["losses"], res["steps_per_epoch"], plot,
              f"fastssl train: {res['method']} on {res['data']}")
    print(f"fastssl train: {res['method']} on {res['data']} ({res['n_train']} train / "
          f"{res['n_test']} held-out images), {res['epochs']} epochs x "
          f"{res['steps_per_epoch']} steps of {res['batch']}, {res['seconds']:.0f} s "
          f"(SSL {res['ssl_seconds']:.0f} s), {torch.get_num_threads()} threads", flush=True)
    print(f"{'linear probe (held-out)':<34}{'accuracy':>10}   95% interval")
    for key, short, label in (("ssl_probe_acc", "ssl", f"{res['method']} encoder (frozen)"),
                              ("random_probe_acc", "random", "same encoder, random init"),
                              ("pixel_probe_acc", "pixel", "raw pixels")):
        print(f"{label:<34}{100 * res[key]:>9.1f}%   +-{100 * res['ci95'][short]:.1f}")
    print(f"{'chance (1 / classes)':<34}{100 * res['chance']:>9.1f}%")
    print(f"SSL loss: {res['losses'][0]:.3f} (first step) -> "
          f"{sum(res['losses'][-res['steps_per_epoch']:]) / res['steps_per_epoch']:.3f} "
          f"(last epoch mean)" + (f"; curve: {plot}" if plot else ""))
    if args.json:
        keys = ("method", "data", "epochs", "ssl_probe_acc", "random_probe_acc",
                "pixel_probe_acc", "seconds")
        print(json.dumps({k: res[k] for k in keys}))
    sys.stdout.flush()
    return 0
