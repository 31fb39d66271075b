"""NT-Xent: the fused C++ kernel against the reference and an fp64 truth, plus the API contract
(validation, backends, autograd, torch.compile, opcheck, NaN handling)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import fastssl
from fastssl import _dispatch, _ext, reference
from helpers import assert_close_to_truth

# Only the tests that run the C++ kernel skip without the extension; the API contract
# (validation, NaN handling, the missing-extension fallback, docstrings) runs everywhere.
needs_cpp = pytest.mark.skipif(not _ext.has_op("ntxent_fwd"),
                               reason=f"C++ extension missing: {_ext.why_unavailable()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(n, d, dtype, normalize, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 if normalize else d ** -0.5  # keep un-normalised logits O(1/tau)
    z1 = (torch.randn(n, d, generator=g) * scale).to(dtype)
    z2 = (torch.randn(n, d, generator=g) * scale).to(dtype)
    return z1, z2


def _run(fn, z1, z2, temp, grad_out, **kw):
    """Loss and gradients (z1, z2, temperature) of fn on fresh leaves."""
    a = z1.detach().clone().requires_grad_()
    b = z2.detach().clone().requires_grad_()
    t = temp.detach().clone().requires_grad_()
    loss = fn(a, b, t, **kw)
    loss.backward(grad_out.to(loss.dtype) if loss.dim() else None)
    return loss.detach(), a.grad, b.grad, t.grad


def _check(n, d, dtype, normalize, reduction, temperature=0.1, decoupled=False):
    z1, z2 = _inputs(n, d, dtype, normalize)
    temp = torch.tensor(temperature, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.rand(2 * n, generator=g) + 0.5
    kw = dict(normalize=normalize, reduction=reduction, decoupled=decoupled)
    truth = _run(reference.nt_xent, z1.double(), z2.double(), temp.double(), grad_out.double(),
                 **kw)
    plain = _run(reference.nt_xent, z1, z2, temp.to(dtype), grad_out, **kw)
    fused = _run(lambda *a, **k: fastssl.nt_xent(*a, **k, backend="cpp"), z1, z2, temp,
                 grad_out, **kw)
    assert fused[0].dtype == dtype and fused[1].dtype == dtype and fused[2].dtype == dtype
    for name, f, t, p in zip(("loss", "dz1", "dz2", "dtemperature"), fused, truth, plain):
        assert_close_to_truth(f"{name} N={n} D={d}", f, t, p, dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [3, 64, 128, 200])
@pytest.mark.parametrize("n", [1, 3, 257, 1024])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_matches_truth(n, d, dtype, normalize):
    _check(n, d, dtype, normalize, "none")


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,d", [(3, 5), (257, 72)])
def test_reductions(n, d, dtype, reduction):
    _check(n, d, dtype, True, reduction)


@needs_cpp
@pytest.mark.parametrize("temperature", [0.01, 0.07, 1.0, 5.0])
def test_temperatures_including_tiny(temperature):
    # tau = 0.01 spans logits of +-100: a fixed-max shortcut would underflow here.
    _check(300, 40, torch.float32, True, "mean", temperature=temperature)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 3, 300])
def test_decoupled(n, dtype):
    _check(n, 24, dtype, True, "none", decoupled=True)


def test_single_pair_loss_is_zero():
    # N = 1: each row's only column is its positive, so loss = LSE of one logit - that logit.
    loss = fastssl.nt_xent(torch.randn(1, 7), torch.randn(1, 7), 0.3, reduction="none")
    assert torch.equal(loss, torch.zeros(2))


def test_numpy_pseudocode():
    """SimCLR's algorithm box, written out in NumPy for a 3-pair batch."""
    rng = np.random.default_rng(0)
    z1, z2 = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    tau, n = 0.2, 3
    sim = z @ z.T / tau

    def ell(i, j):
        others = [k for k in range(2 * n) if k != i]
        return -np.log(np.exp(sim[i, j]) / np.exp(sim[i, others]).sum())

    want = sum(ell(k, k + n) + ell(k + n, k) for k in range(n)) / (2 * n)
    got = fastssl.nt_xent(torch.tensor(z1, dtype=torch.float32),
                          torch.tensor(z2, dtype=torch.float32), tau)
    assert abs(got.item() - want) < 1e-5


@needs_cpp
def test_non_contiguous_inputs():
    base1, base2 = torch.randn(64, 90), torch.randn(90, 64)
    z1, z2 = base1[:, ::2], base2.t()[:, :45]  # strided views, both (64, 45)
    assert not z1.is_contiguous() and not z2.is_contiguous()
    _a, g1, g2, _ = _run(lambda *a, **k: fastssl.nt_xent(*a, **k, backend="cpp"), z1, z2,
                         torch.tensor(0.2), torch.ones(128), reduction="none")
    _b, r1, r2, _ = _run(reference.nt_xent, z1, z2, torch.tensor(0.2), torch.ones(128),
                         reduction="none")
    torch.testing.assert_close(_a, _b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, r1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g2, r2, rtol=1e-4, atol=1e-6)


def test_float_temperature_and_module():
    z1, z2 = torch.randn(10, 16), torch.randn(10, 16)
    crit = fastssl.NTXentLoss(temperature=0.5)
    torch.testing.assert_close(crit(z1, z2), reference.nt_xent(z1, z2, 0.5))
    assert "temperature=0.5" in repr(crit)


def test_learnable_temperature_in_module():
    tau = torch.nn.Parameter(torch.tensor(0.2))
    crit = fastssl.NTXentLoss(temperature=tau)
    z1, z2 = torch.randn(9, 12), torch.randn(9, 12)
    crit(z1, z2).backward()
    t2 = torch.tensor(0.2, requires_grad=True)
    reference.nt_xent(z1, z2, t2).backward()
    torch.testing.assert_close(tau.grad, t2.grad, rtol=1e-4, atol=1e-6)


