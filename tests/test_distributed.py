"""gather=True (global negatives across ranks) on 2 gloo processes on this CPU.

The contract (fastssl.distributed, nt_xent's docstring): one DDP SGD step with the fused loss
and gather=True equals one single-process step on the concatenated global batch. Checked for
nt_xent (plain and decoupled), clip_loss and info_nce's in-batch mode, plus the clear error on
ranks with unequal batch sizes. The single-process step runs the reference backend, and each
rank's gathered loss is checked against an fp64 formula of its rows vs the whole batch, so the
gathered-columns engine is compared with other code, never with itself. (A 1-rank group would
not help: with world size 1, gather=True takes the plain path by design.) One spawn of two
processes runs all of it (~10 s).
"""
import copy
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastssl
from helpers import spawn_or_fail

B, D_IN, D = 6, 10, 7  # local batch per rank, input and embedding dims (odd on purpose)
WORLD = 2
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses():
    # (a, b, gather, backend) -> loss. The single-process baseline runs backend="reference"
    # (plain PyTorch on the whole batch), the DDP side the default backend with gather=True
    # (the gathered-columns engine): two different code paths.
    return {
        "nt_xent": lambda a, b, g, be: fastssl.nt_xent(a, b, 0.3, gather=g, backend=be),
        "nt_xent_decoupled": lambda a, b, g, be: fastssl.nt_xent(a, b, 0.3, gather=g,
                                                                 decoupled=True, backend=be),
        "clip_loss": lambda a, b, g, be: fastssl.clip_loss(a, b, 7.0, gather=g, backend=be),
        "info_nce": lambda a, b, g, be: fastssl.info_nce(a, b, None, 0.2, gather=g,
                                                         backend=be),
    }


def _local_rows_truth(name, z1, z2, rank):
    """fp64 plain-PyTorch loss of this rank's rows against the whole batch (z1, z2: all
    ranks' embeddings, rank-major) -- what gather=True returns on that rank."""
    z1, z2 = z1.double(), z2.double()
    mine = torch.arange(rank * B, (rank + 1) * B)
    if name.startswith("nt_xent"):
        rows = fastssl.reference.nt_xent(z1, z2, 0.3, reduction="none",
                                         decoupled=name.endswith("decoupled"))
        return torch.cat([rows[mine], rows[WORLD * B + mine]]).mean()
    n1, n2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    if name == "info_nce":
        logits = n1 @ n2.T / 0.2
        return torch.nn.functional.cross_entropy(logits[mine], mine)
    logits = 7.0 * n1 @ n2.T  # clip_loss
    return (torch.nn.functional.cross_entropy(logits[mine], mine)
            + torch.nn.functional.cross_entropy(logits.T[mine], mine)) / 2


def _one_step(model, x1, x2, loss_fn, gather, backend="auto"):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    h = model(torch.cat([x1, x2]))  # one forward: DDP expects one per backward
    z1, z2 = h.chunk(2)
    loss = loss_fn(z1, z2, gather, backend)
    loss.backward()
    opt.step()
    return loss.detach()


def _worker(rank: int, port: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        for name, loss_fn in _losses().items():
            torch.manual_seed(0)  # same global data and initial model on every rank
            x1, x2 = torch.randn(WORLD * B, D_IN), torch.randn(WORLD * B, D_IN)
            base = torch.nn.Linear(D_IN, D)
            single = copy.deepcopy(base)
            with torch.no_grad():
                h = base(torch.cat([x1, x2]))
                truth = _local_rows_truth(name, *h.chunk(2), rank)
            _one_step(single, x1, x2, loss_fn, gather=False, backend="reference")
            ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
            mine = slice(rank * B, (rank + 1) * B)
            local = _one_step(ddp, x1[mine], x2[mine], loss_fn, gather=True)
            err = abs(local.double() - truth).item() / abs(truth).item()
            assert err <= RTOL, f"{name}, rank {rank}: gathered loss off by {err:.3g}"
            for (pname, p_ddp), p_one in zip(ddp.module.named_parameters(),
                                             single.parameters()):
                moved = (p_one - base.state_dict()[pname]).abs().max()
                assert moved > 1e-4, f"{name}: the step did not move {pname}"
                err = ((p_ddp - p_one).abs().max() / p_one.abs().max()).item()
                assert err <= RTOL, f"{name}, rank {rank}: {pname} differs by {err:.3g}"
        # Unequal batch sizes: a clear error on every rank (before any kernel runs).
        z = torch.randn(B + rank, D)
        with pytest.raises(ValueError, match="same batch size"):
            fastssl.nt_xent(z, z.clone(), gather=True)
    finally:
        dist.destroy_process_group()
    # Success: leave without the interpreter's teardown, where a rank was seen to hang after
    # its peer had exited (gloo threads at exit), leaving the parent waiting. Failures above
    # propagate normally (torch.multiprocessing reports them to the parent).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_gather_equals_single_process_step():
    spawn_or_fail(_worker, (_free_port(),), WORLD)


def test_gather_without_process_group_is_the_plain_loss():
    # Against plain PyTorch (backend="reference"), not against gather=False of the same
    # backend: that would compare one code path with itself.
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    assert not (dist.is_available() and dist.is_initialized())
    torch.testing.assert_close(fastssl.nt_xent(z1, z2, gather=True),
                               fastssl.reference.nt_xent(z1, z2, 0.1))
    torch.testing.assert_close(fastssl.clip_loss(z1, z2, 3.0, gather=True),
                               fastssl.reference.clip_loss(z1, z2, 3.0))
    torch.testing.assert_close(fastssl.info_nce(z1, z2, None, 0.2, gather=True),
                               fastssl.reference.info_nce(z1, z2, None, 0.2))
