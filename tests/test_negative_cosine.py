"""fastssl.negative_cosine / symmetric_negative_cosine (BYOL, SimSiam) vs fp64 truths.

Both kernels (C++ and Triton under the interpreter) per row and per gradient, at odd shapes,
in every dtype, with plain PyTorch's own error in that dtype as the tolerance (tests/helpers.py).
"""
import pytest
import torch

import fastssl
from fastssl import _ext, reference
from helpers import assert_close_to_truth, kernels

needs_cpp = pytest.mark.skipif(not _ext.available(), reason=f"no _C: {_ext.why_unavailable()}")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check(backend, p64, z64, dtype, name="negative_cosine"):
    """Per-row losses and dp under a random grad_out: fused vs fp64 truth (on the same
    dtype-rounded inputs), tolerance from the reference run in ``dtype``."""
    p_in, z_in = p64.to(dtype), z64.to(dtype)
    g = torch.rand(p64.shape[0], dtype=torch.float64) + 0.5
    runs = {}
    for key, dt, fn in (("fused", dtype, lambda p, z: fastssl.negative_cosine(
                            p, z, reduction="none", backend=backend)),
                        ("truth", torch.float64, lambda p, z: reference.negative_cosine(
                            p, z, reduction="none")),
                        ("lowp", dtype, lambda p, z: reference.negative_cosine(
                            p, z, reduction="none"))):
        p = p_in.to(dt).detach().clone().requires_grad_()
        # stop-gradient: z must stay without a gradient
        z = z_in.to(dt).detach().clone().requires_grad_()
        loss = fn(p, z)
        (loss * g.to(dt)).sum().backward()
        assert z.grad is None, f"{key}: z received a gradient"
        runs[key] = (loss.detach(), p.grad)
    assert runs["fused"][0].dtype == dtype and runs["fused"][1].dtype == dtype
    assert_close_to_truth(f"{name} loss", runs["fused"][0], runs["truth"][0], runs["lowp"][0],
                          dtype)
    assert_close_to_truth(f"{name} dp", runs["fused"][1], runs["truth"][1], runs["lowp"][1],
                          dtype)
    return runs["fused"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 3), (3, 200), (257, 300), (5, 1030)])
