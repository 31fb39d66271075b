"""fastssl.dino_loss / fastssl.ibot_patch_loss (the streamed DINO / iBOT prototype head) vs
fp64 truths from fastssl.reference (DINO's DINOLoss, materialising every [rows, K] matrix)."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import reference
from helpers import assert_close_to_truth

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(b, n_crops, n_global, d, k, *, seed=0, shared_weight=False):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n_crops * b, d, generator=g, dtype=torch.float64)
    ht = torch.randn(n_global * b, d, generator=g, dtype=torch.float64)
    ws = torch.randn(k, d, generator=g, dtype=torch.float64)
    wt = ws.clone() if shared_weight else ws + 0.1 * torch.randn(k, d, generator=g,
                                                                  dtype=torch.float64)
    center = 0.05 * torch.randn(1, k, generator=g, dtype=torch.float64)
    return hs, ht, ws, wt, center


def _run(fn, hs, ht, ws, wt, center, dtype, **kw):
    """(loss, new_center, dloss/dstudent_h, dloss/dweight_student) of fn on inputs in dtype;
    the upstream gradient is a fixed non-unit scalar (1.7)."""
    hs = hs.detach().to(dtype).requires_grad_()
    ws = ws.detach().to(dtype).requires_grad_()
    loss, new_center = fn(hs, ht.to(dtype), ws, wt.to(dtype), center.to(torch.float32
                          if dtype != torch.float64 else dtype), **kw)
    dh, dw = torch.autograd.grad(loss * 1.7, [hs, ws])
    return loss, new_center, dh, dw


def _check(name, fused, inputs, dtype, **kw):
    out = _run(fused, *inputs, dtype, **kw)
    truth = _run(reference.dino_loss if "n_global" in kw else reference.ibot_patch_loss,
                 *inputs, torch.float64, **kw)
    lowp = _run(reference.dino_loss if "n_global" in kw else reference.ibot_patch_loss,
                *inputs, dtype, **kw)
    assert out[0].dtype == dtype and out[0].dim() == 0
    assert out[2].dtype == dtype and out[3].dtype == dtype
    for what, o, t, lp in zip(("loss", "new_center", "dstudent_h", "dweight_student"),
                              out, truth, lowp):
        assert_close_to_truth(f"{name} {what}", o, t, lp, dtype)


SHAPES = [  # (B, n_crops, n_global, d, K)
    (1, 2, 2, 3, 1),
    (3, 5, 2, 200, 7),
    (3, 3, 1, 300, 1000),
    (1, 4, 2, 33, 1000),
    (3, 2, 1, 20, 300),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,n_crops,n_global,d,k", SHAPES)
def test_forward_backward_cpp(b, n_crops, n_global, d, k, dtype):
    inputs = _inputs(b, n_crops, n_global, d, k)
    _check("dino_loss[cpp]", lambda *a, **kw: fastssl.dino_loss(*a, backend="cpp", **kw),
           inputs, dtype, n_global=n_global, student_temp=0.1, teacher_temp=0.04)


@pytest.mark.parametrize("b,n_crops,n_global,d,k", [(3, 5, 2, 200, 7), (1, 3, 2, 300, 1000)])
def test_sinkhorn_teacher_cpp(b, n_crops, n_global, d, k):
    inputs = _inputs(b, n_crops, n_global, d, k)
    _check("dino_loss[cpp, sinkhorn]",
           lambda *a, **kw: fastssl.dino_loss(*a, backend="cpp", **kw), inputs, torch.float32,
           n_global=n_global, teacher="sinkhorn", sinkhorn_iters=3, teacher_temp=0.05)


TRITON_SHAPES = [(1, 2, 2, 3, 1), (3, 5, 2, 200, 7), (1, 3, 1, 300, 130)]


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,n_crops,n_global,d,k", TRITON_SHAPES)
def test_forward_backward_triton_interpreter(b, n_crops, n_global, d, k, dtype, backend):
    inputs = _inputs(b, n_crops, n_global, d, k)
    _check("dino_loss[triton]", lambda *a, **kw: fastssl.dino_loss(*a, backend=backend, **kw),
           inputs, dtype, n_global=n_global, student_temp=0.1, teacher_temp=0.04)


@pytest.mark.parametrize("backend", ["triton"])
def test_sinkhorn_and_ibot_triton_interpreter(backend):
    inputs = _inputs(3, 4, 2, 40, 100)
    _check("dino_loss[triton, sinkhorn]",
           lambda *a, **kw: fastssl.dino_loss(*a, backend=backend, **kw), inputs,
           torch.float32, n_global=2, teacher="sinkhorn", teacher_temp=0.05)
    hs, ht, ws, wt, center = _inputs(17, 1, 1, 24, 70)
    _check("ibot_patch_loss[triton]",
           lambda *a, **kw: fastssl.ibot_patch_loss(*a, backend=backend, **kw),
           (hs, ht, ws, wt, center.reshape(-1)), torch.float32,
           weights=torch.linspace(0.01, 0.1, 17, dtype=torch.float64))


def test_cpp_equals_triton_equals_reference():
    from fastssl import _dispatch
    hs, ht, ws, wt, center = (t.float() for t in _inputs(3, 4, 2, 72, 333))
    outs = {}
    for backend in ("cpp", "triton", "reference"):
        ctx = _dispatch.triton_on_cpu() if backend == "triton" else _nullcontext()
        with ctx:
            for teacher in ("centering", "sinkhorn"):
                outs[backend, teacher] = _run(
                    lambda *a, **kw: fastssl.dino_loss(*a, backend=backend, teacher=teacher,
                                                       **kw), hs, ht, ws, wt, center,
                    torch.float32)
    for teacher in ("centering", "sinkhorn"):
        for other in ("triton", "reference"):
            for a, b in zip(outs["cpp", teacher], outs[other, teacher]):
                torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7)


def _nullcontext():
    import contextlib
    return contextlib.nullcontext()


def test_shared_teacher_weight_and_fp64_runs_reference():
    hs, ht, ws, wt, center = _inputs(3, 4, 2, 17, 50, shared_weight=True)
    w = ws.float().requires_grad_()
    loss, c = fastssl.dino_loss(hs.float(), ht.float(), w, w.detach(), center.float())
    ref, rc = reference.dino_loss(hs, ht, ws, ws, center)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    torch.testing.assert_close(c.double(), rc, rtol=1e-5, atol=1e-6)
    out64, _ = fastssl.dino_loss(hs, ht, ws, wt, center)
    assert out64.dtype == torch.float64


def _dino_update_center(teacher_output, center, momentum):
    """facebookresearch/dino's DINOLoss.update_center, single process (world size 1)."""
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
    batch_center = batch_center / (len(teacher_output) * 1)
    return center * momentum + batch_center * (1 - momentum)


