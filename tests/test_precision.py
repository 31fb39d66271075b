"""Precision of the Triton kernels where rounding bites: confident pairs and tau = 0.01 in fp16 and
bf16, checked GPU-faithfully under the interpreter (dot operands rounded to the input dtype with
round-to-nearest-even, ``fastssl/ops/_triton_utils``).

The bar (GPU-parity issue): Triton's gradient error within 3x the C++ kernel's on the same
inputs, and never worse than plain PyTorch's own error in that dtype; no NaN. The issue's cases
(confident pairs among unrelated negatives) meet both. On *clustered* embeddings at tau <= 0.05
the rounding of the normalised rows to 16 bits (the tensor-core operands; the C++ kernels keep
them in fp32) dominates: there the Triton kernels are held to plain PyTorch's error only, and
are ~10x the C++ kernels' error -- a known gap (see test_clustered_*).
"""
from __future__ import annotations

import pytest
import torch

import fastssl
from fastssl import _ext, reference
from helpers import ULP, kernels, rel_err

pytestmark = pytest.mark.skipif(not _ext.available(), reason="compares with the C++ kernels")


def _grads(fn, xs, dtype, backend):
    leaves = [x.detach().to(dtype).requires_grad_(x.requires_grad) if x.is_floating_point()
              else x for x in xs]
    with kernels(backend):
        loss = fn(*leaves, be=backend)
        wrt = [x for x in leaves if x.requires_grad]
        return [loss.detach()] + list(torch.autograd.grad(loss, wrt))


def _check(name, fn, xs, dtype, *, cpp_bar=True):
    xs_lowp = [x.detach().to(dtype).double() if x.is_floating_point() else x for x in xs]
    truth = _grads(fn, [x.requires_grad_(y.requires_grad) if x.is_floating_point() else x
                        for x, y in zip(xs_lowp, xs)], torch.float64, "reference")
    lowp = _grads(fn, xs, dtype, "reference")
    cpp = _grads(fn, xs, dtype, "cpp")
    tri = _grads(fn, xs, dtype, "triton")
    for i, t in enumerate(truth[1:]):
        assert t.abs().max() > 1e-6, f"{name}: truth gradient {i} vanishes: an uninformative case"
    for i, (t, l, c, g) in enumerate(zip(truth, lowp, cpp, tri)):
        assert torch.isfinite(g).all(), f"{name}[{i}]: Triton gives non-finite values"
        e_tri, e_cpp, e_torch = rel_err(g, t), rel_err(c, t), rel_err(l, t)
        floor = ULP[dtype]
        assert not cpp_bar or e_tri <= 3 * max(e_cpp, floor), (
            f"{name}[{i}] {dtype}: Triton {e_tri:.2e} vs C++ {e_cpp:.2e} (bar 3x)")
        assert e_tri <= max(e_torch, floor), (
            f"{name}[{i}] {dtype}: Triton {e_tri:.2e} worse than plain PyTorch {e_torch:.2e}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_clip_confident_pairs(dtype):
    """B = 37, D = 64, logit scale 30, text = image + 1.5 noise (the issue's case: Triton
    6.9e-3 vs C++ 3.7e-4 on fp16 before the fix)."""
    image = torch.randn(37, 64, dtype=torch.float64)
    text = image + 1.5 * torch.randn(37, 64, dtype=torch.float64)
    _check("clip", lambda i, t, be: fastssl.clip_loss(i, t, 30.0, backend=be),
           [image.requires_grad_(), text.requires_grad_()], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("queue", [False, True], ids=["in_batch", "queue"])
def test_info_nce_confident_pairs(dtype, queue):
    """The issue's InfoNCE case: B = 37, D = 64, key = query + 1.5 noise (Triton dq 1.5e-1 vs
    C++ 1.2e-3 in fp16 before the fix), temperature 1/30."""
    q = torch.randn(37, 64, dtype=torch.float64)
    k = q + 1.5 * torch.randn(37, 64, dtype=torch.float64)
    xs = [q.requires_grad_(), k.requires_grad_()]
    if queue:  # a float input without gradient: cast to the test dtype with the others
        xs.append(torch.randn(50, 64, dtype=torch.float64))
    _check("info_nce", lambda a, b, *u, be: fastssl.info_nce(a, b, *(u or [None]), 1 / 30,
                                                             backend=be), xs, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("queue", [False, True], ids=["in_batch", "queue"])
def test_clustered_info_nce(dtype, queue):
    """Clustered rows at tau = 0.05: Triton no worse than plain PyTorch (not 3x C++: see the
    module docstring)."""
    base = torch.randn(1, 64, dtype=torch.float64)
    q = base + 0.1 * torch.randn(37, 64, dtype=torch.float64)
    k = q + 0.03 * torch.randn(37, 64, dtype=torch.float64)
    xs = [q.requires_grad_(), k.requires_grad_()]
    if queue:
        xs.append(base + 0.1 * torch.randn(50, 64, dtype=torch.float64))
    _check("info_nce", lambda a, b, *u, be: fastssl.info_nce(a, b, *(u or [None]), 0.05,
                                                             backend=be), xs, dtype,
           cpp_bar=False)


def _clustered(n, d, spread=0.1):
    """Rows near one common direction: at tau = 0.01 the logits then differ by O(1), so the
    softmax is not saturated and the gradients are informative (unrelated rows would put every
    negative ~exp(-80) below the positive: vanishing gradients that test nothing)."""
    base = torch.randn(1, d, dtype=torch.float64)
    return base + spread * torch.randn(n, d, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_nt_xent_tau_001(dtype):
    z1 = torch.randn(33, 40, dtype=torch.float64)
    z2 = z1 + 1.5 * torch.randn(33, 40, dtype=torch.float64)
    _check("nt_xent", lambda a, b, be: fastssl.nt_xent(a, b, 0.01, backend=be),
           [z1.requires_grad_(), z2.requires_grad_()], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_clustered_nt_xent_tau_001(dtype):
    z1 = _clustered(33, 40)
    z2 = z1 + 0.03 * torch.randn(33, 40, dtype=torch.float64)
    _check("nt_xent", lambda a, b, be: fastssl.nt_xent(a, b, 0.01, backend=be),
           [z1.requires_grad_(), z2.requires_grad_()], dtype, cpp_bar=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_supcon_singleton_class_tau_001(dtype):
    """A class with one member at tau = 0.01 (lse of an excluded anchor): finite gradients
    (Triton gave NaN before)."""
    z = torch.randn(11, 24, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 4])  # class 3: a single member
    _check("supcon", lambda a, be: fastssl.supcon(a, y, 0.01, backend=be),
           [z.requires_grad_()], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("clustered", [False, True], ids=["pairs", "clustered"])
def test_gather_engine_tau_001(dtype, clustered):
    """The xent op (every gather=True loss) at scale 100."""
    from fastssl.ops import xent
    if clustered:
        q = _clustered(21, 48)
        c = torch.cat([q + 0.03 * torch.randn_like(q), _clustered(30, 48)])
    else:
        q = torch.randn(21, 48, dtype=torch.float64)
        c = torch.cat([q + 1.5 * torch.randn_like(q), torch.randn(30, 48, dtype=torch.float64)])
    target = torch.arange(21)
    self_idx = torch.full((21,), -1)

    def fn(a, b, be):
        if be == "reference":
            return reference.rows_vs_columns(a, b, 100.0, target, self_idx).mean()
        return xent.xent_rows(a, b, torch.tensor(100.0), target, self_idx, True).mean()

    _check("xent", fn, [q.requires_grad_(), c.requires_grad_()], dtype, cpp_bar=not clustered)
