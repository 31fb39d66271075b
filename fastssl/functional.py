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