def test_center_update_equals_dino_update_center():
    hs, ht, ws, wt, center = _inputs(5, 4, 2, 40, 123)
    teacher_output = reference.dino_head_logits(ht, wt)
    want = _dino_update_center(teacher_output, center, 0.9)
    _, got = fastssl.dino_loss(hs.float(), ht.float(), ws.float(), wt.float(), center.float(),
                               center_momentum=0.9)
    assert got.shape == center.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # A (K,) centre comes back as (K,); the input is never modified.
    c1 = center.float().reshape(-1)
    before = c1.clone()
    _, got1 = fastssl.dino_loss(hs.float(), ht.float(), ws.float(), wt.float(), c1)
    assert got1.shape == c1.shape and torch.equal(c1, before)


def test_gradient_accumulation_semantics():
    """The centre is a pure input: micro-batches of one step all see the same centre (assign the
    new one once per optimizer step, lightly PR #2062); the mean of the new centres of equal
    micro-batches equals the new centre of the whole batch, and the summed gradients of the
    micro-batch losses (each divided by the number of micro-batches) equal the whole batch's
    gradient when every micro-batch is a full set of crops of its own samples."""
    b, nc, ng, d, k = 4, 3, 2, 24, 64
    hs, ht, ws, wt, center = (t.float() for t in _inputs(b, nc, ng, d, k))
    w_full = ws.clone().requires_grad_()
    loss_full, c_full = fastssl.dino_loss(hs, ht, w_full, wt, center, n_global=ng)
    loss_full.backward()
    # two micro-batches of 2 samples each (crop-major rows of each sample subset)
    w_acc = ws.clone().requires_grad_()
    centers = []
    for half in (slice(0, 2), slice(2, 4)):
        hs_m = hs.view(nc, b, d)[:, half].reshape(-1, d)
        ht_m = ht.view(ng, b, d)[:, half].reshape(-1, d)
        loss_m, c_m = fastssl.dino_loss(hs_m, ht_m, w_acc, wt, center, n_global=ng)
        (loss_m / 2).backward()
        centers.append(c_m)
    torch.testing.assert_close((centers[0] + centers[1]) / 2, c_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_acc.grad, w_full.grad, rtol=1e-4, atol=1e-6)


