"""Functional API: validate the arguments, then run the op (``torch.ops.fastssl.<op>``: C++
on CPU tensors, Triton on CUDA tensors, see ``fastssl/ops``) or the reference, as
``fastssl._dispatch`` decides.

Every function here raises ``TypeError``/``ValueError`` for bad input before any kernel runs.
Scalars (temperature, logit scale) reach the kernels as device tensors: no host sync on a
loss's path.
"""
from __future__ import annotations

import math

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
# BYOL / SimSiam negative cosine                                                [issue 14]
# ---------------------------------------------------------------------------------------


def _pair(p_name: str, z_name: str, p, z) -> None:
    _validate.embeddings(p_name, p)
    _validate.embeddings(z_name, z)
    _validate.same_shape((p_name, z_name), (p, z))
    _validate.same_device_dtype((p_name, z_name), (p, z))


def _negative_cosine_rows(p, z, backend):
    be = _dispatch.resolve(backend, p.device, op="negative_cosine", cpp_op="negative_cosine_fwd")
    if be == "reference" or p.dtype == torch.float64:
        return reference.negative_cosine(p, z, reduction="none")
    return ops.negative_cosine.negative_cosine_rows(p, z)


def negative_cosine(p: torch.Tensor, z: torch.Tensor, *, reduction: str = "mean",
                    backend: str = "auto") -> torch.Tensor:
    r"""The BYOL / SimSiam regression loss, 2 - 2 cos(p, z) per row, with a stop-gradient on z.

    Grill et al., *Bootstrap Your Own Latent*, 2020 (https://arxiv.org/abs/2006.07733);
    Chen & He, *Exploring Simple Siamese Representation Learning*, 2020
    (https://arxiv.org/abs/2011.10566).

    .. math:: \ell_i = \lVert \hat p_i - \hat z_i \rVert^2 = 2 - 2\,
              \frac{p_i \cdot z_i}{\max(\lVert p_i \rVert, \epsilon)\,\max(\lVert z_i\rVert,
              \epsilon)}, \quad \epsilon = 10^{-12}

    ``z`` (the target: the momentum encoder's projection in BYOL, the other view's projection
    in SimSiam) receives **no gradient**, whether or not it requires grad: the stop-gradient
    is part of the op, so ``z`` need not be detached. One fused pass per row: the norms and the
    dot product are accumulated without overflow (rows up to the dtype's largest value) and
    never materialise the normalised rows.

    Args:
        p: (N, D) predictions (the online network's predictor output). float32, bfloat16 or
            float16 (float64 runs the reference); gradients come back in p's dtype.
        z: (N, D) targets, same shape, dtype and device as ``p``.
        reduction: ``"mean"`` over the N rows, ``"sum"``, or ``"none"`` for the (N,) losses.
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"cpp"``, ``"triton"`` or
            ``"reference"``; ``FASTSSL_BACKEND`` overrides ``"auto"``.

    Returns:
        A scalar (``"mean"``/``"sum"``) or an (N,) tensor, in the input dtype; each row in
        [0, 4]. A row holding NaN or inf gives NaN.

    Raises:
        TypeError: non-tensor or integer inputs, dtypes that differ.
        ValueError: shapes that differ or are not (N, D) with N, D >= 1, tensors on different
            devices, unknown reduction or backend.

    Example:
        >>> import torch, fastssl
        >>> p, z = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32)
        >>> loss = fastssl.negative_cosine(p, z)
        >>> bool(torch.allclose(loss, fastssl.reference.negative_cosine(p, z), atol=1e-6))
        True
    """
    _pair("p", "z", p, z)
    _validate.reduction(reduction)
    return _validate.reduce(_negative_cosine_rows(p, z, backend), reduction).to(p.dtype)


