"""Functional API: validate the arguments, then run the op (``torch.ops.fastssl.<op>``: C++
on CPU tensors, Triton on CUDA tensors, see ``fastssl/ops``) or the reference, as
``fastssl._dispatch`` decides.

Every function here raises ``TypeError``/``ValueError`` for bad input before any kernel runs.
Scalars (temperature, logit scale) reach the kernels as device tensors: no host sync on a
loss's path.
"""
from __future__ import annotations

import torch

from . import _dispatch, _validate, distributed, ops, reference


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
            (torch.distributed, see :mod:`fastssl.distributed`): rows are this rank's
            [z1; z2] (2N), columns the [z1; z2] of every rank (2 N world), gathered with a
            gradient-carrying all_gather. The result is the mean over the *local* rows;
            every rank must pass the same N. Gradient convention: a rank's embeddings receive
            the sum over all ranks' losses of their gradients, so after DDP's gradient
            averaging one step equals one single-process step on the concatenated batch (if
            you all_reduce gradients yourself with a sum, divide by the world size).
            Without an initialised process group it is the plain loss.
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
    if gather and distributed.world_size() > 1:
        return _nt_xent_gathered(z1, z2, temp, normalize, reduction, decoupled, backend)
    be = _dispatch.resolve(backend, z1.device, op="nt_xent", cpp_op="ntxent_fwd")
    if be == "reference" or z1.dtype == torch.float64:
        return reference.nt_xent(z1, z2, temp, normalize=normalize, reduction=reduction,
                                 decoupled=decoupled)
    # One op on every device: the C++ kernel on CPU tensors, the Triton kernel on CUDA ones.
    rows = ops.nt_xent.nt_xent_rows(z1, z2, _validate.scale_tensor(temp, z1.device), normalize,
                                    decoupled)
    return _validate.reduce(rows, reduction)


# ---------------------------------------------------------------------------------------
# Rows vs gathered columns: the engine of every gather=True loss
# ---------------------------------------------------------------------------------------


def _rows_vs_columns(q, c, scale, target, self_idx, *, normalize, mask_target, backend, op,
                     invert=False):
    """Per-row losses (M,) fp32 of local rows q against columns c with targets (global column
    indices); the logits are ``scale * qhat chat^T`` (``1 / scale`` with ``invert``: a
    temperature). The fused ``xent`` op (C++ on CPU, Triton on CUDA), or the reference."""
    be = _dispatch.resolve(backend, q.device, op=op, cpp_op="xent_fwd")
    if be == "reference" or q.dtype == torch.float64:
        return reference.rows_vs_columns(q, c, 1.0 / scale if invert else scale, target,
                                         self_idx, normalize=normalize, mask_target=mask_target)
    return ops.xent.xent_rows(q, c, _validate.scale_tensor(scale, q.device, invert=invert),
                              target, self_idx, normalize, mask_target)


def _nt_xent_gathered(z1, z2, temp, normalize, reduction, decoupled, backend):
    # Local rows Z = [z1; z2] (2N); columns: the Z of every rank, in rank order (2N world).
    # Local row a is global column r*2N + a (its self-similarity, masked) and its positive is
    # the other view of the same sample, r*2N + (a + N) mod 2N.
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    cols = distributed.gather_with_grad(z, what="nt_xent(gather=True)")
    a = torch.arange(2 * n, device=z.device)
    base = distributed.rank() * 2 * n
    rows = _rows_vs_columns(z, cols, temp, base + (a + n) % (2 * n), base + a,
                            normalize=normalize, mask_target=decoupled, backend=backend,
                            op="nt_xent", invert=True)
    return _validate.reduce(rows, reduction).to(z1.dtype)


# ---------------------------------------------------------------------------------------
# InfoNCE (MoCo), CLIP, SupCon
# ---------------------------------------------------------------------------------------


