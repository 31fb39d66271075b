"""fastssl.barlow_twins vs an fp64 truth (the D x D formula, materialised: fine in a test), on
both paths of the fused kernels (Gram and tiled C) and the cost model's choice, C++ and Triton
(interpreter); lightly's conventions; bad input; gather=True on two gloo ranks."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist

import fastssl
from fastssl import _ext, reference
from fastssl.ops import redundancy
from family_helpers import DTYPES, compare
from helpers import kernels, spawn_or_fail

needs_cpp = pytest.mark.skipif(not _ext.available(), reason=f"no _C: {_ext.why_unavailable()}")
PATHS = ["gram", "tiled", "auto"]
SHAPES = [(2, 3), (3, 1), (3, 200), (257, 3), (40, 520), (257, 520)]


def _path(name):
    import contextlib
    return contextlib.nullcontext() if name == "auto" else redundancy.force_path(name)


def _truth(z1, z2, lam=5e-3, normalize="batch"):
    """The formula written out in fp64 with the D x D matrix (independent of reference.py's
    masked form: diagonal and off-diagonal from the full sum)."""
    z1, z2 = z1.double(), z2.double()
    n = z1.shape[0]
    if normalize == "batch":
        z1 = (z1 - z1.mean(0)) / torch.sqrt(((z1 - z1.mean(0)) ** 2).sum(0) / (n - 1))
        z2 = (z2 - z2.mean(0)) / torch.sqrt(((z2 - z2.mean(0)) ** 2).sum(0) / (n - 1))
    c = torch.einsum("nd,ne->de", z1, z2) / n
    diag = torch.diagonal(c)
    return ((1 - diag) ** 2).sum() + lam * ((c ** 2).sum() - (diag ** 2).sum())


def _views(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    # Correlated views with per-feature scales and offsets, like a projector's output.
    z1 = base * torch.linspace(0.5, 3, d, dtype=torch.float64) + 2
    z2 = 0.8 * base + 0.6 * torch.randn(n, d, generator=g, dtype=torch.float64) - 1
    return z1.requires_grad_(), z2.requires_grad_()


def test_reference_is_the_formula():
    z1, z2 = _views(9, 13)
    for lam in (5e-3, 0.7):
        for norm in ("batch", "none"):
            torch.testing.assert_close(reference.barlow_twins(z1, z2, lam, normalize=norm),
                                       _truth(z1, z2, lam, norm), rtol=1e-12, atol=1e-12)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_cpp_forward_backward(n, d, path, dtype):
    z1, z2 = _views(n, d)
    with _path(path):
        compare("barlow_twins[cpp]", lambda a, b: fastssl.barlow_twins(a, b, backend="cpp"),
                lambda a, b: _truth(a, b) if a.dtype == torch.float64
                else reference.barlow_twins(a, b), [z1, z2], dtype)


@needs_cpp
@pytest.mark.parametrize("path", ["gram", "tiled"])
def test_cpp_normalize_none_and_lambda(path):
    z1, z2 = _views(37, 45)
    with _path(path):
        compare("barlow_twins[none]",
                lambda a, b: fastssl.barlow_twins(a, b, 0.3, normalize="none", backend="cpp"),
                lambda a, b: _truth(a, b, 0.3, "none") if a.dtype == torch.float64
                else reference.barlow_twins(a, b, 0.3, normalize="none"),
                [z1, z2], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["gram", "tiled"])
@pytest.mark.parametrize("n,d", [(2, 3), (3, 1), (37, 70)])
def test_triton_interpreter(n, d, path, dtype):
    z1, z2 = _views(n, d)
    with kernels("triton"), _path(path):
        compare("barlow_twins[triton]",
                lambda a, b: fastssl.barlow_twins(a, b, backend="triton"),
                lambda a, b: _truth(a, b) if a.dtype == torch.float64
                else reference.barlow_twins(a, b), [z1, z2], dtype)


@needs_cpp
@pytest.mark.parametrize("path", ["gram", "tiled"])
def test_cpp_equals_triton_equals_reference(path):
    z1, z2 = (t.detach().float() for t in _views(29, 67, seed=3))
    out = {}
    for be in ("cpp", "triton", "reference"):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        with kernels(be), _path(path):
            loss = fastssl.barlow_twins(a, b, 0.02, backend=be)
            loss.backward()
        out[be] = (loss.detach(), a.grad, b.grad)
    for be in ("triton", "reference"):
        for x, y in zip(out["cpp"], out[be]):
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5 * y.abs().max().item())


def test_cost_model():
    assert redundancy.choose_path(2048, 8192) == redundancy.PATH_GRAM
    assert redundancy.choose_path(8192, 2048) == redundancy.PATH_TILED
    # The crossover 6 N^2 D = 10 N D^2: N = 5 D / 3.
    assert redundancy.choose_path(166, 100) == redundancy.PATH_GRAM
    assert redundancy.choose_path(167, 100) == redundancy.PATH_TILED


def test_lightly_conventions():
    """lightly's BarlowTwinsLoss, written out here in plain torch (not imported): standardise
    with mean and torch's std (unbiased, no eps), C = a^T b / N, (C - I)^2 with the
    off-diagonal scaled by lambda, summed."""
    def lightly_barlow(za, zb, lam=5e-3):
        za = (za - za.mean(0)) / za.std(0)
        zb = (zb - zb.mean(0)) / zb.std(0)
        n, d = za.shape
        c_diff = (torch.mm(za.T, zb) / n - torch.eye(d, dtype=za.dtype)).pow(2)
        off = ~torch.eye(d, dtype=torch.bool)
        return (c_diff * torch.where(off, lam, 1.0)).sum()

    z1, z2 = _views(33, 50, seed=5)
    for be in (["cpp"] if _ext.available() else []) + ["reference"]:
        a, b = z1.detach().float().requires_grad_(), z2.detach().float().requires_grad_()
        la, lb = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
        ours = fastssl.barlow_twins(a, b, backend=be)
        theirs = lightly_barlow(la, lb)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(ours.double(), theirs.detach(), rtol=1e-5, atol=0)
        for g, h in ((a.grad, la.grad), (b.grad, lb.grad)):
            torch.testing.assert_close(g.double(), h, rtol=0, atol=1e-5 * h.abs().max().item())


@needs_cpp
def test_opcheck_both_paths():
    z1, z2 = (t.detach().float().requires_grad_() for t in _views(7, 11))
    for path in (redundancy.PATH_GRAM, redundancy.PATH_TILED):
        for std in (True, False):
            torch.library.opcheck(torch.ops.fastssl.barlow_twins_fwd, (z1, z2, 5e-3, std, path))


@needs_cpp
def test_torch_compile_fullgraph():
    z1, z2 = (t.detach().float().requires_grad_() for t in _views(12, 30))
    fn = torch.compile(lambda a, b: fastssl.barlow_twins(a, b, 0.01), fullgraph=True)
    loss = fn(z1, z2)
    loss.backward()
    want = _truth(z1.detach(), z2.detach(), 0.01)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


@needs_cpp
def test_double_backward_raises():
    z1, z2 = (t.detach().float().requires_grad_() for t in _views(6, 9))
    g = torch.autograd.grad(fastssl.barlow_twins(z1, z2), z1, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((g * g).sum(), z1)


def test_meta_tensors_through_the_fake():
    z1 = torch.empty(10, 300, device="meta", requires_grad=True)
    loss = fastssl.barlow_twins(z1, torch.empty(10, 300, device="meta"))
    assert loss.shape == () and loss.device.type == "meta"


def test_constant_feature_is_nan_like_lightly():
    z1, z2 = torch.randn(8, 5), torch.randn(8, 5)
    z1[:, 2] = 3.0
    assert torch.isnan(reference.barlow_twins(z1, z2))
    if _ext.available():
        assert torch.isnan(fastssl.barlow_twins(z1, z2, backend="cpp"))


def test_bad_inputs():
    z = torch.randn(6, 8)
    with pytest.raises(ValueError, match="N >= 2"):
        fastssl.barlow_twins(z[:1], z[:1])
    with pytest.raises(ValueError, match="same shape"):
        fastssl.barlow_twins(z, z[:, :7])
    with pytest.raises(ValueError, match="same shape"):
        fastssl.barlow_twins(z, z[:5])
    with pytest.raises(TypeError, match="same dtype"):
        fastssl.barlow_twins(z, z.double())
    with pytest.raises(ValueError, match="2-D"):
        fastssl.barlow_twins(z[None], z[None])
    with pytest.raises(TypeError, match="floating"):
        fastssl.barlow_twins(z.long(), z.long())
    for bad in (float("nan"), float("inf"), -1e-3):
        with pytest.raises(ValueError, match="lambda_"):
            fastssl.barlow_twins(z, z, bad)
    with pytest.raises(TypeError, match="lambda_"):
        fastssl.barlow_twins(z, z, torch.tensor(0.1))
    with pytest.raises(ValueError, match="normalize"):
        fastssl.barlow_twins(z, z, normalize="layer")
    with pytest.raises(ValueError, match="backend"):
        fastssl.barlow_twins(z, z, backend="gpu")
    # normalize="none" needs no batch statistics: one row is a valid batch.
    torch.testing.assert_close(fastssl.barlow_twins(z[:1], z[:1], normalize="none",
                                                    backend="reference"),
                               _truth(z[:1], z[:1], normalize="none").float())


# --- gather=True on two gloo ranks --------------------------------------------------------

B, D_IN, D, WORLD = 5, 8, 11, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int) -> None:
    import copy
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        for name, fn in (("barlow_twins", lambda a, b, g, be: fastssl.barlow_twins(
                             a, b, 0.05, gather=g, backend=be)),
                         ("vicreg", lambda a, b, g, be: fastssl.vicreg(
                             a, b, 25.0, 25.0, 1.0, gather=g, backend=be))):
            backends = (["cpp"] if _ext.available() else []) + ["triton"]
            for path, be in [(p, b) for p in ("gram", "tiled") for b in backends]:
                torch.manual_seed(0)  # same global data and initial model on every rank
                x1, x2 = torch.randn(WORLD * B, D_IN), torch.randn(WORLD * B, D_IN)
                base = torch.nn.Linear(D_IN, D)
                single = copy.deepcopy(base)
                opt = torch.optim.SGD(single.parameters(), lr=0.1)
                z1, z2 = single(torch.cat([x1, x2])).chunk(2)
                truth = fn(z1.double(), z2.double(), False, "reference")
                fn(z1, z2, False, "reference").backward()
                opt.step()
                ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
                opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
                mine = slice(rank * B, (rank + 1) * B)
                h = ddp(torch.cat([x1[mine], x2[mine]]))
                with redundancy.force_path(path), kernels(be):
                    local = fn(*h.chunk(2), True, be)
                    local.backward()
                opt.step()
                if name == "barlow_twins":  # every rank returns the global loss
                    err = abs(local.item() - truth.item()) / abs(truth.item())
                    assert err <= 1e-5, f"{name}/{path}/{be} rank {rank}: loss off by {err:.3g}"
                for (pname, p_ddp), p_one in zip(ddp.module.named_parameters(),
                                                 single.parameters()):
                    # Both losses are invariant to a shift of the features, so the bias
                    # gets no gradient; the weight must move.
                    moved = (p_one - base.state_dict()[pname]).abs().max()
                    assert pname == "bias" or moved > 1e-4, f"{name}: the step did not move {pname}"
                    err = ((p_ddp - p_one).abs().max() / p_one.abs().max()).item()
                    assert err <= 1e-5, f"{name}/{path}/{be} rank {rank}: {pname} off by {err:.3g}"
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_gather_two_ranks_equals_single_process_step():
    """One DDP step with gather=True (standardisation statistics and C over the global batch)
    equals one single-process step of the reference on the concatenated batch; also for
    vicreg (variance and covariance over the global batch, invariance local). Both paths,
    C++ and Triton (interpreter) kernels."""
    spawn_or_fail(_worker, (_free_port(),), WORLD)


def test_gather_without_process_group_is_the_plain_loss():
    z1, z2 = torch.randn(6, 9), torch.randn(6, 9)
    torch.testing.assert_close(fastssl.barlow_twins(z1, z2, gather=True),
                               reference.barlow_twins(z1, z2), rtol=1e-5, atol=1e-5)


@needs_cpp
@pytest.mark.parametrize("path", ["gram", "tiled"])
@pytest.mark.parametrize("op", ["barlow_twins", "vicreg"])
def test_cpp_results_do_not_depend_on_the_thread_count(op, path):
    """Fixed work units and summation orders: bitwise equal at 1 and 3 threads (also for
    vicreg, whose kernels share the engine)."""
    z1, z2 = (t.detach().float() for t in _views(150, 300, seed=7))
    prev = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
            with _path(path):
                loss = getattr(fastssl, op)(a, b, backend="cpp")
            loss.backward()
            runs.append((loss.detach(), a.grad, b.grad))
    finally:
        torch.set_num_threads(prev)
    for x, y in zip(*runs):
        assert torch.equal(x, y)
