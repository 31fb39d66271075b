"""Functional API: validate the arguments, pick a backend (``fastssl._dispatch``), run it.

Every function here raises ``TypeError``/``ValueError`` for bad input before any kernel runs.
"""
from __future__ import annotations

import torch

from . import _dispatch, _validate, reference


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature=0.1, *, normalize: bool = True,
            reduction: str = "mean", gather: bool = False, decoupled: bool = False,
            backend: str = "auto") -> torch.Tensor:
    r"""NT-Xent, the normalised temperature-scaled cross-entropy loss of SimCLR, fused.

    Chen et al., *A Simple Framework for Contrastive Learning of Visual Representations*,
    2020 (https://arxiv.org/abs/2002.05709).

    With :math:`Z = [z_1; z_2]` (2N x D, rows L2-normalised when ``normalize``) and
    :math:`S = Z Z^\top / \tau`, row *i*'s positive is :math:`t(i) = (i + N) \bmod 2N` and

    .. math:: \ell_i = \log \sum_{j \ne i} e^{S_{ij}} - S_{i,t(i)}

    The fused kernels never form the 2N x 2N matrix: memory is O(N·D).

    Args:
        z1: (N, D) embeddings of the first view. float32, bfloat16 or float16 (float64 runs
            the reference). The fused kernels accumulate in fp32 and return gradients in the
            input dtype.
        z2: (N, D) embeddings of the second view, same dtype and device as ``z1``.
        temperature: :math:`\tau`, a float or a 0-dim tensor > 0. If it is a tensor that
            requires grad (a learnable temperature), its gradient is computed.
        normalize: L2-normalise the rows first (eps = 1e-12 on the norm, computed in fp32).
        reduction: ``"mean"`` over the 2N rows (SimCLR), ``"sum"``, or ``"none"`` for the
            (2N,) per-row losses (rows 0..N-1 are the z1 anchors).
        gather: score the local rows against the embeddings of all ranks
            (torch.distributed). Not available yet: raises ``NotImplementedError``.
        decoupled: the DCL variant (Yeh et al. 2021): the positive is left out of the
            log-sum-exp. Needs N >= 2 (with N = 1 a row would have no negative).
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"cpp"``, ``"triton"`` or
            ``"reference"``; ``FASTSSL_BACKEND`` overrides ``"auto"``.

    Returns:
        A scalar (``"mean"``/``"sum"``) or a (2N,) tensor, in the input dtype.

    Raises:
        TypeError: non-tensor or integer inputs, dtypes that differ.
        ValueError: shapes that differ or are not (N, D) with N, D >= 1, tensors on different
            devices, temperature <= 0 or not finite, unknown reduction or backend.

    NaN or inf anywhere in ``z1``/``z2`` gives NaN losses (every row's log-sum-exp reads every
    column), never an error or a finite number.

    Example:
        >>> import torch, fastssl
        >>> z1, z2 = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss = fastssl.nt_xent(z1, z2, temperature=0.5)
        >>> bool(torch.allclose(loss, fastssl.reference.nt_xent(z1, z2, 0.5), atol=1e-5))
        True
    """
    _validate.embeddings("z1", z1)
    _validate.embeddings("z2", z2)
    _validate.same_shape(("z1", "z2"), (z1, z2))
    _validate.same_device_dtype(("z1", "z2"), (z1, z2))
    _validate.reduction(reduction)
    temp = _validate.positive_scalar("temperature", temperature, z1.device)
    if decoupled and z1.shape[0] < 2:
        raise ValueError("decoupled=True needs N >= 2: with N = 1 a row has no negative")
    if gather:
        raise NotImplementedError("nt_xent(gather=True) (global negatives across ranks) is "
                                  "not implemented yet")
    be = _dispatch.resolve(backend, z1.device, op="nt_xent", cpp_op="ntxent_fwd",
                           has_triton=True)
    if be == "reference" or z1.dtype == torch.float64:
        return reference.nt_xent(z1, z2, temp, normalize=normalize, reduction=reduction,
                                 decoupled=decoupled)
    if be == "cpp":
        from .cpp import ntxent as cpp_ntxent
        rows = cpp_ntxent.nt_xent_rows(z1, z2, temp, normalize, decoupled)
    else:
        from .ops import ntxent as triton_ntxent
        rows = triton_ntxent.nt_xent_rows(z1, z2, temp, normalize, decoupled)
    return _validate.reduce(rows, reduction)