def info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None = None,
             temperature=0.07, *, normalize: bool = True, reduction: str = "mean",
             gather: bool = False, backend: str = "auto") -> torch.Tensor:
    r"""InfoNCE, the contrastive loss of MoCo, fused: O((N + K)·D) memory.

    He et al., *Momentum Contrast for Unsupervised Visual Representation Learning*, 2020
    (https://arxiv.org/abs/1911.05722); van den Oord et al. 2018
    (https://arxiv.org/abs/1807.03748).

    With a queue (MoCo v1/v2), each query's positive is its own key and the negatives are the
    queue entries:

    .. math:: \ell_i = -\log \frac{e^{q_i \cdot k_i / \tau}}
              {e^{q_i \cdot k_i / \tau} + \sum_{j=1}^{K} e^{q_i \cdot u_j / \tau}}

    Without a queue (MoCo v3, one direction of CLIP), the other keys of the batch are the
    negatives: :math:`\ell_i = \log \sum_j e^{q_i \cdot k_j / \tau} - q_i \cdot k_i / \tau`.
    The queue never receives a gradient; ``key`` does when it requires one (in MoCo it is
    produced under ``torch.no_grad()``). On CPU the queue is split across all threads, so the
    MoCo shape (256 queries vs 65,536 entries) uses every core.

    Args:
        query: (N, D) queries. float32, bfloat16 or float16 (float64 runs the reference).
        key: (N, D) keys; row i is query i's positive. Same dtype and device as ``query``.
        queue: (K, D) negatives (MoCo's memory queue) or None (in-batch negatives).
        temperature: :math:`\tau`, a float or a 0-dim tensor > 0 (its gradient is computed
            if it requires one).
        normalize: L2-normalise query, key and queue rows first (eps = 1e-12).
        reduction: ``"mean"`` over the N queries, ``"sum"``, or ``"none"`` (N,).
        gather: in-batch mode only: score the local queries against the keys of all ranks
            (global negatives, see :func:`nt_xent` for the gradient convention).
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"`` (see
            :func:`nt_xent`).

    Returns:
        A scalar (``"mean"``/``"sum"``) or an (N,) tensor, in the input dtype.

    Raises:
        TypeError: non-tensor or integer inputs, dtypes that differ.
        ValueError: query/key shapes that differ, a queue whose D differs from the query's,
            tensors on different devices, temperature <= 0, unknown reduction or backend,
            ``gather=True`` with a queue.

    Example:
        >>> import torch, fastssl
        >>> q, k = torch.randn(8, 32), torch.randn(8, 32)
        >>> queue = torch.nn.functional.normalize(torch.randn(4096, 32), dim=1)
        >>> loss = fastssl.info_nce(q, k, queue, temperature=0.2)
        >>> ref = fastssl.reference.info_nce(q, k, queue, 0.2)
        >>> bool(torch.allclose(loss, ref, atol=1e-5))
        True
    """
    _validate.embeddings("query", query)
    _validate.embeddings("key", key)
    _validate.same_shape(("query", "key"), (query, key))
    _validate.same_device_dtype(("query", "key"), (query, key))
    if queue is not None:
        _validate.queue("queue", queue, query, "query")
        if gather:
            raise ValueError("info_nce: gather=True is for the in-batch mode (queue=None); "
                             "enqueue the keys of all ranks instead (fastssl.distributed."
                             "gather_no_grad)")
    _validate.reduction(reduction)
    temp = _validate.positive_scalar("temperature", temperature, query.device)
    n = query.shape[0]
    if queue is None and gather and distributed.world_size() > 1:
        keys = distributed.gather_with_grad(key, what="info_nce(gather=True)")
        target = distributed.rank() * n + torch.arange(n, device=query.device)
        rows = _rows_vs_columns(query, keys, temp, target, torch.full_like(target, -1),
                                normalize=normalize, mask_target=False, backend=backend,
                                op="info_nce", invert=True)
        return _validate.reduce(rows, reduction).to(query.dtype)
    cpp_op = "info_nce_queue_fwd" if queue is not None else "xent_fwd"
    be = _dispatch.resolve(backend, query.device, op="info_nce", cpp_op=cpp_op)
    if be == "reference" or query.dtype == torch.float64:
        return reference.info_nce(query, key, queue, temp, normalize=normalize,
                                  reduction=reduction)
    scale = _validate.scale_tensor(temp, query.device, invert=True)
    if queue is not None:
        rows = ops.info_nce.info_nce_queue_rows(query, key, queue, scale, normalize)
    else:
        target = torch.arange(n, device=query.device)
        rows = ops.xent.xent_rows(query, key, scale, target, torch.full_like(target, -1),
                                  normalize)
    return _validate.reduce(rows, reduction).to(query.dtype)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale, *, logit_bias=None,
              normalize: bool = True, gather: bool = False,
              backend: str = "auto") -> torch.Tensor:
    r"""Symmetric CLIP loss (image->text and text->image cross-entropy), fused: O(B·D) memory.

    Radford et al., *Learning Transferable Visual Models From Natural Language Supervision*,
    2021 (https://arxiv.org/abs/2103.00020).

    With :math:`S = s\, \hat I \hat T^\top` (rows L2-normalised, :math:`s` = ``logit_scale``):

    .. math:: \mathcal L = \tfrac12 \Big(\tfrac1B \sum_i \big[\log \textstyle\sum_j e^{S_{ij}}
              - S_{ii}\big] + \tfrac1B \sum_j \big[\log \sum_i e^{S_{ij}} - S_{jj}\big]\Big)

    The fused kernel computes both log-sum-exps from the same tiles, recomputes each tile once
    in backward for both directions, and never forms the B x B matrix.

    Args:
        image: (B, D) image embeddings. float32, bfloat16 or float16 (float64: reference).
        text: (B, D) text embeddings; row i pairs with image i. Same dtype and device.
        logit_scale: the multiplier :math:`s` (CLIP's ``logit_scale.exp()``), a float or a
            0-dim tensor > 0; its gradient is computed when it requires one.
        logit_bias: must be None. SigLIP's bias belongs to its sigmoid loss (another op); in
            this softmax loss a scalar bias cancels.
        normalize: L2-normalise the rows first (eps = 1e-12).
        gather: score the local images (texts) against the texts (images) of all ranks
            (global negatives); the result is the loss of the local rows, see
            :func:`nt_xent` for the gradient convention under DDP.
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"``.

    Returns:
        A scalar in the input dtype.

    Raises:
        TypeError: non-tensor or integer inputs, dtypes that differ.
        ValueError: shapes that differ, tensors on different devices, logit_scale <= 0 or
            not finite, unknown backend.
        NotImplementedError: ``logit_bias`` is not None.

    Example:
        >>> import torch, fastssl
        >>> image = torch.randn(16, 64, requires_grad=True)
        >>> text = torch.randn(16, 64, requires_grad=True)
        >>> logit_scale = torch.tensor(2.659).exp().requires_grad_()  # CLIP's init, 1/0.07
        >>> loss = fastssl.clip_loss(image, text, logit_scale)
        >>> loss.backward()
        >>> image.grad.shape, logit_scale.grad.shape
        (torch.Size([16, 64]), torch.Size([]))
    """
    _validate.embeddings("image", image)
    _validate.embeddings("text", text)
    _validate.same_shape(("image", "text"), (image, text))
    _validate.same_device_dtype(("image", "text"), (image, text))
    scale = _validate.positive_scalar("logit_scale", logit_scale, image.device)
    if logit_bias is not None:
        raise NotImplementedError("clip_loss: logit_bias is not supported (SigLIP's sigmoid "
                                  "loss is a different op; in the softmax CLIP loss an "
                                  "additive bias cancels)")
    if gather and distributed.world_size() > 1:
        b = image.shape[0]
        texts = distributed.gather_with_grad(text, what="clip_loss(gather=True)")
        images = distributed.gather_with_grad(image, what="clip_loss(gather=True)")
        target = distributed.rank() * b + torch.arange(b, device=image.device)
        none = torch.full_like(target, -1)
        kw = dict(normalize=normalize, mask_target=False, backend=backend, op="clip_loss")
        i2t = _rows_vs_columns(image, texts, scale, target, none, **kw)
        t2i = _rows_vs_columns(text, images, scale, target, none, **kw)
        return ((i2t.mean() + t2i.mean()) / 2).to(image.dtype)
    be = _dispatch.resolve(backend, image.device, op="clip_loss", cpp_op="clip_fwd")
    if be == "reference" or image.dtype == torch.float64:
        return reference.clip_loss(image, text, scale, normalize=normalize)
    row, col = ops.clip_loss.clip_rows(image, text, _validate.scale_tensor(scale, image.device),
                                       normalize)
    return ((row.mean() + col.mean()) / 2).to(image.dtype)


