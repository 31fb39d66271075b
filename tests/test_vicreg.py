"""fastssl.vicreg vs an fp64 truth (covariance materialised: fine in a test), on both paths of
the fused kernels (Gram and tiled covariance) and the cost model's choice, C++ and Triton
(interpreter); lightly's VICRegLoss values; bad input. (gather=True on two gloo ranks: in
tests/test_barlow_twins.py, one spawn for both losses.)"""
import contextlib

import pytest
import torch

import fastssl
from fastssl import _ext, reference
from fastssl.ops import redundancy
from family_helpers import DTYPES, compare
from helpers import kernels

needs_cpp = pytest.mark.skipif(not _ext.available(), reason=f"no _C: {_ext.why_unavailable()}")
PATHS = ["gram", "tiled", "auto"]
SHAPES = [(2, 3), (3, 1), (3, 200), (257, 3), (40, 520), (257, 520)]


def _path(name):
    return contextlib.nullcontext() if name == "auto" else redundancy.force_path(name)


def _truth(z1, z2, sim=25.0, var=25.0, cov=1.0, eps=1e-4):
    """The formula written out in fp64 (sums, not torch.var/F.mse_loss)."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    total = sim * ((z1 - z2) ** 2).sum() / (n * d)
    for z in (z1, z2):
        x = z - z.sum(0) / n
        k = torch.einsum("nd,ne->de", x, x) / (n - 1)
        v = torch.diagonal(k)
        total = total + var / 2 * torch.relu(1 - torch.sqrt(v + eps)).sum() / d
        total = total + cov * ((k ** 2).sum() - (v ** 2).sum()) / d
    return total


def _views(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    # Feature scales on both sides of 1, so some features are inside the hinge and some out.
    z1 = base * torch.linspace(0.3, 2, d, dtype=torch.float64) + 1
    z2 = 0.7 * base + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return z1.requires_grad_(), z2.requires_grad_()


def test_reference_is_the_formula():
    z1, z2 = _views(9, 13)
    for w in ((25.0, 25.0, 1.0), (1.0, 0.0, 3.0), (0.0, 2.0, 0.0)):
        torch.testing.assert_close(reference.vicreg(z1, z2, *w), _truth(z1, z2, *w),
                                   rtol=1e-12, atol=1e-12)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_cpp_forward_backward(n, d, path, dtype):
    z1, z2 = _views(n, d)
    with _path(path):
        compare("vicreg[cpp]", lambda a, b: fastssl.vicreg(a, b, backend="cpp"),
                lambda a, b: _truth(a, b) if a.dtype == torch.float64 else reference.vicreg(a, b),
                [z1, z2], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["gram", "tiled"])
@pytest.mark.parametrize("n,d", [(2, 3), (3, 1), (37, 70)])
def test_triton_interpreter(n, d, path, dtype):
    z1, z2 = _views(n, d)
    with kernels("triton"), _path(path):
        compare("vicreg[triton]", lambda a, b: fastssl.vicreg(a, b, backend="triton"),
                lambda a, b: _truth(a, b) if a.dtype == torch.float64 else reference.vicreg(a, b),
                [z1, z2], dtype)


@needs_cpp
@pytest.mark.parametrize("path", ["gram", "tiled"])
def test_cpp_equals_triton_equals_reference(path):
    z1, z2 = (t.detach().float() for t in _views(29, 67, seed=3))
    out = {}
    for be in ("cpp", "triton", "reference"):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        with kernels(be), _path(path):
            loss = fastssl.vicreg(a, b, 3.0, 5.0, 2.0, backend=be)
            loss.backward()
        out[be] = (loss.detach(), a.grad, b.grad)
    for be in ("triton", "reference"):
        for x, y in zip(out["cpp"], out[be]):
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5 * y.abs().max().item())


def test_lightly_values():
    """lightly's VICRegLoss, written out here in plain torch (not imported): F.mse_loss, the
    variance term averaged over the two views (0.5 * (v_a + v_b)), eps = 1e-4 inside the
    sqrt of the unbiased variance, the covariance term summed over the views."""
    def variance(x, eps=1e-4):
        x = x - x.mean(dim=0)
        return torch.relu(1.0 - torch.sqrt(x.var(dim=0) + eps)).mean()

    def covariance(x):
        x = x - x.mean(dim=0)
        n, d = x.shape
        c = torch.einsum("bc,bd->cd", x, x) / (n - 1)
        return c[~torch.eye(d, dtype=torch.bool)].pow(2).sum(-1) / d

    def lightly_vicreg(za, zb, lam=25.0, mu=25.0, nu=1.0):
        inv = torch.nn.functional.mse_loss(za, zb)
        var = 0.5 * (variance(za) + variance(zb))
        return lam * inv + mu * var + nu * (covariance(za) + covariance(zb))

    z1, z2 = _views(33, 50, seed=5)
    for be in (["cpp"] if _ext.available() else []) + ["reference"]:
        a, b = z1.detach().float().requires_grad_(), z2.detach().float().requires_grad_()
        la, lb = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
        ours = fastssl.vicreg(a, b, backend=be)
        theirs = lightly_vicreg(la, lb)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(ours.double(), theirs.detach(), rtol=1e-5, atol=0)
        for g, h in ((a.grad, la.grad), (b.grad, lb.grad)):
            torch.testing.assert_close(g.double(), h, rtol=0, atol=1e-5 * h.abs().max().item())


@needs_cpp
def test_opcheck_both_paths():
    z1, z2 = (t.detach().float().requires_grad_() for t in _views(7, 11))
    for path in (redundancy.PATH_GRAM, redundancy.PATH_TILED):
        torch.library.opcheck(torch.ops.fastssl.vicreg_fwd,
                              (z1, z2, 25.0, 25.0, 1.0, 1e-4, path))


@needs_cpp
def test_torch_compile_fullgraph():
    z1, z2 = (t.detach().float().requires_grad_() for t in _views(12, 30))
    fn = torch.compile(lambda a, b: fastssl.vicreg(a, b), fullgraph=True)
    loss = fn(z1, z2)
    loss.backward()
    want = _truth(z1.detach(), z2.detach())
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


@needs_cpp
def test_double_backward_raises():
    z1, z2 = (t.detach().float().requires_grad_() for t in _views(6, 9))
    g = torch.autograd.grad(fastssl.vicreg(z1, z2), z1, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((g * g).sum(), z1)


def test_meta_tensors_through_the_fake():
    z1 = torch.empty(10, 300, device="meta", requires_grad=True)
    loss = fastssl.vicreg(z1, torch.empty(10, 300, device="meta"))
    assert loss.shape == () and loss.device.type == "meta"


def test_bad_inputs():
    z = torch.randn(6, 8)
    with pytest.raises(ValueError, match="N >= 2"):
        fastssl.vicreg(z[:1], z[:1])
    with pytest.raises(ValueError, match="same shape"):
        fastssl.vicreg(z, z[:, :7])
    with pytest.raises(TypeError, match="same dtype"):
        fastssl.vicreg(z, z.half())
    with pytest.raises(ValueError, match="2-D"):
        fastssl.vicreg(z[0], z[0])
    for name in ("sim", "var", "cov"):
        for bad in (float("nan"), float("inf"), -1.0):
            with pytest.raises(ValueError, match=name):
                fastssl.vicreg(z, z, **{name: bad})
        with pytest.raises(TypeError, match=name):
            fastssl.vicreg(z, z, **{name: "25"})
    with pytest.raises(ValueError, match="backend"):
        fastssl.vicreg(z, z, backend="gpu")


def test_gather_without_process_group_is_the_plain_loss():
    z1, z2 = torch.randn(6, 9), torch.randn(6, 9)
    torch.testing.assert_close(fastssl.vicreg(z1, z2, gather=True), reference.vicreg(z1, z2),
                               rtol=1e-5, atol=1e-5)


def test_modules():
    z1, z2 = torch.randn(10, 7), torch.randn(10, 7)
    torch.testing.assert_close(fastssl.VICRegLoss(1.0, 2.0, 3.0)(z1, z2),
                               reference.vicreg(z1, z2, 1.0, 2.0, 3.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fastssl.BarlowTwinsLoss(0.1)(z1, z2),
                               reference.barlow_twins(z1, z2, 0.1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lambda_"):
        fastssl.BarlowTwinsLoss(float("nan"))
    with pytest.raises(ValueError, match="cov"):
        fastssl.VICRegLoss(cov=-1.0)