def symmetric_negative_cosine(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor,
                              z2: torch.Tensor, *, reduction: str = "mean",
                              backend: str = "auto") -> torch.Tensor:
    r"""The symmetrised BYOL / SimSiam loss: each view's prediction regresses the *other*
    view's target, ½ (nc(p1, z2) + nc(p2, z1)) with nc = :func:`negative_cosine`
    (stop-gradient on z1 and z2).

    How it relates to the papers (same minimiser, gradients a constant multiple):

    * **BYOL** sums the two directions, :math:`\mathcal L + \tilde{\mathcal L} =
      nc(p_1, z_2) + nc(p_2, z_1)`: twice this value, twice its gradient.
    * **SimSiam** uses :math:`\mathcal L = \tfrac12 D(p_1, z_2) + \tfrac12 D(p_2, z_1)` with
      D = −cos: this helper equals :math:`2 + 2\mathcal L` (in [0, 4] where SimSiam's is in
      [−1, 1]) and its gradient is twice SimSiam's. With SGD, halve the learning rate (or
      scale the loss by ½) to reproduce SimSiam's step exactly.

    Args:
        p1, p2: (N, D) predictions for views 1 and 2.
        z1, z2: (N, D) targets (projections) of views 1 and 2; they receive no gradient.
            All four: same shape, dtype and device.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the (N,) per-sample averages of the
            two directions).
        backend: as for :func:`negative_cosine`.

    Returns:
        A scalar or an (N,) tensor in the input dtype.

    Raises:
        TypeError, ValueError: as for :func:`negative_cosine`, naming the argument.

    Example:
        >>> import torch, fastssl
        >>> p1, p2 = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32, requires_grad=True)
        >>> z1, z2 = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss = fastssl.symmetric_negative_cosine(p1, p2, z1, z2)
        >>> want = (fastssl.negative_cosine(p1, z2) + fastssl.negative_cosine(p2, z1)) / 2
        >>> bool(torch.allclose(loss, want))
        True
    """
    _pair("p1", "z2", p1, z2)
    _pair("p2", "z1", p2, z1)
    _pair("p1", "p2", p1, p2)
    _validate.reduction(reduction)
    rows = (_negative_cosine_rows(p1, z2, backend) + _negative_cosine_rows(p2, z1, backend)) / 2
    return _validate.reduce(rows, reduction).to(p1.dtype)


# ---------------------------------------------------------------------------------------
# Masked-token prediction head (BERT MLM)                                       [issue 14]
# ---------------------------------------------------------------------------------------


