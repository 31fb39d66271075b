"""fastssl: fused kernels for large-batch self-supervised contrastive training.

Public API (see README.md): losses (functional and ``nn.Module``), and ``fastssl.reference``,
the pure-PyTorch specification of every op.
"""
from . import reference
from .functional import nt_xent
from .losses import NTXentLoss
from .moco import MoCoQueue, MomentumEncoder, ema_update_, momentum_schedule

__version__ = "0.1.0"

__all__ = ["nt_xent", "NTXentLoss", "ema_update_", "momentum_schedule", "MomentumEncoder",
           "MoCoQueue", "reference", "__version__"]
