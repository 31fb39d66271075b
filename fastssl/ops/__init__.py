"""The fused ops: one module per op (``nt_xent``, ``info_nce``, ``clip_loss``, ``supcon``,
``xent`` -- the rows-vs-columns engine of the ``gather=True`` losses --, ``augment``, ``ema``,
``queue``), each holding its ``torch.library`` schemas, fake, autograd registration and Triton
CUDA kernels (``_library`` says how; the C++ CPU kernels are in ``csrc/cpu``), plus the Triton
contrastive engine they share (``contrastive_core``). Importing this package defines every
``torch.ops.fastssl`` op. Each module lists its ahead-of-time configurations in
``AOT_KERNELS`` (see ``fastssl gpu-report``)."""
from . import augment, clip_loss, ema, info_nce, nt_xent, queue, supcon, xent  # noqa: F401
from . import masked_token_loss, negative_cosine  # noqa: F401  (issue 14)

from . import barlow_twins, vicreg  # noqa: F401,E402  (issue 14: redundancy reduction)

from . import dino_loss  # noqa: F401,E402

from . import masked_patch_loss  # noqa: F401,E402

from . import pretext  # noqa: F401,E402

from .. import _ext  # noqa: E402

# The C++ CPU kernels register when fastssl._C loads: load it now (or keep why not), so that
# torch.ops.fastssl.<op> on CPU tensors works however the op is reached.
_ext.available()