def masked_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      bias: torch.Tensor | None = None, ignore_index: int = -100,
                      reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    r"""The masked-language-model head (BERT), fused: output projection and cross-entropy over
    the vocabulary at the masked positions, without the [positions, vocabulary] logits.

    Devlin et al., *BERT*, 2018 (https://arxiv.org/abs/1810.04805).

    .. math:: s_{iv} = h_i \cdot w_v + b_v, \qquad
              \ell_i = \log \sum_{v=1}^{V} e^{s_{iv}} - s_{i, y_i}
              \quad \text{for } y_i \ne \text{ignore\_index}

    Equal to ``F.cross_entropy(F.linear(hidden, weight, bias), labels,
    ignore_index=ignore_index)`` (flattened over positions), except that a batch whose
    positions are **all ignored gives 0 with a zero gradient** for ``reduction="mean"``
    (``F.cross_entropy`` gives NaN there, which would poison the weights through the
    optimizer; raising instead would need a host sync per step on a GPU to read the count).
    The kernels stream the vocabulary in tiles with an online log-sum-exp and keep O(rows)
    state. With ``reduction="mean"`` or ``"sum"`` and a gradient needed, the gradients are
    formed in the forward (the CPU kernel then runs three GEMMs, no recompute) and saved in
    fp32, so the backward only scales them; ``reduction="none"`` backward recomputes the
    tiles. Memory: O(rows x H + V x H) instead of
    O(rows x V) (at 4,096 positions and V = 30,522, one fp32 logits copy is 500 MB).

    Args:
        hidden: (*, H) hidden states: (B, T, H) for every position of a batch, or (P, H)
            already gathered at the masked positions. float32, bfloat16 or float16 (float64
            runs the reference). Ignored positions cost nothing on the GPU: the kernels visit
            the non-ignored rows only (found on the device, no host sync).
        weight: (V, H) output embedding (often tied to the input embedding), same dtype and
            device as ``hidden``.
        labels: (*) integer token ids, the shape of ``hidden`` without its last dim: each in
            [0, V) or equal to ``ignore_index``.
        bias: optional (V,) output bias, same dtype and device.
        ignore_index: label of the positions that are not predicted (BERT: the unmasked ones).
        reduction: ``"mean"`` over the non-ignored positions, ``"sum"``, or ``"none"`` (the
            shape of ``labels``, 0 at ignored positions).
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"cpp"``, ``"triton"`` or
            ``"reference"``; ``FASTSSL_BACKEND`` overrides ``"auto"``.

    Returns:
        A scalar (``"mean"`` / ``"sum"``) or a tensor of ``labels``' shape, in hidden's dtype.
        Gradients flow to ``hidden``, ``weight`` and ``bias``.

    Raises:
        TypeError: non-tensor inputs, non-floating hidden / weight / bias, non-integer labels,
            dtypes that differ.
        ValueError: hidden not (*, H) with H >= 1, weight not (V, H) with V >= 1, bias not
            (V,), labels not of hidden's leading shape, tensors on different devices, unknown
            reduction or backend, or (CPU tensors) a label outside [0, V) that is not
            ``ignore_index``. CUDA tensors, and compiled code, check the labels with
            ``torch._assert_async`` instead (no host sync): a RuntimeError (CPU) or a
            device-side assert (CUDA) names the problem.

    Example:
        >>> import torch, fastssl
        >>> hidden = torch.randn(2, 9, 16, requires_grad=True)
        >>> weight = torch.randn(50, 16, requires_grad=True)
        >>> labels = torch.full((2, 9), -100)
        >>> labels[0, 3], labels[1, 5] = 7, 42
        >>> loss = fastssl.masked_token_loss(hidden, weight, labels)
        >>> want = fastssl.reference.masked_token_loss(hidden, weight, labels)
        >>> bool(torch.allclose(loss, want, atol=1e-5))
        True
    """
    _validate.tensor("hidden", hidden)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must be (*, H) with H >= 1, got shape {tuple(hidden.shape)}")
    _validate.embeddings("weight", weight)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, H) with H = {hidden.shape[-1]} (hidden's last "
                         f"dim), got shape {tuple(weight.shape)}")
    _validate.same_device_dtype(("hidden", "weight"), (hidden, weight))
    if bias is not None:
        _validate.tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got shape "
                             f"{tuple(bias.shape)}")
        _validate.same_device_dtype(("hidden", "bias"), (hidden, bias))
    _validate.token_labels("labels", labels, tuple(hidden.shape[:-1]), weight.shape[0],
                           ignore_index, hidden.device)
    _validate.reduction(reduction)
    be = _dispatch.resolve(backend, hidden.device, op="masked_token_loss",
                           cpp_op="masked_token_loss_fwd")
    if be == "reference" or hidden.dtype == torch.float64:
        return reference.masked_token_loss(hidden, weight, labels, bias=bias,
                                           ignore_index=ignore_index, reduction=reduction)
    flat = labels.reshape(-1).to(torch.int64)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if reduction == "none" or not grads:
        rows = ops.masked_token_loss.masked_token_rows(hidden2d, weight, bias, flat,
                                                       ignore_index)
        if reduction == "none":
            return rows.reshape(labels.shape).to(hidden.dtype)
        total = rows.sum()
    else:
        # A scalar loss under autograd: gradients formed in the forward (no recompute).
        total = ops.masked_token_loss.masked_token_sum(hidden2d, weight, bias, flat,
                                                       ignore_index)
    if reduction == "sum":
        return total.to(hidden.dtype)
    # All ignored: 0 / 1 = 0 and a zero gradient (see above), without reading the count.
    count = (flat != ignore_index).sum().clamp(min=1)
    return (total / count).to(hidden.dtype)


# Redundancy reduction: Barlow Twins, VICReg                        [issue 14, item 2]
# ---------------------------------------------------------------------------------------

