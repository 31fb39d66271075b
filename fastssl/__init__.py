"""fastssl: fused kernels for large-batch self-supervised contrastive training.

Public API (see README.md): losses (functional and ``nn.Module``), and ``fastssl.reference``,
the pure-PyTorch specification of every op.
"""
from . import augment, reference
from .augment import SSLAugment
from .functional import nt_xent
from .losses import NTXentLoss

__version__ = "0.1.0"

__all__ = ["nt_xent", "NTXentLoss", "augment", "SSLAugment", "reference", "__version__"]