def supcon(features: torch.Tensor, labels: torch.Tensor, temperature=0.1, *,
           normalize: bool = True, backend: str = "auto") -> torch.Tensor:
    r"""Supervised contrastive loss (SupCon, the :math:`\mathcal L^{sup}_{out}` form), fused.

    Khosla et al., *Supervised Contrastive Learning*, 2020 (https://arxiv.org/abs/2004.11362).

    With :math:`S = \hat Z \hat Z^\top / \tau` and :math:`P(i)` the other samples with anchor
    i's label:

    .. math:: \ell_i = -\frac{1}{|P(i)|} \sum_{p \in P(i)}
              \log \frac{e^{S_{ip}}}{\sum_{j \ne i} e^{S_{ij}}}

    The loss is the mean of :math:`\ell_i` over the anchors with :math:`|P(i)| \ge 1`;
    **anchors without a positive are excluded** (and receive no gradient as anchors); if no
    anchor has a positive the loss is 0. For SimCLR-style multi-view batches, pass the views
    stacked (``torch.cat([v1, v2])``) and the labels repeated. Memory is O(N·D): the positive
    term uses per-class sums instead of an N x N mask.

    Args:
        features: (N, D) embeddings. float32, bfloat16 or float16 (float64: reference).
        labels: (N,) integer class labels, on the features' device.
        temperature: :math:`\tau`, a float or a 0-dim tensor > 0.
        normalize: L2-normalise the rows first (eps = 1e-12).
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"``.

    Returns:
        A scalar in the input dtype.

    Raises:
        TypeError: non-tensor features, non-integer labels.
        ValueError: features not (N, D), labels not (N,), labels on another device,
            temperature <= 0, unknown backend.

    Example:
        >>> import torch, fastssl
        >>> z = torch.randn(12, 32, requires_grad=True)
        >>> y = torch.tensor([0, 1, 2] * 4)
        >>> loss = fastssl.supcon(z, y, temperature=0.1)
        >>> bool(torch.allclose(loss, fastssl.reference.supcon(z, y, 0.1), atol=1e-5))
        True
    """
    _validate.embeddings("features", features)
    _validate.labels("labels", labels, features.shape[0], features.device)
    temp = _validate.positive_scalar("temperature", temperature, features.device)
    be = _dispatch.resolve(backend, features.device, op="supcon", cpp_op="supcon_fwd")
    if be == "reference" or features.dtype == torch.float64:
        return reference.supcon(features, labels, temp, normalize=normalize)
    alpha = _validate.scale_tensor(temp, features.device, invert=True)
    rows, npos = ops.supcon.supcon_rows(features, labels, alpha, normalize)
    return (rows.sum() / (npos > 0).sum().clamp(min=1)).to(features.dtype)