def _dinov2_sinkhorn(teacher_output, teacher_temp, n_iterations):
    """dinov2's SinkhornKnopp teacher, exponent form, single process."""
    Q = torch.exp(teacher_output / teacher_temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def test_sinkhorn_reference_is_dinov2():
    hs, ht, ws, wt, center = _inputs(4, 2, 2, 30, 90)
    t = reference.dino_head_logits(ht, wt)
    for iters in (1, 3, 5):
        torch.testing.assert_close(reference.sinkhorn_knopp_teacher(t, 0.05, iters),
                                   _dinov2_sinkhorn(t, 0.05, iters), rtol=1e-10, atol=1e-12)


def test_sinkhorn_stable_at_small_temperature():
    """teacher_temp = 0.01: logits up to 100, exp overflows fp32 in the exponent form (dinov2
    PR #583); the streamed log-domain teacher stays finite and matches the fp64 truth."""
    b, nc, ng, d, k = 3, 4, 2, 16, 300
    hs, ht, ws, wt, center = _inputs(b, nc, ng, d, k)
    # Teacher rows aligned with prototypes: cosines near 1, logits near 1 / 0.01 = 100.
    ht = wt[:ng * b] + 1e-3 * ht
    t32 = reference.dino_head_logits(ht.float(), wt.float())
    assert not torch.isfinite(_dinov2_sinkhorn(t32, 0.01, 3)).all()  # the failure it avoids
    q = torch.softmax(t32 / 0.01 + 0, dim=1)
    assert torch.isfinite(q).all()
    truth, _ = reference.dino_loss(hs, ht, ws, wt, center, n_global=ng, teacher="sinkhorn",
                                   teacher_temp=0.01)
    got, _ = fastssl.dino_loss(hs.float(), ht.float(), ws.float(), wt.float(), center.float(),
                               n_global=ng, teacher="sinkhorn", teacher_temp=0.01, backend="cpp")
    assert torch.isfinite(got)
    assert abs(got.item() - truth.item()) <= 1e-4 * abs(truth.item())


def test_ibot_patch_loss():
    m, d, k = 37, 40, 300
    g = torch.Generator().manual_seed(3)
    hs, ht = torch.randn(m, d, generator=g, dtype=torch.float64), torch.randn(
        m, d, generator=g, dtype=torch.float64)
    ws = torch.randn(k, d, generator=g, dtype=torch.float64)
    wt = ws + 0.1 * torch.randn(k, d, generator=g, dtype=torch.float64)
    center = 0.05 * torch.randn(k, generator=g, dtype=torch.float64)
    inputs = (hs, ht, ws, wt, center)
    _check("ibot_patch_loss[cpp]",
           lambda *a, **kw: fastssl.ibot_patch_loss(*a, backend="cpp", **kw), inputs,
           torch.float32)
    # DINOv2 weighting: 1 / (masked patches of the image) / images, here 2 images (20 + 17).
    weights = torch.cat([torch.full((20,), 1 / 20), torch.full((17,), 1 / 17)]) / 2
    _check("ibot_patch_loss[cpp, weights]",
           lambda *a, **kw: fastssl.ibot_patch_loss(*a, backend="cpp", **kw), inputs,
           torch.float32, weights=weights.double())


def test_teacher_inputs_get_no_gradient():
    hs, ht, ws, wt, center = (t.float() for t in _inputs(2, 3, 2, 8, 20))
    ht.requires_grad_()
    wt.requires_grad_()
    hs.requires_grad_()
    loss, _ = fastssl.dino_loss(hs, ht, ws, wt, center)
    loss.backward()
    assert ht.grad is None and wt.grad is None and hs.grad is not None


def test_threads_do_not_change_results():
    hs, ht, ws, wt, center = (t.float() for t in _inputs(3, 5, 2, 48, 2000))
    runs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_run(lambda *a, **kw: fastssl.dino_loss(*a, backend="cpp", **kw),
                             hs, ht, ws, wt, center, torch.float32))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_opcheck():
    hs, ht, ws, wt, center = (t.float() for t in _inputs(2, 3, 2, 12, 40))
    f32 = dict(dtype=torch.float32)
    args = (hs.requires_grad_(), ht, ws.requires_grad_(), wt, center.reshape(-1) * 25,
            torch.tensor(10.0), torch.tensor(25.0), torch.full((4,), 1 / 8, **f32), 2, True)
    torch.library.opcheck(torch.ops.fastssl.dino_loss_fwd, args)
    torch.library.opcheck(torch.ops.fastssl.dino_teacher_lse,
                          (ht, wt, torch.tensor(25.0), torch.zeros(4), torch.zeros(40)))


