"""The only module of fastssl that talks to ``torch.distributed``.

Contrastive losses with ``gather=True`` score each rank's local rows against the columns of
*all* ranks (global negatives); the MoCo queue enqueues the keys of all ranks. Both need an
all_gather; the losses need one that carries gradients back to the rank that owns each slice.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def _check_equal_rows(t: torch.Tensor, what: str) -> None:
    """Raises ValueError unless every rank passes the same number of rows (same trailing
    shape is required by all_gather anyway)."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device))
    counts = [int(s.item()) for s in sizes]
    if len(set(counts)) != 1:
        raise ValueError(f"{what}: every rank must pass the same batch size to gather=True, "
                         f"got {counts} rows per rank")


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the gradient of its own slice, summed
    over ranks (each rank's loss reads every rank's slice)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world_size())]
        dist.all_gather(parts, t.contiguous())
        ctx.rows = t.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        r = rank()
        return grad[r * ctx.rows:(r + 1) * ctx.rows]


def gather_with_grad(t: torch.Tensor, *, what: str = "gather") -> torch.Tensor:
    """Concatenates ``t`` (B, ...) from all ranks along dim 0 -> (world * B, ...), in rank order,
    with gradients flowing back to every rank's own slice. Identity without a process group.

    Gradient convention: the gradient a rank receives for its slice is the **sum** over all
    ranks' losses. DDP then averages parameter gradients over ranks, so a per-rank loss that is
    the mean over the global batch gives, after DDP, exactly the gradient of the single-process
    loss on the concatenated batch.
    """
    if world_size() == 1:
        return t
    _check_equal_rows(t, what)
    return _AllGatherWithGrad.apply(t)


@torch.no_grad()
def gather_no_grad(t: torch.Tensor, *, what: str = "gather") -> torch.Tensor:
    """Concatenates ``t`` from all ranks along dim 0 (rank order), without gradient."""
    if world_size() == 1:
        return t
    _check_equal_rows(t, what)
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)
