"""Every op on CUDA tensors against the reference on the same device (fwd + every gradient vs an
fp64 truth, tolerance from plain PyTorch's own error in the dtype: tests/helpers.py).

Skipped without a GPU. ``scripts/gpu_check.sh`` runs it on the first GPU machine. To check
this file itself on a CPU-only machine, ``FASTSSL_CUDA_TESTS_ON_CPU=1`` runs the same cases
on CPU tensors with the Triton kernels under the interpreter (small shapes only).
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import fastssl
from fastssl import _dispatch, reference
from helpers import assert_close_to_truth

ON_CPU = os.environ.get("FASTSSL_CUDA_TESTS_ON_CPU") == "1"
if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif ON_CPU:
    DEVICE = torch.device("cpu")
else:
    pytest.skip("no CUDA device (FASTSSL_CUDA_TESTS_ON_CPU=1 runs these on the interpreter)",
                allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Widths: odd, > 256 (the D loop), and CLIP's 512..1024; N includes 1 and odd sizes.
SHAPES = [(1, 3), (3, 200), (37, 64), (257, 520), (130, 1030)]
if ON_CPU:
    SHAPES = [(1, 3), (3, 200), (9, 520), (5, 1030)]


def _ctx():
    return _dispatch.triton_on_cpu() if DEVICE.type == "cpu" else contextlib.nullcontext()


def _check(name, fused, tensors, dtype, ref=None):
    """fused(*xs) on DEVICE in ``dtype`` vs the reference in fp64 (truth) and in ``dtype``
    (plain PyTorch's error), loss and every gradient."""
    ref = ref or fused

    def leaves(dt):
        out = []
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                out.append(t.detach().to(dtype).to(device=DEVICE, dtype=dt)
                           .requires_grad_(t.requires_grad))
            elif isinstance(t, torch.Tensor):
                out.append(t.to(DEVICE))
            else:
                out.append(t)
        return out

    runs = {}
    for key, fn, dt in (("fused", fused, dtype), ("truth", ref, torch.float64),
                        ("lowp", ref, dtype)):
        xs = leaves(dt)
        with _ctx() if key == "fused" else contextlib.nullcontext():
            loss = fn(*xs, "auto" if key == "fused" else "reference")
            wrt = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
            grads = torch.autograd.grad(loss, wrt) if wrt else []
        runs[key] = (loss, grads)
    assert torch.isfinite(runs["fused"][0]).all(), f"{name}: non-finite loss"
    assert_close_to_truth(f"{name} loss", runs["fused"][0], runs["truth"][0], runs["lowp"][0],
                          dtype)
    for i, (gf, gt, gl) in enumerate(zip(runs["fused"][1], runs["truth"][1], runs["lowp"][1])):
        assert torch.isfinite(gf).all(), f"{name}: non-finite grad[{i}]"
        assert_close_to_truth(f"{name} grad[{i}]", gf, gt, gl, dtype)


def _emb(n, d, requires_grad=True):
    return torch.randn(n, d, dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("tau", [0.1, 0.01])
def test_nt_xent(n, d, dtype, tau):
    z1 = _emb(n, d)
    z2 = (z1.detach() + 0.5 * torch.randn(n, d, dtype=torch.float64)).requires_grad_()
    t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    _check("nt_xent", lambda a, b, t, be: fastssl.nt_xent(a, b, t, backend=be), [z1, z2, t],
           dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("queue", [True, False], ids=["queue", "in_batch"])
def test_info_nce(n, d, dtype, queue):
    q, k = _emb(n, d), _emb(n, d)
    u = torch.randn(3 * n + 5, d, dtype=torch.float64) if queue else None
    t = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    _check("info_nce", lambda a, b, uu, t, be: fastssl.info_nce(a, b, uu, t, backend=be),
           [q, k, u, t], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
def test_clip_loss(n, d, dtype):
    i, t = _emb(n, d), _emb(n, d)
    s = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    _check("clip_loss", lambda a, b, s, be: fastssl.clip_loss(a, b, s, backend=be), [i, t, s],
           dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_clip_confident_pairs(dtype):
    """The precision case of the GPU-parity issue: B = 37, D = 64, logit scale 30,
    text = image + 1.5 noise; the diagonal's -1 must be folded before the down-cast."""
    i = _emb(37, 64)
    t = (i.detach() + 1.5 * torch.randn(37, 64, dtype=torch.float64)).requires_grad_()
    s = torch.tensor(30.0, dtype=torch.float64)
    _check("clip_loss[confident]", lambda a, b, s, be: fastssl.clip_loss(a, b, s, backend=be),
           [i, t, s], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 5), (9, 200), (40, 520)])
def test_supcon_singletons_at_small_tau(n, d, dtype):
    """A class with one member (no positive) at tau = 0.01: finite, excluded anchors."""
    z = _emb(n, d)
    y = torch.arange(n) % max(1, n // 3)
    y[0] = 10_000  # a singleton
    t = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    _check("supcon", lambda a, yy, t, be: fastssl.supcon(a, yy, t, backend=be), [z, y, t],
           dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_target", [False, True])
def test_gather_engine(dtype, mask_target):
    """The xent op (every gather=True loss): arbitrary global targets and self-masks."""
    from fastssl.ops import xent
    m, nc, d = 13, 40, 520
    q, c = _emb(m, d), _emb(nc, d)
    s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, nc, (m,))
    self_idx = torch.where(torch.rand(m) < 0.5, (target + 1) % nc, torch.full((m,), -1))

    def fn(q_, c_, s_, tg, si, be):
        if be == "reference":
            return reference.rows_vs_columns(q_, c_, s_, tg, si, mask_target=mask_target).sum()
        return xent.xent_rows(q_, c_, s_.float(), tg, si, True, mask_target).sum()

    _check("xent", fn, [q, c, s, target, self_idx], dtype)


@pytest.mark.parametrize("name", ["ema", "queue", "augment"])
def test_moco_and_augment_on_device(name):
    if name == "ema":
        t = [torch.randn(33, 7, device=DEVICE), torch.randn(5, device=DEVICE)]
        o = [torch.randn_like(x) for x in t]
        want = [torch.lerp(a, b, 0.25) for a, b in zip(t, o)]
        fastssl.ema_update_(t, o, 0.75)
        for a, b in zip(t, want):
            torch.testing.assert_close(a, b)
    elif name == "queue":
        q = fastssl.MoCoQueue(6, 10).to(DEVICE)
        keys = torch.randn(7, 6, device=DEVICE)
        q.enqueue(keys)
        q.enqueue(keys)
        torch.testing.assert_close(q.buffer[:4], keys[3:])
        assert int(q.ptr) == 4
    else:
        imgs = torch.randint(0, 256, (3, 3, 40, 36), dtype=torch.uint8)
        aug = fastssl.SSLAugment(out_size=24, generator=torch.Generator().manual_seed(1))
        params = aug.sample(imgs)[0]
        with _ctx():
            got = fastssl.augment.apply(imgs.to(DEVICE), params, 24)
        want = fastssl.augment.apply(imgs, params, 24, backend="reference")
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
