"""The op model (fastssl/ops/_library.py): one torch.library schema per op with a C++ CPU kernel
and a Triton CUDA kernel, one fake and one autograd registration for both; Triton run on CPU
tensors under the interpreter through ``fastssl._dispatch.triton_on_cpu``.

Checked here for every loss: both kernels registered, the package and its Triton path without
the C++ extension, no host sync on a loss's path, ``torch.compile(fullgraph=True)`` of a
training step and ``torch.library.opcheck`` on both backends, double backward raises, and the
``gather=True`` engine runs fused (on CUDA by dispatch; DDP equality under the interpreter).
"""
from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode

import fastssl
from fastssl import _dispatch, _ext, reference
from helpers import spawn_or_fail, kernels

needs_cpp = pytest.mark.skipif(not _ext.available(), reason=f"no _C: {_ext.why_unavailable()}")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "triton"]
LOSS_OPS = ["ntxent", "xent", "info_nce_queue", "clip", "supcon", "negative_cosine",
            "masked_token_loss", "dino_loss", "masked_patch_loss"]
LOSS_OPS += ["barlow_twins", "vicreg"]  # issue 14: redundancy reduction


def _loss_calls():
    """name -> (make inputs, loss(inputs, backend)); small odd shapes, learnable scalars."""
    def emb(n=5, d=7):
        return torch.randn(n, d, requires_grad=True)

    return {
        "nt_xent": (lambda: (emb(), emb(), torch.tensor(0.3, requires_grad=True)),
                    lambda a, b, t, be: fastssl.nt_xent(a, b, t, backend=be)),
        "info_nce_queue": (lambda: (emb(), emb(), torch.randn(11, 7),
                                    torch.tensor(0.2, requires_grad=True)),
                           lambda q, k, u, t, be: fastssl.info_nce(q, k, u, t, backend=be)),
        "info_nce_in_batch": (lambda: (emb(), emb(), torch.tensor(0.2, requires_grad=True)),
                              lambda q, k, t, be: fastssl.info_nce(q, k, None, t, backend=be)),
        "clip_loss": (lambda: (emb(), emb(), torch.tensor(9.0, requires_grad=True)),
                      lambda i, t, s, be: fastssl.clip_loss(i, t, s, backend=be)),
        "supcon": (lambda: (emb(6), torch.tensor([0, 1, 0, 2, 1, 0]),
                            torch.tensor(0.1, requires_grad=True)),
                   lambda z, y, t, be: fastssl.supcon(z, y, t, backend=be)),
        "symmetric_negative_cosine": (
            lambda: (emb(), emb(), torch.randn(5, 7), torch.randn(5, 7)),
            lambda p1, p2, z1, z2, be: fastssl.symmetric_negative_cosine(p1, p2, z1, z2,
                                                                         backend=be)),
        "masked_token_loss": (
            lambda: (torch.randn(2, 3, 7, requires_grad=True),
                     torch.randn(11, 7, requires_grad=True), torch.randn(11, requires_grad=True),
                     torch.tensor([[1, -100, 10], [0, 4, -100]])),
            lambda h, w, b, y, be: fastssl.masked_token_loss(h, w, y, bias=b, backend=be)),

        "dino_loss": (lambda: (emb(9), torch.randn(6, 7), emb(11), torch.randn(11, 7),
                               torch.zeros(11)),
                      lambda s, t, w, u, c, be: fastssl.dino_loss(s, t, w, u, c, n_global=2,
                                                                  backend=be)[0]),
        "dino_loss_sinkhorn": (lambda: (emb(9), torch.randn(6, 7), emb(11), torch.randn(11, 7),
                                        torch.zeros(11)),
                               lambda s, t, w, u, c, be: fastssl.dino_loss(
                                   s, t, w, u, c, n_global=2, teacher="sinkhorn",
                                   backend=be)[0]),

        "masked_patch_loss": (lambda: (torch.randn(2, 6, 48, requires_grad=True),
                                       torch.randn(2, 3, 8, 12),
                                       torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 0]],
                                                    dtype=torch.bool)),
                              lambda a, x, m, be: fastssl.masked_patch_loss(
                                  a, x, m, patch_size=4, backend=be)),
        "barlow_twins": (lambda: (emb(), emb()),
                         lambda a, b, be: fastssl.barlow_twins(a, b, 0.01, backend=be)),
        "vicreg": (lambda: (emb(), emb()), lambda a, b, be: fastssl.vicreg(a, b, backend=be)),
    }


