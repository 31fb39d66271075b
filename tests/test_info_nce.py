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


def _core_truth(q, c, alpha, g, h, mask_diag):
    """fp64 (or low-precision) row LSE of alpha q c^T and alpha P c with both P terms."""
    s = alpha * (q @ c.T)
    if mask_diag:
        eye = torch.eye(q.shape[0], c.shape[0], dtype=torch.bool)
        s = s.masked_fill(eye, float("-inf"))
    lse, clse = torch.logsumexp(s, 1), torch.logsumexp(s, 0)
    p = g[:, None] * torch.exp(s - lse[:, None]) + h[None, :] * torch.exp(s - clse[None, :])
    return lse, clse, alpha * (p @ c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,nc,d,mask_diag", [(5, 300, 20, False), (40, 45, 9, True)])
def test_core_column_split(m, nc, d, mask_diag, dtype):
    """The contrastive core's column-split grid (few row blocks vs many columns, the MoCo
    shape in small): per-split partial (max, sum) / partial dQ merged in split order, vs
    fp64 truth; deterministic. Under the interpreter num_sms is small, so these shapes split."""
    triton = pytest.importorskip("triton")  # noqa: F841
    from fastssl.ops import _triton_utils, contrastive_core as core
    sms = _triton_utils.num_sms(torch.device("cpu"))
    for kernel in ("lse", "grad"):
        cfg = core.plan(m, nc, kernel, dtype, sms)
        assert cfg["row_blocks"] < sms and cfg["splits"] > 1, cfg
        # every split non-empty, all column tiles covered
        tiles = -(-nc // cfg["BLOCK_N"])
        assert (cfg["splits"] - 1) * cfg["tiles_per_split"] < tiles
        assert cfg["splits"] * cfg["tiles_per_split"] >= tiles
    alpha = 2.5
    q64 = torch.nn.functional.normalize(torch.randn(m, d, dtype=torch.float64), dim=1)
    c64 = torch.nn.functional.normalize(torch.randn(nc, d, dtype=torch.float64), dim=1)
    if mask_diag:
        c64[:m] = q64[: min(m, nc)]
    q, c = q64.to(dtype), c64.to(dtype)
    g = torch.rand(m, dtype=torch.float64)
    h = torch.rand(nc, dtype=torch.float64)
    truth = _core_truth(q.double(), c.double(), alpha, g, h, mask_diag)
    lowp = _core_truth(q, c, alpha, g.to(dtype), h.to(dtype), mask_diag)
    lse = core.row_lse(q, c, alpha, mask_diag=mask_diag)
    clse = core.row_lse(c, q, alpha, mask_diag=mask_diag)
    assert_close_to_truth("core lse", lse, truth[0], lowp[0], dtype)
    assert_close_to_truth("core column lse", clse, truth[1], lowp[1], dtype)
    grad = core.softmax_grad(q, c, alpha, g.float(), truth[0].float(), h.float(),
                             truth[1].float(), mask_diag=mask_diag)
    assert_close_to_truth("core softmax_grad", grad, truth[2], lowp[2], dtype)
    again = core.softmax_grad(q, c, alpha, g.float(), truth[0].float(), h.float(),
                              truth[1].float(), mask_diag=mask_diag)
    assert torch.equal(grad, again) and torch.equal(lse, core.row_lse(q, c, alpha,
                                                                      mask_diag=mask_diag))


def test_core_grid_plan_on_gpus():
    """Grids the launchers pick on real GPUs: the MoCo shape fills an H100 / A100 with column
    splits; a large CLIP batch needs none."""
    from fastssl.ops import contrastive_core as core
    for dtype in DTYPES:
        for kernel in ("lse", "grad"):
            for sms in (132, 108):
                moco = core.plan(256, 65536, kernel, dtype, sms, interpret=False)
                assert moco["row_blocks"] == 4
                assert sms - moco["row_blocks"] <= moco["row_blocks"] * moco["splits"] <= sms + 4
            clip = core.plan(16384, 16384, kernel, dtype, 132, interpret=False)
            assert (clip["row_blocks"], clip["splits"]) == (256, 1)