def test_deterministic():
    z1, z2 = torch.randn(700, 33), torch.randn(700, 33)
    a = _run(fastssl.nt_xent, z1, z2, torch.tensor(0.1), torch.ones(1))
    b = _run(fastssl.nt_xent, z1, z2, torch.tensor(0.1), torch.ones(1))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan(bad):
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    z2[3, 2] = bad
    loss, g1, g2, _ = _run(fastssl.nt_xent, z1, z2, torch.tensor(0.1), torch.ones(1))
    assert torch.isnan(loss)
    assert torch.isnan(g1).all() and torch.isnan(g2).all()
    assert torch.isnan(reference.nt_xent(z1, z2, 0.1))  # the spec agrees


@needs_cpp
def test_opcheck():
    z1 = torch.randn(5, 11, requires_grad=True)
    z2 = torch.randn(5, 11, requires_grad=True)
    t = torch.tensor(0.3, requires_grad=True)
    for normalize, decoupled in [(True, False), (False, True)]:
        torch.library.opcheck(torch.ops.fastssl.ntxent_fwd.default,
                              (z1, z2, t, normalize, decoupled))


@needs_cpp
def test_torch_compile_fullgraph():
    z1 = torch.randn(33, 20, requires_grad=True)
    z2 = torch.randn(33, 20, requires_grad=True)
    f = torch.compile(lambda a, b: fastssl.nt_xent(a, b, 0.2, backend="cpp"), fullgraph=True)
    loss = f(z1, z2)
    loss.backward()
    r1, r2 = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    ref = reference.nt_xent(r1, r2, 0.2)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(z1.grad, r1.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- backends


@needs_cpp
def test_backends_agree_and_env_override(monkeypatch):
    z1, z2 = torch.randn(20, 9), torch.randn(20, 9)
    a = fastssl.nt_xent(z1, z2, backend="cpp")
    b = fastssl.nt_xent(z1, z2, backend="reference")
    torch.testing.assert_close(a, b)
    monkeypatch.setenv("FASTSSL_BACKEND", "reference")
    assert _dispatch.resolve("auto", z1.device, op="x", cpp_op="ntxent_fwd") == "reference"
    monkeypatch.setenv("FASTSSL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTSSL_BACKEND"):
        fastssl.nt_xent(z1, z2)


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _dispatch.resolve("triton", torch.device("cpu"), op="nt_xent", cpp_op="ntxent_fwd")


def test_missing_extension_warns_once_then_reference(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_error", "simulated: not built")
    monkeypatch.setattr(_dispatch, "_warned", set())
    z1, z2 = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.warns(RuntimeWarning, match="simulated: not built"):
        out = fastssl.nt_xent(z1, z2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastssl.nt_xent(z1, z2)  # only once
    torch.testing.assert_close(out, reference.nt_xent(z1, z2, 0.1))
    with pytest.raises(RuntimeError, match="simulated: not built"):
        fastssl.nt_xent(z1, z2, backend="cpp")


# ----------------------------------------------------------------------------- bad input

GOOD = torch.randn(4, 8)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((GOOD, torch.randn(4, 9)), {}, ValueError, r"same shape, got \(4, 8\) and \(4, 9\)"),
    ((GOOD, torch.randn(5, 8)), {}, ValueError, "same shape"),
    ((torch.randn(4), torch.randn(4)), {}, ValueError, "must be 2-D"),
    ((torch.randn(2, 4, 8), torch.randn(2, 4, 8)), {}, ValueError, "must be 2-D"),
    ((torch.randn(0, 8), torch.randn(0, 8)), {}, ValueError, "N >= 1"),
    ((torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, "D >= 1"),
    ((torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.int64)), {}, TypeError,
     "floating-point"),
    ((GOOD, GOOD.double()), {}, TypeError, "same dtype"),
    ((GOOD, GOOD.to("meta")), {}, ValueError, "same device"),
    ((GOOD.numpy(), GOOD), {}, TypeError, "torch.Tensor"),
    ((GOOD, GOOD, 0.0), {}, ValueError, "temperature must be > 0"),
    ((GOOD, GOOD, -0.1), {}, ValueError, "temperature must be > 0"),
    ((GOOD, GOOD, float("nan")), {}, ValueError, "finite"),
    ((GOOD, GOOD, float("inf")), {}, ValueError, "finite"),
    ((GOOD, GOOD, torch.tensor(0.0)), {}, ValueError, "temperature must be > 0"),
    ((GOOD, GOOD, torch.tensor([0.1, 0.2])), {}, ValueError, "exactly one element"),
    ((GOOD, GOOD, "0.1"), {}, TypeError, "temperature must be a float"),
    ((GOOD, GOOD), {"reduction": "avg"}, ValueError, "reduction must be one of"),
    ((GOOD, GOOD), {"backend": "gpu"}, ValueError, "backend must be one of"),
    ((GOOD[:1], GOOD[:1]), {"decoupled": True}, ValueError, "N >= 2"),
])
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastssl.nt_xent(*args, **kwargs)


def test_cpp_backend_rejects_other_devices():
    z = torch.randn(4, 8, device="meta")
    with pytest.raises(ValueError, match="backend='cpp' runs on CPU"):
        fastssl.nt_xent(z, z, backend="cpp")


def test_docstring_examples_run():
    import doctest
    import fastssl.functional
    import fastssl.losses
    for mod in (fastssl.functional, fastssl.losses):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.failed == 0 and res.attempted > 0