def test_every_loss_op_has_both_kernels():
    for op in LOSS_OPS:
        for part in ("fwd", "bwd"):
            name = f"fastssl::{op}_{part}"
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
            if _ext.available():
                assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastssl::ssl_augment", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastssl::mae_mask", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastssl::pretext_noise", "CUDA")
    if _ext.available():
        assert torch._C._dispatch_has_kernel_for_dispatch_key("fastssl::pretext_noise", "CPU")


def test_triton_on_cpu_swaps_and_restores_the_cpu_kernel():
    z1, z2 = torch.randn(3, 5), torch.randn(3, 5)
    with kernels("triton"):
        assert _dispatch.triton_on_cpu_active()
        a = fastssl.nt_xent(z1, z2, backend="triton", reduction="none")
        with pytest.raises(RuntimeError, match="triton_on_cpu"):
            fastssl.nt_xent(z1, z2, backend="cpp")
    assert not _dispatch.triton_on_cpu_active()
    with pytest.raises(ValueError, match="triton_on_cpu"):
        fastssl.nt_xent(z1, z2, backend="triton")
    torch.testing.assert_close(a, reference.nt_xent(z1, z2, 0.1, reduction="none"), rtol=1e-4,
                               atol=1e-5)


def test_package_and_triton_path_without_the_extension(tmp_path):
    """A GPU user needs no C++ compiler: with the extension disabled the ops are defined, their
    CUDA kernels registered, CPU tensors run the reference after one warning, and the Triton
    kernels run (here under the interpreter)."""
    code = textwrap.dedent("""
        import warnings, torch, fastssl
        from fastssl import _dispatch, _ext, reference
        assert not _ext.available() and "FASTSSL_DISABLE_EXT" in _ext.why_unavailable()
        for op in ("ntxent_fwd", "xent_fwd", "info_nce_queue_fwd", "clip_fwd", "supcon_fwd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key("fastssl::" + op, "CUDA")
            assert not torch._C._dispatch_has_kernel_for_dispatch_key("fastssl::" + op, "CPU")
        z1, z2 = torch.randn(4, 6), torch.randn(4, 6)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = fastssl.nt_xent(z1, z2)
        assert any("reference" in str(x.message) for x in w), [str(x.message) for x in w]
        with _dispatch.triton_on_cpu():
            tri = fastssl.nt_xent(z1, z2, backend="triton")
            cl = fastssl.clip_loss(z1, z2, 5.0, backend="triton")
        torch.testing.assert_close(tri, out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cl, reference.clip_loss(z1, z2, 5.0), rtol=1e-4, atol=1e-5)
        print("OK")
    """)
    env = dict(os.environ, FASTSSL_DISABLE_EXT="1", TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


class _NoHostSync(TorchFunctionMode):
    """Fails on any read of a tensor's value on the host (a device sync on CUDA) made by
    fastssl's code. Exempt: the Triton interpreter's own copies of kernel arguments (on a GPU
    the launch passes pointers), and ``_validate``, which reads a temperature on the host only
    when it is a CPU tensor in eager mode (no device sync; CUDA tensors and compiled code get
    ``torch._assert_async`` there, tested in test_fuzz / test_ntxent)."""

    SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__index__,
             torch.Tensor.numpy}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            where = frame.f_code.co_filename if frame is not None else "?"
            if "/triton/" not in where and not where.endswith("fastssl/_validate.py"):
                raise AssertionError(f"host sync {func.__name__} at {where}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(_loss_calls()))
def test_no_host_sync_on_a_loss_path(name):
    """Forward and backward of every loss with the Triton kernels (the GPU path, here on the
    interpreter) read no tensor value on the host: no float(), .item(), bool(tensor)."""
    make, loss_fn = _loss_calls()[name]
    xs = make()
    with kernels("triton"):
        with _NoHostSync():
            loss = loss_fn(*xs, "triton")
            loss.backward()
    assert torch.isfinite(loss)


def _loss_only(loss_fn, backend):
    return lambda *xs: loss_fn(*xs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_loss_calls()))