def test_rows_and_gradient_vs_fp64(n, d, dtype, backend):
    p = torch.randn(n, d, dtype=torch.float64)
    # Targets correlated with the predictions: cos near 1 as late in BYOL training, where
    # 2 - 2 cos loses precision if formed carelessly.
    z = p + 0.05 * torch.randn(n, d, dtype=torch.float64)
    _check(backend, p, z, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_and_clamped_rows(backend):
    """Rows at 1e30 (their squared norm overflows fp32), rows of 1e-30 (norm below eps: the
    clamped branch, dp = -2 g zhat / eps), an all-zero row and D = 1."""
    p = torch.randn(6, 37, dtype=torch.float64)
    z = torch.randn(6, 37, dtype=torch.float64)
    p[0] *= 1e30
    z[1] *= 1e30
    p[2] *= 1e-30
    z[3] *= 1e-30
    p[4] = 0.0
    _check(backend, p, z, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_width_one(backend):
    # D = 1: cos = sign(p z), so the loss is 0 or 4 and dp is 0 up to rounding (a relative
    # comparison with an all-zero truth would measure rounding noise).
    p = torch.tensor([[2.0], [-3.0], [0.5], [-1e30]], requires_grad=True)
    z = torch.tensor([[1.0], [4.0], [-7.0], [-2.0]])
    loss = fastssl.negative_cosine(p, z, reduction="none", backend=backend)
    loss.sum().backward()
    torch.testing.assert_close(loss, torch.tensor([0.0, 4.0, 4.0, 0.0]))
    assert p.grad.abs().max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_give_nan_only_there(backend):
    p, z = torch.randn(4, 9), torch.randn(4, 9)
    p[1, 3] = float("nan")
    z[2, 0] = float("inf")
    p.requires_grad_()
    loss = fastssl.negative_cosine(p, z, reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isfinite(loss[[0, 3]]).all()
    assert torch.isfinite(p.grad[[0, 3]]).all()
    assert torch.isnan(p.grad[1]).all() and torch.isnan(p.grad[2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree(backend):
    p, z = torch.randn(33, 130), torch.randn(33, 130)
    out = fastssl.negative_cosine(p, z, reduction="none", backend=backend)
    torch.testing.assert_close(out, reference.negative_cosine(p, z, reduction="none"),
                               rtol=1e-5, atol=1e-6)


def test_hand_checked():
    p = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    z = torch.tensor([[0.0, 2.0], [6.0, 8.0], [-1.0, -1.0]])
    torch.testing.assert_close(fastssl.negative_cosine(p, z, reduction="none"),
                               torch.tensor([2.0, 0.0, 4.0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_symmetric(backend, reduction):
    p1, p2, z1, z2 = (torch.randn(5, 19, dtype=torch.float64) for _ in range(4))
    fused = [t.float().requires_grad_() for t in (p1, p2, z1, z2)]
    truth = [t.clone().requires_grad_() for t in (p1, p2, z1, z2)]
    out = fastssl.symmetric_negative_cosine(*fused, reduction=reduction, backend=backend)
    want = reference.symmetric_negative_cosine(*truth, reduction=reduction)
    g = torch.rand_like(want)
    (out * g.float()).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(fused[:2], truth[:2]):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-6)
    assert fused[2].grad is None and fused[3].grad is None
    # BYOL's loss is the sum of the two directions: twice this one.
    byol = fastssl.negative_cosine(fused[0], fused[3], reduction=reduction) + \
        fastssl.negative_cosine(fused[1], fused[2], reduction=reduction)
    torch.testing.assert_close(byol, 2 * out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    with kernels(backend):
        torch.library.opcheck(torch.ops.fastssl.negative_cosine_fwd,
                              (torch.randn(5, 7, requires_grad=True), torch.randn(5, 7)))
        torch.library.opcheck(torch.ops.fastssl.negative_cosine_bwd,
                              (torch.rand(5), torch.randn(5, 7), torch.randn(5, 7)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    p1, p2, z1, z2 = (torch.randn(6, 11) for _ in range(4))
    a = [t.clone().requires_grad_() for t in (p1, p2)]
    b = [t.clone().requires_grad_() for t in (p1, p2)]
    fn = lambda x, y: fastssl.symmetric_negative_cosine(x, y, z1, z2, backend=backend)  # noqa
    eager = fn(*a)
    eager.backward()
    compiled = torch.compile(fn, fullgraph=True)(*b)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend):
    p = torch.randn(4, 6, requires_grad=True)
    loss = fastssl.negative_cosine(p, torch.randn(4, 6), backend=backend)
    (g,) = torch.autograd.grad(loss, p, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((g * g).sum(), p)


@needs_cpp
def test_thread_count_does_not_change_bits():
    p, z = torch.randn(301, 257).requires_grad_(), torch.randn(301, 257)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            q = p.detach().clone().requires_grad_()
            loss = fastssl.negative_cosine(q, z, reduction="none", backend="cpp")
            loss.sum().backward()
            outs.append((loss.detach(), q.grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_float64_runs_the_reference_and_meta_gives_shapes():
    p, z = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    assert fastssl.negative_cosine(p, z).dtype == torch.float64
    m = torch.randn(4, 8, device="meta")
    assert fastssl.negative_cosine(m, m, reduction="none").shape == (4,)
    assert fastssl.symmetric_negative_cosine(m, m, m, m).shape == ()


def test_bad_inputs():
    p, z = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"same shape.*\(4, 8\) and \(4, 7\)"):
        fastssl.negative_cosine(p, z[:, :7])
    with pytest.raises(ValueError, match="2-D"):
        fastssl.negative_cosine(p[0], z[0])
    with pytest.raises(ValueError, match="N >= 1"):
        fastssl.negative_cosine(p[:0], z[:0])
    with pytest.raises(TypeError, match="same dtype"):
        fastssl.negative_cosine(p, z.half())
    with pytest.raises(TypeError, match="floating-point"):
        fastssl.negative_cosine(p.long(), z.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        fastssl.negative_cosine(p.tolist(), z)
    with pytest.raises(ValueError, match="reduction"):
        fastssl.negative_cosine(p, z, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        fastssl.negative_cosine(p, z, backend="cuda-ish")
    with pytest.raises(ValueError, match="p2 and z1"):
        fastssl.symmetric_negative_cosine(p, p, z[:3], z)


@needs_cpp
def test_cpp_kernel_rejects_float64():
    # fastssl.negative_cosine sends float64 to the reference; the op itself refuses it rather
    # than round it to fp32.
    p = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.fastssl.negative_cosine_fwd(p, p)
