"""Pure-PyTorch ground truth for every fastssl op.

These functions are the specification: tests compare every fused kernel against them,
benchmarks time them (eager and under ``torch.compile``), and ``backend="reference"`` runs
them. They favour clarity over memory: most materialise the full N x N logits.

Sections are per op, in the order of ``fastssl/__init__.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------
# NT-Xent (SimCLR) and its decoupled variant (DCL)
# ---------------------------------------------------------------------------------------


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature=0.1, *, normalize: bool = True,
            reduction: str = "mean", decoupled: bool = False) -> torch.Tensor:
    """NT-Xent loss of SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709).

    Z = [z1; z2] (2N x D), L2-normalised when ``normalize``; S = Z Z^T / temperature with the
    diagonal masked; row i's positive is t(i) = (i + N) mod 2N;
    loss_i = logsumexp_{j != i} S_ij - S_i,t(i). With ``decoupled`` (DCL, Yeh et al. 2021,
    https://arxiv.org/abs/2110.06848) the positive is also removed from the logsumexp.

    Args:
        z1, z2: (N, D) embeddings of the two views.
        temperature: float or 0-dim tensor (> 0).
        reduction: "mean" over the 2N rows, "sum", or "none" (the (2N,) vector).
    """
    z = torch.cat([z1, z2], dim=0)
    if normalize:
        z = F.normalize(z, dim=1)
    m = z.shape[0]
    n = m // 2
    logits = (z @ z.T) / temperature
    rows = torch.arange(m, device=z.device)
    target = (rows + n) % m
    mask = torch.eye(m, dtype=torch.bool, device=z.device)
    positive = logits[rows, target]
    if decoupled:
        mask = mask.clone()
        mask[rows, target] = True
    logits = logits.masked_fill(mask, float("-inf"))
    loss = torch.logsumexp(logits, dim=1) - positive
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# ---------------------------------------------------------------------------------------
# InfoNCE (MoCo), CLIP, SupCon                                      [issue: contrastive family]
# ---------------------------------------------------------------------------------------


def info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None = None,
             temperature=0.07, *, normalize: bool = True,
             reduction: str = "mean") -> torch.Tensor:
    """InfoNCE of MoCo (He et al. 2020, https://arxiv.org/abs/1911.05722).

    With a queue (K x D, MoCo v1/v2): logits_i = [q_i . k_i, q_i . queue^T] / temperature,
    target 0 (the own key); the queue gets no gradient. Without (MoCo v3, one direction of
    CLIP): logits = q k^T / temperature, target i (the other keys are the negatives).
    ``normalize`` L2-normalises query, key and queue.

    Args:
        query, key: (N, D). queue: (K, D) or None. reduction: "mean", "sum" or "none" (N,).
    """
    if normalize:
        query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    n = query.shape[0]
    if queue is None:
        logits = query @ key.T / temperature
        target = torch.arange(n, device=query.device)
    else:
        queue = queue.detach()
        if normalize:
            queue = F.normalize(queue, dim=1)
        pos = (query * key).sum(dim=1, keepdim=True)
        logits = torch.cat([pos, query @ queue.T], dim=1) / temperature
        target = torch.zeros(n, dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, target, reduction=reduction)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale, *, logit_bias=None,
              normalize: bool = True) -> torch.Tensor:
    """Symmetric CLIP loss (Radford et al. 2021, https://arxiv.org/abs/2103.00020).

    logits = logit_scale * image text^T (rows L2-normalised when ``normalize``);
    loss = (CE(logits, arange) + CE(logits^T, arange)) / 2. ``logit_scale`` is the multiplier
    (CLIP's ``logit_scale.exp()``). ``logit_bias`` (SigLIP) is not supported: an additive
    bias cancels in the softmax loss, and SigLIP's sigmoid loss is another op.

    Args:
        image, text: (B, D). logit_scale: float or 0-dim tensor > 0.
    """
    if logit_bias is not None:
        raise NotImplementedError("clip_loss: logit_bias (SigLIP's sigmoid loss) is not "
                                  "supported; in the softmax CLIP loss a bias cancels")
    if normalize:
        image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    logits = logit_scale * (image @ text.T)
    target = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def supcon(features: torch.Tensor, labels: torch.Tensor, temperature=0.1, *,
           normalize: bool = True) -> torch.Tensor:
    """Supervised contrastive loss, L_out (Khosla et al. 2020, https://arxiv.org/abs/2004.11362).

    S = z z^T / temperature with the diagonal masked; the positives of anchor i are the other
    samples with its label; loss_i = -mean_{p in P(i)} log softmax_{j != i}(S_i)_p. The loss is
    the mean over anchors with at least one positive (0 when there is none).

    Args:
        features: (N, D). labels: (N,) integers.
    """
    if normalize:
        features = F.normalize(features, dim=1)
    n = features.shape[0]
    logits = features @ features.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    npos = pos.sum(dim=1)
    mean_pos = log_prob.masked_fill(~pos, 0.0).sum(dim=1) / npos.clamp(min=1)
    valid = npos > 0
    return -(mean_pos * valid).sum() / valid.sum().clamp(min=1)


def rows_vs_columns(q: torch.Tensor, c: torch.Tensor, scale, target: torch.Tensor,
                    self_idx: torch.Tensor, *, normalize: bool = True,
                    mask_target: bool = False) -> torch.Tensor:
    """Per-row cross-entropy of rows q (M, D) against columns c (Nc, D), the engine of the
    ``gather=True`` losses: S = scale * q c^T, column self_idx[i] (-1: none) and, with
    ``mask_target``, target[i] masked; loss_i = logsumexp_j S_ij - S_i,target[i]. (M,)."""
    if normalize:
        q, c = F.normalize(q, dim=1), F.normalize(c, dim=1)
    logits = scale * (q @ c.T)
    rows = torch.arange(q.shape[0], device=q.device)
    positive = logits[rows, target]
    mask = torch.zeros_like(logits, dtype=torch.bool)
    has_self = self_idx >= 0
    mask[rows[has_self], self_idx[has_self]] = True
    if mask_target:
        mask[rows, target] = True
    return torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=1) - positive




# ---------------------------------------------------------------------------------------
# MoCo machinery: EMA update and key queue                          [issue: MoCo machinery]
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update_(target, online, momentum: float) -> None:
    """EMA (momentum) update, one tensor at a time (the Python loop of MoCo / BYOL code):
    ``t <- lerp(t, o, 1 - momentum)`` = momentum * t + (1 - momentum) * o for every pair, in
    place. Equal to ``torch._foreach_lerp_(target, online, 1 - momentum)``.

    (Official MoCo writes ``p_k.data = p_k.data * m + p_q.data * (1. - m)``: the same value up
    to rounding; lerp is exact at m = 0 and m = 1.)

    Args:
        target: sequence of tensors updated in place.
        online: sequence of tensors of the same shapes; a lower-precision online dtype is
            widened to the target's first (exact).
        momentum: m in [0, 1].
    """
    w = 1.0 - momentum
    for t, o in zip(target, online):
        t.lerp_(o.to(t.dtype), w)


@torch.no_grad()
def moco_enqueue_(buffer: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Ring-buffer enqueue with the pointer kept on the device (no host sync, so it works in
    ``torch.compile(fullgraph=True)``): key i goes to slot (ptr + i) mod size; with
    B > size only the newest ``size`` keys remain; then ptr <- (ptr + B) mod size.

    Args:
        buffer: (size, dim) queue, written in place.
        ptr: 0-dim int64 write pointer in [0, size), on ``buffer``'s device, updated in place.
        keys: (B, dim) keys, stored as given (cast to the buffer's dtype).
    """
    size, batch = buffer.shape[0], keys.shape[0]
    first = max(batch - size, 0)
    rows = torch.arange(first, batch, device=buffer.device)
    slots = (ptr + rows) % size
    buffer.index_copy_(0, slots, keys[first:].to(buffer.dtype))
    ptr.copy_((ptr + batch) % size)


@torch.no_grad()
def moco_enqueue_official_(buffer: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """The official MoCo enqueue (``moco/builder.py: _dequeue_and_enqueue``) in index-
    assignment style: the pointer is read back to the host (``int(ptr)``: a device sync,
    and a graph break under ``torch.compile``) and the keys are written with slice
    assignments. Official MoCo asserts ``size % B == 0``; this version wraps around in two
    slices instead, with the same result as :func:`moco_enqueue_`.
    """
    size, batch = buffer.shape[0], keys.shape[0]
    p = int(ptr)
    if batch >= size:  # only the newest `size` keys survive, the last one ends at p + B - 1
        keys = keys[batch - size:]
        p = (p + batch - size) % size
    n = keys.shape[0]
    head = min(n, size - p)
    buffer[p:p + head] = keys[:head]
    if head < n:
        buffer[:n - head] = keys[head:]
    ptr.fill_((int(ptr) + batch) % size)



# ---------------------------------------------------------------------------------------
# SSL augmentation                                                  [issue: augmentation]
# ---------------------------------------------------------------------------------------