def test_compile_fullgraph_training_step(name, backend):
    """The loss compiles as one graph (fullgraph: no graph break -- the ops, their fakes and the
    scalar handling trace) and AOTAutograd compiles its backward from the one autograd
    registration; values and gradients equal eager's. (Dynamo does not trace
    ``Tensor.backward()`` itself: a compiled training step calls it on the compiled loss.)"""
    torch._dynamo.reset()
    make, loss_fn = _loss_calls()[name]
    xs = make()
    xs2 = [x.detach().clone().requires_grad_(x.requires_grad) for x in xs]
    with kernels(backend):
        eager = loss_fn(*xs, backend)
        eager.backward()
        compiled = torch.compile(_loss_only(loss_fn, backend), fullgraph=True,
                                 backend="aot_eager")(*xs2)
        compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(xs, xs2):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad)


@needs_cpp
def test_compile_inductor_nt_xent():
    torch._dynamo.reset()
    z1, z2 = torch.randn(6, 9, requires_grad=True), torch.randn(6, 9, requires_grad=True)
    loss = torch.compile(lambda a, b: fastssl.nt_xent(a, b, 0.2, backend="cpp"),
                         fullgraph=True)(z1, z2)
    loss.backward()
    a, b = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    want = reference.nt_xent(a, b, 0.2)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z1.grad, a.grad, rtol=1e-4, atol=1e-6)


def _op_cases():
    f = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    t = lambda v: torch.tensor(v, requires_grad=True)  # noqa: E731
    idx = torch.tensor([2, 0, 4, 1])
    return {
        "ntxent_fwd": (f(4, 6), f(4, 6), t(0.3), True, False),
        "xent_fwd": (f(4, 6), f(5, 6), t(3.0), idx, torch.tensor([-1, 3, -1, 0]), True, True),
        "info_nce_queue_fwd": (f(3, 6), f(3, 6), torch.randn(9, 6), t(5.0), True),
        "clip_fwd": (f(4, 6), f(4, 6), t(8.0), True),
        "supcon_fwd": (f(5, 6), torch.tensor([0, 1, 0, 1, 2]), t(10.0), True),
        "negative_cosine_fwd": (f(5, 6), torch.randn(5, 6)),
        "masked_token_loss_fwd": (f(5, 6), f(9, 6), f(9), torch.tensor([8, -100, 0, 3, 3]), -100),

        "dino_loss_fwd": (f(9, 6), torch.randn(6, 6), f(13, 6), torch.randn(13, 6),
                          torch.randn(13), torch.tensor(10.0), torch.tensor(25.0),
                          torch.full((6,), 1 / 12), 2, True),
        "dino_teacher_lse": (torch.randn(6, 6), torch.randn(13, 6), torch.tensor(25.0),
                             torch.randn(6), torch.randn(13)),

        "masked_patch_loss_fwd": (f(2, 6, 48), torch.randn(2, 3, 8, 12),
                                  torch.tensor([[1.0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 0]]), 4,
                                  True, 1e-6),
        "barlow_twins_fwd": (f(5, 6), f(5, 6), 5e-3, True, 1),
        "barlow_twins_fwd_tiled": (f(9, 4), f(9, 4), 0.3, False, 2),
        "vicreg_fwd": (f(5, 6), f(5, 6), 25.0, 25.0, 1.0, 1e-4, 1),
        "vicreg_fwd_tiled": (f(9, 4), f(9, 4), 25.0, 25.0, 1.0, 1e-4, 2),
        "masked_token_loss_sum": (f(5, 6), f(9, 6), f(9), torch.tensor([8, -100, 0, 3, 3]), -100),
        "mae_mask": (torch.tensor([7, 9]), 3, 11, 4),
        "pretext_noise": (torch.randn(2, 3, 5, 7), torch.rand(2, 3), torch.tensor([7, 9]),
                          False, 0.0),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(_op_cases()))
def test_opcheck(op, backend):
    with kernels(backend):
        torch.library.opcheck(getattr(torch.ops.fastssl, op.removesuffix("_tiled")),
                              _op_cases()[op])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_loss_calls()))
def test_double_backward_raises(name, backend):
    make, loss_fn = _loss_calls()[name]
    xs = make()
    with kernels(backend):
        loss = loss_fn(*xs, backend)
        g = torch.autograd.grad(loss, xs[0], create_graph=True)[0]
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad((g * g).sum(), xs[0])