_BARLOW_NORMALIZE = ("batch", "none")


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambda_: float = 5e-3, *,
                 normalize: str = "batch", gather: bool = False,
                 backend: str = "auto") -> torch.Tensor:
    r"""The Barlow Twins loss, fused: never forms the D x D cross-correlation matrix.

    Zbontar et al., *Barlow Twins: Self-Supervised Learning via Redundancy Reduction*, 2021
    (https://arxiv.org/abs/2103.03230), with lightly's ``BarlowTwinsLoss`` conventions.
    Each feature is standardised over the batch, :math:`\tilde z = (z - \mu) / \sigma` with
    the batch mean and the **unbiased** std (no eps), then

    .. math:: C = \tilde z_1^\top \tilde z_2 / N,\qquad
              \mathcal L = \sum_i (1 - C_{ii})^2 + \lambda \sum_{i \ne j} C_{ij}^2

    The fused kernels use :math:`\|C\|_F^2 = \langle \tilde z_1 \tilde z_1^\top,
    \tilde z_2 \tilde z_2^\top\rangle_F / N^2` (N x N Grams) when N < 5D/3, else tiles of C
    that are reduced as they are computed and recomputed in the backward
    (``fastssl/ops/redundancy.py`` has the cost model).

    Args:
        z1, z2: (N, D) embeddings of the two views, N >= 2; float32, bfloat16 or float16
            (float64 runs the reference). The kernels accumulate in fp32.
        lambda_: weight of the off-diagonal (redundancy) term, finite and >= 0.
        normalize: ``"batch"`` (the standardisation above) or ``"none"`` (C = z1^T z2 / N
            on the embeddings as given).
        gather: compute the batch statistics (means, stds) and C over the global batch of all
            ranks: z1 and z2 are all-gathered with gradients (O(world N D) per rank; nothing
            D x D is communicated), and every rank returns the same global loss. Gradient
            convention as in :func:`nt_xent`: after DDP's gradient averaging one step equals
            one single-process step on the concatenated batch. No process group: plain loss.
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"cpp"``, ``"triton"`` or
            ``"reference"``.

    Returns:
        A scalar in the input dtype.

    Raises:
        TypeError: non-tensor or integer inputs, dtypes that differ, a non-number lambda_.
        ValueError: shapes that differ or are not (N, D), N < 2 (the unbiased std is
            undefined), lambda_ negative or not finite, unknown normalize or backend.

    A feature that is constant over the batch has std 0 and gives a NaN loss (as lightly's).

    Example:
        >>> import torch, fastssl
        >>> z1, z2 = torch.randn(16, 40), torch.randn(16, 40)
        >>> loss = fastssl.barlow_twins(z1, z2)
        >>> bool(torch.allclose(loss, fastssl.reference.barlow_twins(z1, z2), rtol=1e-5))
        True
    """
    if normalize not in _BARLOW_NORMALIZE:
        raise ValueError(f"normalize must be one of {_BARLOW_NORMALIZE}, got {normalize!r}")
    _validate.two_views(z1, z2, "barlow_twins", min_rows=2 if normalize == "batch" else 1)
    lam = _validate.finite_coefficient("lambda_", lambda_)
    if gather and distributed.world_size() > 1:
        z1 = distributed.gather_with_grad(z1, what="barlow_twins(gather=True)")
        z2 = distributed.gather_with_grad(z2, what="barlow_twins(gather=True)")
    be = _dispatch.resolve(backend, z1.device, op="barlow_twins", cpp_op="barlow_twins_fwd")
    if be == "reference" or z1.dtype == torch.float64:
        return reference.barlow_twins(z1, z2, lam, normalize=normalize)
    loss = ops.barlow_twins.barlow_twins_loss(z1, z2, lam, normalize == "batch")
    return loss.to(z1.dtype)