def test_compile_fullgraph():
    hs, ht, ws, wt, center = (t.float() for t in _inputs(2, 4, 2, 12, 40))

    def step(a, b, w, u, c):
        return fastssl.dino_loss(a, b, w, u, c, teacher_temp=0.04)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    w1, w2 = ws.clone().requires_grad_(), ws.clone().requires_grad_()
    l1, c1 = compiled(hs, ht, w1, wt, center)
    l2, c2 = step(hs, ht, w2, wt, center)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(c1, c2)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_double_backward_raises():
    hs, ht, ws, wt, center = (t.float() for t in _inputs(2, 3, 2, 8, 20))
    hs.requires_grad_()
    loss, _ = fastssl.dino_loss(hs, ht, ws, wt, center)
    (g,) = torch.autograd.grad(loss, hs, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_meta_tensors():
    hs, ht = torch.empty(12, 8, device="meta"), torch.empty(4, 8, device="meta")
    w = torch.empty(30, 8, device="meta")
    loss, c = fastssl.dino_loss(hs, ht, w, w, torch.empty(30, device="meta"))
    assert loss.shape == () and c.shape == (30,) and loss.device.type == "meta"
    loss, _lse, _tl, s = torch.ops.fastssl.dino_loss_fwd(
        hs, ht, w, w, torch.empty(30, device="meta"), torch.empty((), device="meta"),
        torch.empty((), device="meta"), torch.empty(4, device="meta"), 2, True)
    assert loss.shape == () and s.shape == (30,)


def test_bad_inputs():
    hs, ht, ws, wt, center = (t.float() for t in _inputs(2, 3, 2, 8, 20))
    with pytest.raises(ValueError, match="d = 8"):
        fastssl.dino_loss(hs, ht[:, :5], ws, wt, center)
    with pytest.raises(ValueError, match="same K"):
        fastssl.dino_loss(hs, ht, ws, wt[:10], center)
    with pytest.raises(ValueError, match=r"center must have shape \(20,\)"):
        fastssl.dino_loss(hs, ht, ws, wt, center[:, :5])
    with pytest.raises(ValueError, match="n_global"):
        fastssl.dino_loss(hs, ht[:3], ws, wt, center)
    with pytest.raises(ValueError, match="n_crops"):
        fastssl.dino_loss(hs[:5], ht, ws, wt, center)
    with pytest.raises(ValueError, match="global crops"):
        fastssl.dino_loss(hs[:2], ht, ws, wt, center)
    with pytest.raises(ValueError, match="pair"):
        fastssl.dino_loss(hs[:2], ht[:2], ws, wt, center, n_global=1)
    with pytest.raises(ValueError, match="teacher_temp"):
        fastssl.dino_loss(hs, ht, ws, wt, center, teacher_temp=0.0)
    with pytest.raises(ValueError, match="student_temp"):
        fastssl.dino_loss(hs, ht, ws, wt, center, student_temp=float("nan"))
    with pytest.raises(ValueError, match="momentum"):
        fastssl.dino_loss(hs, ht, ws, wt, center, center_momentum=1.5)
    with pytest.raises(ValueError, match="teacher must be"):
        fastssl.dino_loss(hs, ht, ws, wt, center, teacher="swav")
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        fastssl.dino_loss(hs, ht, ws, wt, center, sinkhorn_iters=0)
    with pytest.raises(TypeError, match="same dtype"):
        fastssl.dino_loss(hs, ht.double(), ws, wt, center)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fastssl.dino_loss(hs, ht, ws.tolist(), wt, center)
    with pytest.raises(ValueError, match="2-D"):
        fastssl.dino_loss(hs[None], ht, ws, wt, center)
    with pytest.raises(ValueError, match="backend"):
        fastssl.dino_loss(hs, ht, ws, wt, center, backend="cuda-ish")
    with pytest.raises(ValueError, match="same masked-patch rows"):
        fastssl.ibot_patch_loss(hs, ht, ws, wt, center)
    with pytest.raises(ValueError, match="weights"):
        fastssl.ibot_patch_loss(hs, hs, ws, wt, center, weights=torch.ones(3))


# --- gather=True on two gloo processes (Triton kernels under the interpreter) ----------------

_DDP_SCRIPT = r"""
import os, sys, socket
import torch, torch.distributed as dist
import fastssl
from fastssl import _dispatch, reference

WORLD, B, NC, NG, D, K = 2, 3, 3, 2, 8, 20


def worker(rank, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        g = torch.Generator().manual_seed(0)
        hs = torch.randn(NC, WORLD * B, D, generator=g)
        ht = torch.randn(NG, WORLD * B, D, generator=g)
        ws, wt = torch.randn(K, D, generator=g), torch.randn(K, D, generator=g)
        center = 0.1 * torch.randn(1, K, generator=g)
        mine = slice(rank * B, (rank + 1) * B)
        for teacher in ("centering", "sinkhorn"):
            want, want_c = reference.dino_loss(hs.reshape(-1, D).double(),
                                               ht.reshape(-1, D).double(), ws.double(),
                                               wt.double(), center.double(), n_global=NG,
                                               teacher=teacher, teacher_temp=0.05)
            with _dispatch.triton_on_cpu():
                loss, c = fastssl.dino_loss(hs[:, mine].reshape(-1, D),
                                            ht[:, mine].reshape(-1, D), ws, wt, center,
                                            n_global=NG, teacher=teacher, teacher_temp=0.05,
                                            gather=True, backend="triton")
            losses = [torch.zeros(()) for _ in range(WORLD)]
            dist.all_gather(losses, loss.detach())
            mean = sum(losses) / WORLD
            assert abs(mean.item() - want.item()) <= 1e-5 * abs(want.item()), (teacher, mean, want)
            torch.testing.assert_close(c.double(), want_c, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    from helpers import spawn_or_fail
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn_or_fail(worker, (port,), WORLD, timeout=240)
    print("OK")
"""


def test_gather_centre_and_sinkhorn_over_two_ranks(tmp_path):
    """With gather=True the centre's batch mean and the Sinkhorn column sums run over both
    ranks: the ranks' losses average to the single-process loss of the whole batch, and each
    rank's new centre is the whole batch's (DINO's update_center all-reduce)."""
    import os
    import subprocess
    import sys
    script = tmp_path / "ddp_dino.py"
    script.write_text(_DDP_SCRIPT)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests_dir)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([root, tests_dir, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(script), tests_dir], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
