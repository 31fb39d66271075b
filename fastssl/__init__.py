"""fastssl: fused kernels for large-batch self-supervised training.

Public API (see README.md): losses (functional and ``nn.Module``), and ``fastssl.reference``,
the pure-PyTorch specification of every op.
"""
from . import augment, reference
from .augment import SSLAugment
from .functional import clip_loss, info_nce, nt_xent, supcon
from .functional import masked_token_loss, negative_cosine, symmetric_negative_cosine
from .functional import barlow_twins, vicreg
from .functional import dino_loss, ibot_patch_loss
from .functional import masked_patch_loss
from .losses import BarlowTwinsLoss, VICRegLoss
from .losses import CLIPLoss, InfoNCELoss, NTXentLoss, SupConLoss
from .losses import MaskedPatchLoss
from .moco import MoCoQueue, MomentumEncoder, ema_update_, momentum_schedule
from . import pretext
from .pretext import MultiCropAugment, PretextAugment, mae_mask

__version__ = "0.1.0"

__all__ = ["nt_xent", "NTXentLoss", "info_nce", "InfoNCELoss", "clip_loss", "CLIPLoss",
           "supcon", "SupConLoss", "ema_update_", "momentum_schedule", "MomentumEncoder",
           "MoCoQueue", "augment", "SSLAugment", "reference", "__version__",
           "negative_cosine", "symmetric_negative_cosine", "masked_token_loss",
           "barlow_twins", "vicreg",
           "dino_loss", "ibot_patch_loss",
           "masked_patch_loss", "MaskedPatchLoss",
           "pretext", "PretextAugment", "MultiCropAugment", "mae_mask",
           "BarlowTwinsLoss", "VICRegLoss"]