def vicreg(z1: torch.Tensor, z2: torch.Tensor, sim: float = 25.0, var: float = 25.0,
           cov: float = 1.0, *, gather: bool = False, backend: str = "auto") -> torch.Tensor:
    r"""The VICReg loss, fused: never forms the D x D covariance matrices.

    Bardes et al., *VICReg: Variance-Invariance-Covariance Regularization for
    Self-Supervised Learning*, 2022 (https://arxiv.org/abs/2105.04906), with the values of
    lightly's ``VICRegLoss`` (``lambda_param = sim``, ``mu_param = var``,
    ``nu_param = cov``, eps = 1e-4). Exactly:

    .. math:: \mathcal L = \text{sim}\cdot\frac{1}{ND}\sum_{n,d}(z_{1,nd} - z_{2,nd})^2
              + \text{var}\cdot\frac{V(z_1) + V(z_2)}{2}
              + \text{cov}\cdot\big(Q(z_1) + Q(z_2)\big)

    with, per view, :math:`v_d` the **unbiased** batch variance of feature d,
    :math:`V = \frac1D\sum_d \operatorname{relu}(1 - \sqrt{v_d + 10^{-4}})` (the variance
    term is **averaged** over the two views, as lightly does; the covariance term is summed)
    and :math:`Q = \frac1D\sum_{i \ne j} K_{ij}^2`, :math:`K = X^\top X / (N - 1)` the
    unbiased covariance of the centred view X. The kernels use
    :math:`\|K\|_F^2 = \|X X^\top\|_F^2 / (N-1)^2` (N x N Grams) when N < 5D/3, else tiles
    of K (``fastssl/ops/redundancy.py``).

    Args:
        z1, z2: (N, D) embeddings of the two views, N >= 2; float32, bfloat16 or float16
            (float64 runs the reference). The kernels accumulate in fp32.
        sim, var, cov: the weights of the invariance, variance and covariance terms, finite
            and >= 0 (the paper's and lightly's 25, 25, 1).
        gather: as lightly's ``gather_distributed``: the variance and covariance terms use the
            global batch of all ranks (z1, z2 all-gathered with gradients, O(world N D) per
            rank, nothing D x D), the invariance term this rank's rows. After DDP's gradient
            averaging one step equals one single-process step on the concatenated batch.
            No process group: the plain loss.
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"``.

    Returns:
        A scalar in the input dtype.

    Raises:
        TypeError: non-tensor or integer inputs, dtypes that differ, non-number weights.
        ValueError: shapes that differ or are not (N, D), N < 2 (the unbiased variance is
            undefined), a weight negative or not finite, unknown backend.

    Example:
        >>> import torch, fastssl
        >>> z1, z2 = torch.randn(16, 40), torch.randn(16, 40)
        >>> loss = fastssl.vicreg(z1, z2)
        >>> bool(torch.allclose(loss, fastssl.reference.vicreg(z1, z2), rtol=1e-5))
        True
    """
    _validate.two_views(z1, z2, "vicreg", min_rows=2)
    sim = _validate.finite_coefficient("sim", sim)
    var = _validate.finite_coefficient("var", var)
    cov = _validate.finite_coefficient("cov", cov)
    be = _dispatch.resolve(backend, z1.device, op="vicreg", cpp_op="vicreg_fwd")
    if gather and distributed.world_size() > 1:
        # Invariance on the local rows (a per-sample mean: DDP's averaging makes it global),
        # variance and covariance on the gathered batch.
        invariance = sim * (z1 - z2).pow(2).mean()
        z1 = distributed.gather_with_grad(z1, what="vicreg(gather=True)")
        z2 = distributed.gather_with_grad(z2, what="vicreg(gather=True)")
        sim = 0.0
    else:
        invariance = None
    if be == "reference" or z1.dtype == torch.float64:
        loss = reference.vicreg(z1, z2, sim, var, cov)
    else:
        loss = ops.vicreg.vicreg_loss(z1, z2, sim, var, cov)
    if invariance is not None:
        loss = loss + invariance.float()
    return loss.to(z1.dtype)

def _sinkhorn_shift(teacher_h, weight_teacher, teacher_scale, iters: int, gather: bool):
    """The column log-scalings c of DINOv2's Sinkhorn-Knopp teacher, as the teacher shift -c
    (its distribution is softmax(s_t t + c)): ``iters`` column passes and ``iters - 1`` row
    passes of ``dino_teacher_lse``, each one streamed pass over K (reference.py derives the
    log-domain form). Under ``gather`` the column sums run over every rank's rows."""
    t, k = teacher_h.shape[0], weight_teacher.shape[0]
    world = distributed.world_size() if gather else 1
    f32 = dict(dtype=torch.float32, device=teacher_h.device)
    zero_rows, zero_cols = torch.zeros(t, **f32), torch.zeros(k, **f32)
    a = zero_rows
    c = zero_cols
    for it in range(iters):
        _, col = torch.ops.fastssl.dino_teacher_lse(teacher_h, weight_teacher, teacher_scale,
                                                    a, zero_cols)
        if gather and world > 1:
            col = torch.logsumexp(distributed.gather_no_grad(col[None], what="dino_loss"), 0)
        c = -col - math.log(k)
        if it + 1 < iters:
            row, _ = torch.ops.fastssl.dino_teacher_lse(teacher_h, weight_teacher,
                                                        teacher_scale, zero_rows, c)
            a = -row - math.log(t * world)
    return -c


