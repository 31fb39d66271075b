"""fastssl: fused kernels for large-batch self-supervised contrastive training.

Public API (see README.md): losses (functional and ``nn.Module``), and ``fastssl.reference``,
the pure-PyTorch specification of every op.
"""
from . import augment, reference
from .augment import SSLAugment
from .functional import clip_loss, info_nce, nt_xent, supcon
from .functional import barlow_twins, vicreg
from .losses import BarlowTwinsLoss, VICRegLoss
from .losses import CLIPLoss, InfoNCELoss, NTXentLoss, SupConLoss
from .moco import MoCoQueue, MomentumEncoder, ema_update_, momentum_schedule

__version__ = "0.1.0"

__all__ = ["nt_xent", "NTXentLoss", "info_nce", "InfoNCELoss", "clip_loss", "CLIPLoss",
           "supcon", "SupConLoss", "ema_update_", "momentum_schedule", "MomentumEncoder",
           "MoCoQueue", "augment", "SSLAugment", "reference", "__version__",
           "barlow_twins", "vicreg", "BarlowTwinsLoss", "VICRegLoss"]
