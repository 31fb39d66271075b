"""MoCo machinery: EMA update (C++, Triton under the interpreter, reference) against
torch._foreach_lerp_, the momentum schedule and encoder, and the key queue (wrap-around,
B > size, state, torch.compile, 2-rank gloo)."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn as nn

import fastssl
from fastssl import _ext, reference

from helpers import assert_close_to_truth, rel_err

HAS_CPP = _ext.has_op("ema_update_")
EMA_BACKENDS = [pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="no _C")),
                "triton", "reference"]
QUEUE_BACKENDS = [pytest.param("cpp", marks=pytest.mark.skipif(
    not _ext.has_op("moco_enqueue_"), reason="no _C")), "triton", "reference"]

# Odd shapes on purpose: a 0-dim tensor, an empty one, sizes that straddle the Triton chunk
# (16 K) and the C++ thread split (64 K elements in total).
SHAPES = [(3, 5), (), (0, 4), (1,), (257, 129), (40_001,), (7, 3, 3, 3)]


def _lists(shapes, t_dtype=torch.float32, o_dtype=None):
    o_dtype = o_dtype or t_dtype
    target = [torch.randn(s, dtype=torch.float32).to(t_dtype) for s in shapes]
    online = [torch.randn(s, dtype=torch.float32).to(o_dtype) for s in shapes]
    return target, online


def _foreach_truth(target, online, momentum):
    """torch._foreach_lerp_ on copies, the online widened to the target dtype."""
    out = [t.clone() for t in target]
    torch._foreach_lerp_(out, [o.to(t.dtype) for t, o in zip(target, online)], 1.0 - momentum)
    return out


def _flat(ts):
    return torch.cat([t.reshape(-1).double() for t in ts]) if ts else torch.zeros(0)


# ------------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("backend", EMA_BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.3, 0.5, 0.9, 0.996, 1.0])
def test_ema_lists_match_foreach_lerp(backend, momentum):
    target, online = _lists(SHAPES)
    truth = _foreach_truth(target, online, momentum)
    online_before = [o.clone() for o in online]
    ptrs = [t.data_ptr() for t in target]
    fastssl.ema_update_(target, online, momentum, backend=backend)
    assert rel_err(_flat(target), _flat(truth)) <= 1e-6
    assert [t.data_ptr() for t in target] == ptrs  # in place
    assert all(torch.equal(a, b) for a, b in zip(online, online_before))
    if momentum == 1.0:
        assert all(torch.equal(t, u) for t, u in zip(target, truth))  # lerp is exact at ends
    if momentum == 0.0:
        assert all(torch.equal(t, o) for t, o in zip(target, online))


@pytest.mark.parametrize("backend", EMA_BACKENDS)
@pytest.mark.parametrize("t_dtype,o_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.float64, torch.float32), (torch.float64, torch.float64)])
def test_ema_mixed_and_wide_dtypes(backend, t_dtype, o_dtype):
    target, online = _lists(SHAPES, t_dtype, o_dtype)
    truth = _foreach_truth(target, online, 0.9)
    fastssl.ema_update_(target, online, 0.9, backend=backend)
    assert all(t.dtype == t_dtype for t in target)
    assert rel_err(_flat(target), _flat(truth)) <= 1e-6


@pytest.mark.parametrize("backend", EMA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ema_low_precision(backend, dtype):
    # fp32 compute, one rounding: within the error of _foreach_lerp_ in that dtype.
    target, online = _lists(SHAPES[:5], dtype)
    truth = [t.double().lerp_(o.double(), 0.1) for t, o in zip(target, online)]
    lowp = _foreach_truth(target, online, 0.9)
    fastssl.ema_update_(target, online, 0.9, backend=backend)
    assert_close_to_truth("ema", _flat(target), _flat(truth), _flat(lowp), dtype)


@pytest.mark.parametrize("backend", EMA_BACKENDS)
def test_ema_non_contiguous(backend):
    # transposed, channels_last, strided, and contiguous views at odd offsets (unaligned)
    target = [torch.randn(33, 17).t(), torch.randn(64, 3, 5, 5).to(
        memory_format=torch.channels_last), torch.randn(40, 40)[:, ::3],
        torch.randn(40_000)[1:35_000], torch.randn(999)[3:]]
    online = [torch.randn(17, 33), torch.randn(64, 3, 5, 5), torch.randn(40, 14),
              torch.randn(35_001)[2:], torch.randn(996)]
    truth = _foreach_truth(target, online, 0.7)
    fastssl.ema_update_(target, online, 0.7, backend=backend)
    assert rel_err(_flat(target), _flat(truth)) <= 1e-6


def _net():
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 5))


@pytest.mark.parametrize("backend", EMA_BACKENDS)
@pytest.mark.parametrize("buffers", [False, True])
def test_ema_modules(backend, buffers):
    online, target = _net(), _net()
    online.train()(torch.randn(4, 3, 6, 6))  # moves the BN running stats of `online`
    t_params = [p.detach().clone() for p in target.parameters()]
    t_bufs = {n: b.clone() for n, b in target.named_buffers()}
    truth = _foreach_truth(t_params, [p.detach() for p in online.parameters()], 0.99)
    fastssl.ema_update_(target, online, 0.99, buffers=buffers, backend=backend)
    assert rel_err(_flat(list(target.parameters())), _flat(truth)) <= 1e-6
    on_bufs = dict(online.named_buffers())
    for name, b in target.named_buffers():
        if not buffers:
            assert torch.equal(b, t_bufs[name]), name
        elif b.is_floating_point():
            want = t_bufs[name].lerp(on_bufs[name], 0.01)
            assert rel_err(b, want) <= 1e-6, name
        else:
            assert torch.equal(b, on_bufs[name]), name  # num_batches_tracked is copied
    assert all(p.requires_grad for p in target.parameters())  # untouched flags


def test_ema_under_autograd_enabled_params_requiring_grad():
    # Parameters require grad and grad mode is on: the update must still run (no_grad inside).
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    fastssl.ema_update_(target, online, 0.5)
    assert target.weight.grad_fn is None


@pytest.mark.skipif(not HAS_CPP, reason="no _C")
def test_ema_cpp_opcheck():
    target, online = _lists([(5, 3), (70_000,), (2,)])
    torch.library.opcheck(torch.ops.fastssl.ema_update_, (target, online, 0.25))


def test_triton_ema_table_cache_reused_and_correct():
    from fastssl.ops import ema as tri
    target, online = _lists([(100,), (20_000,)])
    for step in range(3):
        truth = _foreach_truth(target, online, 0.8)
        fastssl.ema_update_(target, online, 0.8, backend="triton")
        assert rel_err(_flat(target), _flat(truth)) <= 1e-6, step
    key = (target[0].device, tuple((t.data_ptr(), o.data_ptr(), t.numel())
                                   for t, o in zip(target, online)))
    assert key in tri._TABLES


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), float("inf")])
def test_ema_bad_momentum(bad):
    target, online = _lists([(3,)])
    with pytest.raises(ValueError, match="momentum must be in"):
        fastssl.ema_update_(target, online, bad)
    with pytest.raises(TypeError, match="momentum"):
        fastssl.ema_update_(target, online, "0.9")
    with pytest.raises(ValueError, match="exactly one element"):
        fastssl.ema_update_(target, online, torch.tensor([0.9, 0.9]))


def test_ema_bad_inputs():
    t, o = _lists([(3, 4), (5,)])
    with pytest.raises(ValueError, match="same number of tensors"):
        fastssl.ema_update_(t, o[:1], 0.9)
    with pytest.raises(ValueError, match=r"target\[1\] and online\[1\] must have the same shape"):
        fastssl.ema_update_(t, [o[0], torch.randn(6)], 0.9)
    with pytest.raises(TypeError, match=r"online dtype must equal the target's"):
        fastssl.ema_update_([torch.randn(3).bfloat16()], [torch.randn(3)], 0.9)
    with pytest.raises(TypeError, match=r"online\[0\] must be a torch.Tensor"):
        fastssl.ema_update_([torch.randn(3)], [[1.0, 2.0, 3.0]], 0.9)
    with pytest.raises(TypeError, match="both be nn.Modules"):
        fastssl.ema_update_(nn.Linear(2, 2), list(nn.Linear(2, 2).parameters()), 0.9)
    with pytest.raises(TypeError, match="not single tensors"):
        fastssl.ema_update_(torch.randn(3), torch.randn(3), 0.9)
    with pytest.raises(ValueError, match="same parameters"):
        fastssl.ema_update_(nn.Linear(2, 2), nn.Linear(2, 2, bias=False), 0.9)
    with pytest.raises(ValueError, match="one device"):
        fastssl.ema_update_([torch.randn(3)], [torch.empty(3, device="meta")], 0.9)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastssl.ema_update_(t, o, 0.9, backend="fast")
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors"):
        fastssl.ema_update_(t, o, 0.9, backend="cuda")
    fastssl.ema_update_([], [], 0.9)  # nothing to do, no error


# --------------------------------------------------------------- schedule and encoder


def test_momentum_schedule():
    assert fastssl.momentum_schedule(0, 1000) == 0.996
    assert fastssl.momentum_schedule(1000, 1000) == 1.0
    assert fastssl.momentum_schedule(500, 1000) == pytest.approx((0.996 + 1.0) / 2, abs=1e-12)
    assert fastssl.momentum_schedule(0, 10, base=0.99, final=0.999) == 0.99
    ms = [fastssl.momentum_schedule(k, 50) for k in range(51)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))
    k, total = 123, 1000  # BYOL's formula, written out
    byol = 1 - (1 - 0.996) * (math.cos(math.pi * k / total) + 1) / 2
    assert fastssl.momentum_schedule(k, total) == pytest.approx(byol, abs=1e-15)
    with pytest.raises(ValueError, match="step must be in"):
        fastssl.momentum_schedule(11, 10)
    with pytest.raises(ValueError, match="step must be in"):
        fastssl.momentum_schedule(-1, 10)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        fastssl.momentum_schedule(0, 0)
    with pytest.raises(ValueError, match="momentum must be in"):
        fastssl.momentum_schedule(0, 10, base=1.5)
    with pytest.raises(TypeError):
        fastssl.momentum_schedule(1.5, 10)


def test_momentum_encoder():
    online = _net()
    enc = fastssl.MomentumEncoder(online)
    for (n, p), (_, q) in zip(enc.module.named_parameters(), online.named_parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n
        assert not p.requires_grad and q.requires_grad
    y = enc(torch.randn(2, 3, 6, 6))
    assert not y.requires_grad
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in enc.module.parameters()]
    enc.update(online, 0.9)
    for b, p, q in zip(before, enc.module.parameters(), online.parameters()):
        assert rel_err(p, b.lerp(q.detach(), 0.1)) <= 1e-6
    with pytest.raises(TypeError, match="nn.Module"):
        fastssl.MomentumEncoder([torch.randn(3)])


# ------------------------------------------------------------------------------- queue


def _model_queue(size, dim, batches, p0=0):
    """A slow, obviously right model: write keys one by one."""
    buf = torch.zeros(size, dim)
    p = p0
    for keys in batches:
        for row in keys:
            buf[p] = row
            p = (p + 1) % size
    return buf, p


@pytest.mark.parametrize("backend", QUEUE_BACKENDS)
@pytest.mark.parametrize("size,dim,batches", [
    (7, 5, [3, 3, 3, 3, 1]),    # size not a multiple of B: wraps, loses nothing
    (8, 3, [4, 4, 4]),          # divides
    (5, 4, [12, 2, 5, 0, 6]),   # B > size keeps the newest `size`; B == size; B == 0
    (1, 3, [1, 2, 3]),          # a single slot
    (257, 130, [100, 100, 100]),  # dim not a power of two, > the Triton column block
])
def test_queue_matches_model(backend, size, dim, batches):
    q = fastssl.MoCoQueue(dim, size, init="zeros", backend=backend)
    official = torch.zeros(size, dim)
    official_ptr = torch.zeros((), dtype=torch.int64)
    keys = [torch.randn(b, dim) for b in batches]
    for k in keys:
        q.enqueue(k)
        reference.moco_enqueue_official_(official, official_ptr, k)
    want, p = _model_queue(size, dim, keys)
    assert torch.equal(q.buffer, want)
    assert torch.equal(official, want)
    assert q.ptr.dtype == torch.int64 and q.ptr.dim() == 0 and int(q.ptr) == p
    assert int(official_ptr) == p
    assert int(q._counter) == 0


@pytest.mark.parametrize("backend", QUEUE_BACKENDS)
def test_queue_dtypes_and_strided_keys(backend):
    q = fastssl.MoCoQueue(6, 10, dtype=torch.bfloat16, init="zeros", backend=backend)
    keys = torch.randn(6, 4).t()  # (4, 6), not contiguous; fp32 into a bf16 queue
    q.enqueue(keys)
    assert q.buffer.dtype == torch.bfloat16
    assert torch.equal(q.buffer[:4], keys.bfloat16())  # stored as given (no normalisation)
    assert torch.equal(q.buffer[4:], torch.zeros(6, 6, dtype=torch.bfloat16))
    x = torch.randn(3, 6, requires_grad=True)
    q.enqueue(x * 2)  # a key with a graph: detached
    assert not q.buffer.requires_grad


def test_queue_random_init_is_unit_norm():
    q = fastssl.MoCoQueue(16, 32)
    assert torch.allclose(q.buffer.norm(dim=1), torch.ones(32), atol=1e-6)
    assert q.buffer.shape == (32, 16) and int(q.ptr) == 0


@pytest.mark.parametrize("backend", QUEUE_BACKENDS)
def test_queue_state_round_trip(backend):
    q = fastssl.MoCoQueue(4, 9, backend=backend)
    q.enqueue(torch.randn(5, 4))
    state = q.state_dict()
    assert set(state) == {"buffer", "ptr"}
    r = fastssl.MoCoQueue(4, 9, init="zeros", backend=backend)
    r.load_state_dict(state)
    assert torch.equal(r.buffer, q.buffer) and int(r.ptr) == int(q.ptr) == 5
    k = torch.randn(7, 4)
    q.enqueue(k)
    r.enqueue(k)
    assert torch.equal(r.buffer, q.buffer) and int(r.ptr) == int(q.ptr) == 3
    bad = dict(state, ptr=torch.tensor(9))
    with pytest.raises(ValueError, match="outside"):
        r.load_state_dict(bad)
    with pytest.raises(ValueError, match="has shape"):
        r.load_state_dict(dict(state, buffer=torch.zeros(8, 4)))


@pytest.mark.skipif(not _ext.has_op("moco_enqueue_"), reason="no _C")
def test_queue_cpp_opcheck():
    buf, ptr, cnt = torch.randn(7, 3), torch.tensor(5), torch.zeros(1, dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastssl.moco_enqueue_, (buf, ptr, cnt, torch.randn(4, 3)))


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_queue_torch_compile_fullgraph(backend):
    if backend == "cpp" and not _ext.has_op("moco_enqueue_"):
        pytest.skip("no _C")
    torch._dynamo.reset()
    q = fastssl.MoCoQueue(8, 11, init="zeros", backend=backend)
    eager = fastssl.MoCoQueue(8, 11, init="zeros", backend=backend)

    def step(queue, query, key):
        logits = query @ queue.buffer.T  # read the negatives, then enqueue
        queue.enqueue(key)
        return logits

    compiled = torch.compile(step, fullgraph=True)
    for i in range(4):  # 4 x 5 keys into 11 slots: wraps twice
        query, key = torch.randn(5, 8), torch.randn(5, 8)
        out = compiled(q, query, key)
        want = step(eager, query, key)
        assert torch.allclose(out, want, atol=1e-6), i
        assert torch.equal(q.buffer, eager.buffer) and int(q.ptr) == int(eager.ptr), i


def test_queue_bad_inputs():
    q = fastssl.MoCoQueue(4, 8)
    with pytest.raises(ValueError, match="dim = 4 columns"):
        q.enqueue(torch.randn(3, 5))
    with pytest.raises(ValueError, match="must be 2-D"):
        q.enqueue(torch.randn(3, 4, 1))
    with pytest.raises(ValueError, match="must be 2-D"):
        q.enqueue(torch.randn(4))
    with pytest.raises(TypeError, match="floating-point"):
        q.enqueue(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        q.enqueue([[0.0] * 4])
    with pytest.raises(ValueError, match="queue is on cpu"):
        q.enqueue(torch.empty(3, 4, device="meta"))
    with pytest.raises(ValueError, match="size must be >= 1"):
        fastssl.MoCoQueue(4, 0)
    with pytest.raises(TypeError, match="dim must be an int"):
        fastssl.MoCoQueue(4.0, 8)
    with pytest.raises(TypeError, match="floating dtype"):
        fastssl.MoCoQueue(4, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="init must be"):
        fastssl.MoCoQueue(4, 8, init="ones")
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA"):
        fastssl.MoCoQueue(4, 8, backend="cuda")


# ------------------------------------------------------------------ distributed (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, backend, result):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)  # same keys on every rank, each takes its own slice
        keys = [torch.randn(world * 3, 4) for _ in range(3)]
        q = fastssl.MoCoQueue(4, 10, init="zeros", backend=backend)
        for k in keys:
            q.enqueue(k[rank * 3:(rank + 1) * 3], gather=True)
        result[rank] = (q.buffer.clone(), int(q.ptr))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["cpp"] if HAS_CPP else ["reference"])
def test_queue_gather_two_gloo_ranks(backend):
    import torch.multiprocessing as mp
    world = 2
    manager = mp.Manager()
    result = manager.dict()
    mp.spawn(_dist_worker, args=(world, _free_port(), backend, result), nprocs=world,
             join=True)
    torch.manual_seed(0)
    keys = [torch.randn(world * 3, 4) for _ in range(3)]
    single = fastssl.MoCoQueue(4, 10, init="zeros", backend=backend)
    for k in keys:
        single.enqueue(k)  # the concatenation of both ranks' keys, in rank order
    for r in range(world):
        buf, p = result[r]
        assert torch.equal(buf, single.buffer), r
        assert p == int(single.ptr) == (3 * world * 3) % 10
    manager.shutdown()


# ------------------------------------------------------------------ MomentumEncoder buffers


def _bn_pair():
    """(online, encoder copy made before the online BN statistics moved)."""
    online = _net()
    return online


@pytest.mark.parametrize("mode", ["ema", "copy", "frozen", True, False, None])
def test_momentum_encoder_buffer_modes(mode):
    online = _net()
    enc = fastssl.MomentumEncoder(online) if mode is None else \
        fastssl.MomentumEncoder(online, buffers=mode)
    enc.eval()  # an eval-mode EMA: its own forward passes never move its statistics
    online.train()(torch.randn(8, 3, 6, 6))  # moves the online running stats
    before = {n: b.clone() for n, b in enc.module.named_buffers()}
    on = dict(online.named_buffers())
    assert not torch.equal(before["1.running_mean"], on["1.running_mean"])
    enc.update(online, 0.9)
    effective = {None: "ema", True: "ema", False: "frozen"}.get(mode, mode)
    for name, b in enc.module.named_buffers():
        if effective == "frozen":
            want = before[name]
        elif effective == "copy" or not b.is_floating_point():
            want = on[name]  # num_batches_tracked is copied under "ema" too
        else:  # ema: 0.9 * mine + 0.1 * online, in fp64
            want = (0.9 * before[name].double() + 0.1 * on[name].double()).to(b.dtype)
        assert rel_err(b, want) <= 1e-6 if b.is_floating_point() else torch.equal(b, want), \
            (mode, name)
    if effective != "frozen":
        assert not torch.equal(enc.module[1].running_mean, before["1.running_mean"])


def test_momentum_encoder_default_is_ema_of_buffers():
    # timm ModelEmaV3's default (an EMA of the whole state_dict): documented in the docstring.
    assert fastssl.MomentumEncoder(_net()).buffers_mode == "ema"


@pytest.mark.parametrize("bad,exc", [("all", ValueError), (1, TypeError), ("EMA", ValueError)])
def test_momentum_encoder_bad_buffers(bad, exc):
    with pytest.raises(exc, match="buffers must be one of"):
        fastssl.MomentumEncoder(_net(), buffers=bad)


@pytest.mark.parametrize("backend", QUEUE_BACKENDS)
@pytest.mark.parametrize("ptr", [7, -1, 5])
def test_queue_corrupted_ptr_is_the_same_clear_error(backend, ptr):
    q = fastssl.MoCoQueue(4, 5, init="zeros", backend=backend)
    q.ptr.fill_(ptr)
    before = q.buffer.clone()
    with pytest.raises(ValueError, match=r"MoCoQueue.ptr = -?\d+ is outside \[0, size = 5\)"):
        q.enqueue(torch.ones(2, 4))
    assert torch.equal(q.buffer, before)  # nothing written


def test_queue_replaced_ptr_of_wrong_kind():
    q = fastssl.MoCoQueue(4, 5, init="zeros", backend="reference")
    q.ptr = torch.tensor(1.0)
    with pytest.raises(ValueError, match="0-dim int64"):
        q.enqueue(torch.ones(2, 4))


def test_queue_ptr_check_under_compile():
    q = fastssl.MoCoQueue(4, 5, init="zeros", backend="reference")
    f = torch.compile(q.enqueue, fullgraph=True, backend="eager")
    f(torch.ones(2, 4))
    assert int(q.ptr) == 2
    q.ptr.fill_(9)
    with pytest.raises(RuntimeError, match="MoCoQueue.ptr is outside"):
        f(torch.ones(2, 4))


def test_queue_ptr_error_under_compile_leaves_grad_mode_on():
    # The check runs before enqueue's no_grad region: a traced no_grad region that raises
    # would leave grad mode disabled for the rest of the process.
    q = fastssl.MoCoQueue(4, 5, init="zeros", backend="reference")
    f = torch.compile(q.enqueue, fullgraph=True, backend="eager")
    q.ptr.fill_(9)
    with pytest.raises(RuntimeError, match="MoCoQueue.ptr is outside"):
        f(torch.ones(2, 4))
    assert torch.is_grad_enabled()