def _prototype_head(student_h, teacher_h, weight_student, weight_teacher, center, pair_weight,
                    n_global, cross_view, student_temp, teacher_temp, center_momentum, teacher,
                    sinkhorn_iters, gather):
    """The fused path of dino_loss / ibot_patch_loss: (loss in the input dtype, new centre)."""
    dev = student_h.device
    ss = _validate.scale_tensor(student_temp, dev, invert=True)
    ts = _validate.scale_tensor(teacher_temp, dev, invert=True)
    k = weight_student.shape[0]
    with torch.no_grad():
        if teacher == "sinkhorn":
            shift = _sinkhorn_shift(teacher_h, weight_teacher, ts, sinkhorn_iters, gather)
        else:
            shift = center.detach().reshape(k).to(torch.float32) * ts
    loss, _slse, _tlse, logit_sum = torch.ops.fastssl.dino_loss_fwd(
        student_h, teacher_h.detach(), weight_student, weight_teacher.detach(), shift, ss, ts,
        pair_weight, n_global, cross_view)
    with torch.no_grad():
        rows = teacher_h.shape[0]
        if gather and distributed.world_size() > 1:
            logit_sum = distributed.gather_no_grad(logit_sum[None], what="dino_loss").sum(0)
            rows *= distributed.world_size()
        batch_center = (logit_sum / rows).reshape(center.shape)
        new_center = (center * center_momentum
                      + batch_center.to(center.dtype) * (1 - center_momentum))
    return loss.to(student_h.dtype), new_center