def test_gather_engine_is_fused_on_cuda():
    """gather=True resolves to the fused xent op on CUDA tensors, whose CUDA kernel is Triton
    (no O(N^2) reference path)."""
    from fastssl.ops import _library, xent
    assert _dispatch.resolve("auto", torch.device("cuda"), op="nt_xent",
                             cpp_op="xent_fwd") == "triton"
    assert _library.TRITON_KERNELS["xent_fwd"] is xent.xent_fwd_triton
    assert _library.TRITON_KERNELS["xent_bwd"] is xent.xent_bwd_triton


# --- two gloo processes, Triton kernels under the interpreter --------------------------------

B, D_IN, D, WORLD = 5, 8, 7, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    losses = {
        "nt_xent": lambda a, b, g, be: fastssl.nt_xent(a, b, 0.3, gather=g, backend=be),
        "nt_xent_decoupled": lambda a, b, g, be: fastssl.nt_xent(a, b, 0.3, gather=g,
                                                                 decoupled=True, backend=be),
        "clip_loss": lambda a, b, g, be: fastssl.clip_loss(a, b, 7.0, gather=g, backend=be),
        "info_nce": lambda a, b, g, be: fastssl.info_nce(a, b, None, 0.2, gather=g, backend=be),
    }
    try:
        for name, loss_fn in losses.items():
            torch.manual_seed(0)
            x1, x2 = torch.randn(WORLD * B, D_IN), torch.randn(WORLD * B, D_IN)
            base = torch.nn.Linear(D_IN, D)
            # The single-process step on the global batch runs the reference (another path).
            single = copy.deepcopy(base)
            opt = torch.optim.SGD(single.parameters(), lr=0.5)
            z1, z2 = single(torch.cat([x1, x2])).chunk(2)
            loss_fn(z1, z2, False, "reference").backward()
            opt.step()
            ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
            opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
            mine = slice(rank * B, (rank + 1) * B)
            with _dispatch.triton_on_cpu():
                z1, z2 = ddp(torch.cat([x1[mine], x2[mine]])).chunk(2)
                loss_fn(z1, z2, True, "triton").backward()
            opt.step()
            for p_ddp, p_one in zip(ddp.module.parameters(), single.parameters()):
                err = ((p_ddp - p_one).abs().max() / p_one.abs().max()).item()
                assert err <= 1e-5, f"{name}, rank {rank}: differs by {err:.3g}"
    finally:
        dist.destroy_process_group()
    # Success: leave without the interpreter's teardown, where a rank was seen to hang after
    # its peer had exited (gloo threads at exit), leaving the parent waiting. Failures above
    # propagate normally (torch.multiprocessing reports them to the parent).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_gather_triton_equals_single_process_step():
    """Run from a fresh interpreter: spawned ranks started from a pytest process that already
    ran torch.compile tests were seen to hang (one rank exited, its peer never returned), so
    the two ranks are launched by a clean parent, under a deadline."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "ddp"], env=env, cwd=root,
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0 and "DDP OK" in out.stdout, (out.stdout[-2000:],
                                                            out.stderr[-4000:])


if __name__ == "__main__" and sys.argv[1:] == ["ddp"]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    spawn_or_fail(_ddp_worker, (_free_port(),), WORLD)
    print("DDP OK")


def test_docstrings_hold_no_control_bytes():
    """Math docstrings are raw strings: no tab / backspace / form-feed bytes where \\tau,
    \\beta, \\frac were (they render as garbage in help())."""
    import importlib
    import pkgutil
    bad = []
    for info in pkgutil.walk_packages(fastssl.__path__, "fastssl."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and getattr(obj, "__module__", info.name) == info.name:
                if any(ord(ch) < 32 and ch not in "\n" for ch in doc):
                    bad.append(f"{info.name}.{getattr(obj, '__name__', '')}")
    assert not bad, bad


def test_meta_tensors_give_shapes():
    z = torch.randn(4, 8, device="meta")
    t = torch.tensor(0.5, device="meta")
    assert fastssl.nt_xent(z, z, 0.5).shape == ()
    assert fastssl.clip_loss(z, z, 3.0).device.type == "meta"
    assert fastssl.info_nce(z, z, torch.randn(9, 8, device="meta"), 0.2,
                            reduction="none").shape == (4,)
    del t
