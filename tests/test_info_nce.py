"""fastssl.info_nce (MoCo InfoNCE, with a queue or in-batch) vs fastssl.reference.info_nce."""
import pytest
import torch

import fastssl
from fastssl import reference
from family_helpers import DTYPES, compare
from helpers import kernels, assert_close_to_truth

SHAPES = [(1, 5, 7), (3, 33, 300), (257, 20, 513)]  # (N, D, K): odd on purpose


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("with_queue", [True, False], ids=["queue", "in_batch"])
def test_forward_backward(n, d, k, dtype, with_queue):
    q = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    key = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    queue = torch.randn(k, d, dtype=torch.float64) if with_queue else None
    temp = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    compare("info_nce",
            lambda a, b, u, t: fastssl.info_nce(a, b, u, t, backend="cpp"),
            lambda a, b, u, t: reference.info_nce(a, b, u, t),
            [q, key, queue, temp], dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("normalize", [True, False])
def test_reduction_normalize(reduction, normalize):
    q, key, queue = torch.randn(5, 12), torch.randn(5, 12), torch.randn(40, 12)
    for u in (queue, None):
        out = fastssl.info_nce(q, key, u, 0.5, normalize=normalize, reduction=reduction)
        ref = reference.info_nce(q, key, u, 0.5, normalize=normalize, reduction=reduction)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_queue_gets_no_gradient_and_key_grad_optional():
    q = torch.randn(4, 8, requires_grad=True)
    key = torch.randn(4, 8)  # MoCo: from the momentum encoder, no grad
    queue = torch.randn(16, 8, requires_grad=True)
    fastssl.info_nce(q, key, queue).backward()
    assert queue.grad is None and q.grad is not None


def test_non_contiguous_and_nan():
    q = torch.randn(12, 6).T  # (6, 12) non-contiguous
    key, queue = torch.randn(6, 12), torch.randn(30, 12)
    torch.testing.assert_close(fastssl.info_nce(q, key, queue), reference.info_nce(q, key, queue),
                               rtol=1e-5, atol=1e-5)
    key[2, 3] = float("nan")
    assert torch.isnan(fastssl.info_nce(q, key, queue))


def test_opcheck():
    q, key, queue = torch.randn(5, 9), torch.randn(5, 9), torch.randn(20, 9)
    s = torch.tensor(5.0)
    torch.library.opcheck(torch.ops.fastssl.info_nce_queue_fwd,
                          (q.requires_grad_(), key, queue, s, True))
    t, si = torch.arange(5), torch.full((5,), -1)
    torch.library.opcheck(torch.ops.fastssl.xent_fwd, (q, key.requires_grad_(), s, t, si, True,
                                                       False))


def test_bad_inputs():
    q, key = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="same shape"):
        fastssl.info_nce(q, torch.randn(5, 8))
    with pytest.raises(ValueError, match="D = 8"):
        fastssl.info_nce(q, key, torch.randn(10, 7))
    with pytest.raises(TypeError, match="same dtype"):
        fastssl.info_nce(q, key, torch.randn(10, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="same dtype"):
        fastssl.info_nce(q, key.half())
    with pytest.raises(ValueError, match="temperature"):
        fastssl.info_nce(q, key, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        fastssl.info_nce(q, key, temperature=float("nan"))
    with pytest.raises(TypeError):
        fastssl.info_nce(q.long(), key.long())
    with pytest.raises(ValueError, match="2-D"):
        fastssl.info_nce(q[0], key[0])
    with pytest.raises(ValueError, match="reduction"):
        fastssl.info_nce(q, key, reduction="avg")
    with pytest.raises(ValueError, match="gather"):
        fastssl.info_nce(q, key, torch.randn(10, 8), gather=True)
    with pytest.raises(ValueError, match="device"):
        fastssl.info_nce(q, key.to("meta"))


def test_module():
    crit = fastssl.InfoNCELoss(temperature=0.3)
    q, key, queue = torch.randn(6, 10), torch.randn(6, 10), torch.randn(50, 10)
    torch.testing.assert_close(crit(q, key, queue), reference.info_nce(q, key, queue, 0.3),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,k", [(1, 5, 7), (37, 20, 70)])
@pytest.mark.parametrize("with_queue", [True, False], ids=["queue", "in_batch"])
def test_triton_interpreter(n, d, k, dtype, with_queue):
    q = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    key = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    queue = torch.randn(k, d, dtype=torch.float64) if with_queue else None
    temp = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    with kernels("triton"):
        compare("info_nce[triton]",
                lambda a, b, u, t: fastssl.info_nce(a, b, u, t, backend="triton"),
                lambda a, b, u, t: reference.info_nce(a, b, u, t),
                [q, key, queue, temp], dtype)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("mask_target", [False, True])
@pytest.mark.parametrize("m,nc,d", [(1, 3, 5), (7, 300, 9), (257, 260, 20)])
def test_rows_vs_columns_engine(m, nc, d, mask_target, backend):
    """The xent op, engine of every gather=True loss (local rows vs gathered columns, targets
    and self-masks in global column indices), on its C++ and its Triton kernel, vs
    reference.rows_vs_columns, fp32 vs fp64."""
    from fastssl.ops import xent
    q = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    c = torch.randn(nc, d, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, nc, (m,))
    self_idx = torch.where(torch.rand(m) < 0.5, (target + 1) % nc, torch.full((m,), -1))
    w = torch.randn(m, dtype=torch.float64)
    want = reference.rows_vs_columns(q, c, scale, target, self_idx, mask_target=mask_target)
    gw = torch.autograd.grad((want * w).sum(), [q, c, scale])
    qf, cf = q.detach().float().requires_grad_(), c.detach().float().requires_grad_()
    sf = scale.detach().float().requires_grad_()
    with kernels(backend):
        got = xent.xent_rows(qf, cf, sf, target, self_idx, True, mask_target)
        gg = torch.autograd.grad((got * w.float()).sum(), [qf, cf, sf])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for a, b in zip(gg, gw):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 1e-4