def dino_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, weight_student: torch.Tensor,
              weight_teacher: torch.Tensor, center: torch.Tensor, *, n_global: int = 2,
              student_temp=0.1, teacher_temp=0.04, center_momentum: float = 0.9,
              teacher: str = "centering", sinkhorn_iters: int = 3, gather: bool = False,
              backend: str = "auto"):
    r"""DINO's self-distillation loss through the prototype head, streamed over the K
    prototypes (the [rows, K] logits are never stored). Returns ``(loss, new_center)``.

    Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*, 2021
    (https://arxiv.org/abs/2104.14294); the Sinkhorn-Knopp teacher of SwAV / DINOv2
    (Oquab et al. 2023, https://arxiv.org/abs/2304.07193).

    The head's last layer is fused in: with :math:`\hat h` the L2-normalised bottleneck rows
    and :math:`\hat V_k = V_k / \lVert V_k \rVert` the weight-normalised prototypes
    (``DINOHead(norm_last_layer=True)``: ``weight_norm`` with g = 1), the logits are
    :math:`\hat h \hat V^\top`. Teacher: :math:`P_t = \mathrm{softmax}((t - c) / \tau_t)`
    (``teacher="centering"``) or DINOv2's Sinkhorn-Knopp (``"sinkhorn"``: computed in the log
    domain, so it does not overflow at small temperatures; ``sinkhorn_iters`` iterations, each
    a column then a row normalisation, Q summing to 1 overall with columns to 1/K and rows to
    1/B, the rows finally scaled by B to distributions), without gradient. Student:
    :math:`\log P_s = \mathrm{log\_softmax}(s / \tau_s)`. Exactly DINO's ``DINOLoss``:

    .. math:: \mathcal L = \frac{1}{n_{global}(n_{crops} - 1)} \sum_{i < n_{global}}
              \sum_{v \ne i} \frac{1}{B} \sum_b -\sum_k P_t^{(i, b)}{}_k
              \log P_s^{(v, b)}{}_k

    and the centre's EMA: ``new_center = m * center + (1 - m) * mean`` of the teacher logits
    over its rows (over every rank's rows with ``gather=True``, as DINO's ``update_center``).
    ``center`` is not modified: assign ``new_center`` yourself, once per optimizer step (with
    gradient accumulation, pass the same centre to every micro-batch; the mean of equal
    micro-batches' new centres is the centre of the whole batch).

    Args:
        student_h: (n_crops * B, d) student bottleneck outputs, crop-major (crop c, sample b at
            row c * B + b); the first ``n_global`` crops are the global crops.
        teacher_h: (n_global * B, d) teacher bottleneck outputs of the global crops (no
            gradient flows to it).
        weight_student: (K, d) the student's last-layer weight (``weight_v``; the rows are
            normalised here). Receives a gradient through the weight-norm chain rule.
        weight_teacher: (K, d) the teacher's (no gradient). May be the same tensor.
        center: (K,) or (1, K) the teacher centre (ignored by the Sinkhorn teacher, but
            ``new_center`` is still returned).
        n_global: global crops (teacher views).
        student_temp, teacher_temp: temperatures > 0 (floats or 0-dim tensors).
        center_momentum: m in [0, 1].
        teacher: ``"centering"`` or ``"sinkhorn"``.
        sinkhorn_iters: Sinkhorn-Knopp iterations (DINOv2: 3).
        gather: centre mean (and Sinkhorn column sums) over all ranks
            (``fastssl.distributed``); the loss itself stays per rank, as in DINO.
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"`` (float64 inputs run the
            reference).

    Returns:
        ``(loss, new_center)``: a scalar in the input dtype, and a tensor like ``center``.

    Raises:
        TypeError: non-tensor or non-float inputs, mismatched dtypes.
        ValueError: shapes that do not fit (d, K, n_global * B teacher rows, n_crops * B
            student rows, fewer than two crops), temperatures <= 0, momentum outside [0, 1],
            unknown teacher or backend.

    Example:
        >>> import torch, fastssl
        >>> B, d, K = 4, 16, 100
        >>> hs = torch.randn(6 * B, d, requires_grad=True)  # 2 global + 4 local crops
        >>> ht = torch.randn(2 * B, d)
        >>> w = torch.randn(K, d, requires_grad=True)
        >>> center = torch.zeros(1, K)
        >>> loss, center_next = fastssl.dino_loss(hs, ht, w, w.detach(), center)
        >>> ref, ref_center = fastssl.reference.dino_loss(hs, ht, w, w.detach(), center)
        >>> bool(torch.allclose(loss, ref, atol=1e-5)), bool(torch.allclose(center_next, ref_center))
        (True, True)
    """
    k = _validate.prototype_head(student_h, teacher_h, weight_student, weight_teacher, center)
    b, n_crops = _validate.crops(student_h.shape[0], teacher_h.shape[0], n_global)
    _validate.teacher_kind(teacher, sinkhorn_iters)
    m = _validate.momentum(center_momentum)
    dev = student_h.device
    st = _validate.positive_scalar("student_temp", student_temp, dev)
    tt = _validate.positive_scalar("teacher_temp", teacher_temp, dev)
    be = _dispatch.resolve(backend, dev, op="dino_loss", cpp_op="dino_loss_fwd",
                           has_triton=_HAS_TRITON_DINO)
    if be == "reference" or student_h.dtype == torch.float64:
        if gather and distributed.world_size() > 1:
            raise ValueError("dino_loss: gather=True across ranks runs on the fused backends "
                             "only (float32/bfloat16/float16 inputs)")
        return reference.dino_loss(student_h, teacher_h, weight_student, weight_teacher, center,
                                   n_global=n_global, student_temp=st, teacher_temp=tt,
                                   center_momentum=m, teacher=teacher,
                                   sinkhorn_iters=sinkhorn_iters)
    n_pairs = n_global * (n_crops - 1)
    pair_weight = torch.full((teacher_h.shape[0],), 1.0 / (n_pairs * b), dtype=torch.float32,
                             device=dev)
    del k
    return _prototype_head(student_h, teacher_h, weight_student, weight_teacher, center,
                           pair_weight, n_global, True, st, tt, m, teacher, sinkhorn_iters,
                           gather)