# ---------------------------------------------------------------------------------------
# Masked patch reconstruction loss (MAE)
# ---------------------------------------------------------------------------------------


def masked_patch_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, *,
                      patch_size: int, norm_pix: bool = True, eps: float = 1e-6,
                      backend: str = "auto") -> torch.Tensor:
    r"""MAE's pixel reconstruction loss, fused: patchify, per-patch normalisation and the MSE
    of the masked patches in one pass over the images (no patchified copy of them).

    He et al., *Masked Autoencoders Are Scalable Vision Learners*, 2022
    (https://arxiv.org/abs/2111.06377), ``norm_pix_loss``.

    Patch order (``fastssl.reference.patchify``, MAE's ``'nchpwq->nhwpqc'``): patch
    :math:`l = i \cdot (W/p) + j` covers rows :math:`ip \ldots ip+p-1`, columns
    :math:`jp \ldots jp+p-1`; its value :math:`(u p + v) C + c` is pixel (u, v) of channel c.
    With :math:`x` a patch's n = p·p·C image values,

    .. math:: t = \frac{x - \bar x}{\sqrt{\operatorname{var}(x) + \epsilon}},\quad
              \ell_{bl} = \frac1n \lVert \hat y_{bl} - t \rVert^2,\quad
              \mathcal L = \frac{\sum_{bl} m_{bl}\, \ell_{bl}}{\sum_{bl} m_{bl}}

    with the **unbiased** variance (divisor n - 1: MAE's ``target.var(dim=-1)``), and
    :math:`t = x` when ``norm_pix=False``.

    Args:
        pred: (B, L, p·p·C) predicted patches (MAE's decoder output). float32, bfloat16 or
            float16; float64 (in ``pred`` or ``images``) runs the reference. Receives the
            gradient, in its own dtype.
        images: (B, C, H, W) target images, float32/bfloat16/float16 (any of them, whatever
            ``pred``'s dtype is), already normalised as the encoder saw them (MAE computes the
            loss on the mean/std-normalised images). Integer images are refused: convert
            them first (``norm_pix=True`` removes a scale and offset per patch, but ``eps``
            does not scale with them). H and W must be multiples of ``patch_size``; H != W
            is allowed. No gradient flows to ``images``.
        mask: (B, L), bool or floating: 1 (True) = masked, i.e. predicted and scored; 0 =
            visible. Floating values act as weights in :math:`\sum m\ell / \sum m`.
        patch_size: p, an int >= 1.
        norm_pix: normalise each target patch by its mean and unbiased variance.
        eps: :math:`\epsilon` > 0 (MAE: 1e-6).
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"``.

    Returns:
        A scalar in ``promote_types(pred.dtype, images.dtype)``. If the mask sums to 0 (no
        patch is predicted) the loss is 0 and every gradient 0 (MAE's formula gives 0/0 =
        NaN). Patches with mask 0 are never read: NaN/inf there does not reach the result.

    Raises:
        TypeError: non-tensor inputs, integer images or pred, a mask that is neither bool nor
            floating, a non-int patch_size or non-float eps.
        ValueError: images not 4-D, H or W not a multiple of patch_size, pred not
            (B, L, p·p·C) or mask not (B, L) for these images, tensors on different devices,
            eps <= 0, ``norm_pix`` with p·p·C = 1 (variance of one value), images or a float
            mask that require grad on the fused path (it gives them no gradient).

    Example:
        >>> import torch, fastssl
        >>> images = torch.randn(2, 3, 32, 32)
        >>> pred = torch.randn(2, 4, 16 * 16 * 3, requires_grad=True)
        >>> mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
        >>> loss = fastssl.masked_patch_loss(pred, images, mask, patch_size=16)
        >>> ref = fastssl.reference.masked_patch_loss(pred, images, mask, patch_size=16)
        >>> bool(torch.allclose(loss, ref, atol=1e-5))
        True
    """
    _validate.masked_patch_inputs(pred, images, mask, patch_size, norm_pix, eps)
    be = _dispatch.resolve(backend, pred.device, op="masked_patch_loss",
                           cpp_op="masked_patch_loss_fwd")
    out_dtype = torch.promote_types(pred.dtype, images.dtype)
    if be == "reference" or out_dtype == torch.float64:
        return reference.masked_patch_loss(pred, images, mask, patch_size=patch_size,
                                           norm_pix=norm_pix, eps=eps)
    for name, t in (("images", images), ("mask", mask)):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"masked_patch_loss computes no gradient for {name}, which "
                             "requires grad: detach it (MAE's target is data), or use "
                             "backend='reference'")
    weights = mask.to(torch.float32).contiguous()
    loss = ops.masked_patch_loss.masked_patch_loss_op(pred.contiguous(), images.contiguous(),
                                                      weights, patch_size, norm_pix,
                                                      float(eps))
    return loss.to(out_dtype)