def ibot_patch_loss(student_h: torch.Tensor, teacher_h: torch.Tensor,
                    weight_student: torch.Tensor, weight_teacher: torch.Tensor,
                    center: torch.Tensor, *, weights: torch.Tensor | None = None,
                    student_temp=0.1, teacher_temp=0.04, center_momentum: float = 0.9,
                    teacher: str = "centering", sinkhorn_iters: int = 3, gather: bool = False,
                    backend: str = "auto"):
    r"""iBOT's masked-patch loss (Zhou et al. 2022, https://arxiv.org/abs/2111.07832): the
    kernel of :func:`dino_loss` with each student row paired with the same teacher row.
    Returns ``(loss, new_center)``.

    Row r of ``student_h`` is the student's output at a masked patch, row r of ``teacher_h``
    the teacher's at the same patch (unmasked view); same head, teacher and centre as
    :func:`dino_loss` (use the patch head's own centre):

    .. math:: \mathcal L = \sum_r w_r \Big(-\sum_k P_t^{(r)}{}_k \log P_s^{(r)}{}_k\Big)

    with ``weights`` w (M,) (default 1/M: the mean over masked patches; DINOv2 passes
    1 / (masked patches of the patch's image) / images).

    Args:
        student_h, teacher_h: (M, d) masked-patch bottleneck outputs.
        weight_student, weight_teacher, center: as in :func:`dino_loss`.
        weights: (M,) non-negative per-patch weights, or None.
        other keywords: as in :func:`dino_loss`.

    Example:
        >>> import torch, fastssl
        >>> hs, ht = torch.randn(37, 24, requires_grad=True), torch.randn(37, 24)
        >>> w = torch.randn(50, 24, requires_grad=True)
        >>> loss, _ = fastssl.ibot_patch_loss(hs, ht, w, w.detach(), torch.zeros(50))
        >>> ref, _ = fastssl.reference.ibot_patch_loss(hs, ht, w, w.detach(), torch.zeros(50))
        >>> bool(torch.allclose(loss, ref, atol=1e-5))
        True
    """
    _validate.prototype_head(student_h, teacher_h, weight_student, weight_teacher, center)
    if student_h.shape[0] != teacher_h.shape[0]:
        raise ValueError(f"student_h and teacher_h must have the same masked-patch rows, got "
                         f"{tuple(student_h.shape)} and {tuple(teacher_h.shape)}")
    rows = student_h.shape[0]
    if weights is not None:
        _validate.tensor("weights", weights, ndim=1)
        if weights.shape[0] != rows or weights.device != student_h.device:
            raise ValueError(f"weights must be ({rows},) on {student_h.device}, got "
                             f"{tuple(weights.shape)} on {weights.device}")
    _validate.teacher_kind(teacher, sinkhorn_iters)
    m = _validate.momentum(center_momentum)
    dev = student_h.device
    st = _validate.positive_scalar("student_temp", student_temp, dev)
    tt = _validate.positive_scalar("teacher_temp", teacher_temp, dev)
    be = _dispatch.resolve(backend, dev, op="ibot_patch_loss", cpp_op="dino_loss_fwd",
                           has_triton=_HAS_TRITON_DINO)
    if be == "reference" or student_h.dtype == torch.float64:
        if gather and distributed.world_size() > 1:
            raise ValueError("ibot_patch_loss: gather=True across ranks runs on the fused "
                             "backends only (float32/bfloat16/float16 inputs)")
        return reference.ibot_patch_loss(student_h, teacher_h, weight_student, weight_teacher,
                                         center, weights=weights, student_temp=st,
                                         teacher_temp=tt, center_momentum=m, teacher=teacher,
                                         sinkhorn_iters=sinkhorn_iters)
    pair_weight = (torch.full((rows,), 1.0 / rows, dtype=torch.float32, device=dev)
                   if weights is None else weights.detach().to(torch.float32))
    return _prototype_head(student_h, teacher_h, weight_student, weight_teacher, center,
                           pair_weight, 1, False, st, tt, m, teacher, sinkhorn_iters, gather)


_HAS_TRITON_DINO = True  # fastssl/ops/dino_loss.py registers Triton launchers for its ops

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
