"""fastssl.masked_token_loss (BERT MLM head, streamed over the vocabulary) vs fp64 truths.

Both kernels (C++; Triton under the interpreter) against the fp64 reference (F.linear +
F.cross_entropy) on the same dtype-rounded inputs: per-row losses and the gradients of hidden,
weight and bias under a random grad_out, with plain PyTorch's own error in the test dtype as
the tolerance (tests/helpers.py). Shapes: P in {1, 3, 257}, H in {3, 200, 300}, V in {1, 7, 1000}
(not multiples of any tile).
"""
import contextlib

import pytest
import torch

import fastssl
from fastssl import _ext, reference
from helpers import assert_close_to_truth, first_mismatches, kernels

needs_cpp = pytest.mark.skipif(not _ext.available(), reason=f"no _C: {_ext.why_unavailable()}")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100


def _inputs(p, h, v, *, bias=True, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(p, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5 * 2
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (p,), generator=g)
    for i in ignored:
        labels[i] = IGNORE
    return hidden, weight, b, labels


def _run(fn, hidden, weight, bias, labels, dtype, grad_out, **kw):
    xs = [t.to(dtype).detach().clone().requires_grad_() if t is not None else None
          for t in (hidden, weight, bias)]
    out = fn(xs[0], xs[1], labels, bias=xs[2], reduction="none", **kw)
    (out * grad_out.to(out.dtype)).sum().backward()
    return [out.detach()] + [x.grad if x is not None else None for x in xs]


def _check(backend, hidden, weight, bias, labels, dtype):
    go = torch.rand(labels.shape, dtype=torch.float64) + 0.5
    rounded = [t.to(dtype).double() if t is not None else None for t in (hidden, weight, bias)]
    fused = _run(lambda *a, **k: fastssl.masked_token_loss(*a, backend=backend, **k),
                 *rounded, labels, dtype, go)
    truth = _run(reference.masked_token_loss, *rounded, labels, torch.float64, go)
    lowp = _run(reference.masked_token_loss, *rounded, labels, dtype, go)
    for name, f, t, lp in zip(("loss", "dhidden", "dweight", "dbias"), fused, truth, lowp):
        if t is None:
            assert f is None
            continue
        assert f.dtype == dtype, f"{name}: dtype {f.dtype}"
        assert_close_to_truth(f"masked_token_loss {name}", f, t, lp, dtype)
    return fused


SHAPES = [(1, 3, 7), (3, 200, 1), (3, 300, 1000), (257, 3, 7), (257, 200, 1000)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p,h,v", SHAPES)
def test_rows_and_gradients_vs_fp64(p, h, v, dtype, backend):
    if backend == "triton" and p * h * v > 10_000_000 and dtype != torch.float32:
        pytest.skip("interpreter time: the largest shape runs in fp32 only")
    ignored = [1] if p > 2 else []
    _check(backend, *_inputs(p, h, v, bias=(p + v) % 2 == 0, ignored=ignored), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_bias_and_ignored_rows(backend, bias):
    hidden, weight, b, labels = _inputs(41, 70, 130, bias=bias, ignored=[0, 5, 6, 40])
    fused = _check(backend, hidden, weight, b, labels, torch.float32)
    ignored = labels == IGNORE
    assert torch.count_nonzero(fused[0][ignored]) == 0
    assert torch.count_nonzero(fused[1][ignored]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_time_layout_and_reductions(backend):
    """hidden (B, T, H) with labels (B, T) equals the same rows flattened; mean over the
    non-ignored positions, sum, none (labels' shape, 0 where ignored)."""
    hidden, weight, b, labels = _inputs(2 * 9, 33, 50, ignored=range(0, 18, 2))
    h3, y2 = hidden.float().reshape(2, 9, 33), labels.reshape(2, 9)
    w, bb = weight.float(), b.float()
    none = fastssl.masked_token_loss(h3, w, y2, bias=bb, reduction="none", backend=backend)
    assert none.shape == (2, 9)
    want = reference.masked_token_loss(h3.double(), w.double(), y2, bias=bb.double(),
                                       reduction="none")
    torch.testing.assert_close(none.double(), want, rtol=1e-5, atol=1e-5)
    mean = fastssl.masked_token_loss(h3, w, y2, bias=bb, backend=backend)
    torch.testing.assert_close(mean.double(), want.sum() / 9, rtol=1e-5, atol=1e-6)
    total = fastssl.masked_token_loss(h3, w, y2, bias=bb, reduction="sum", backend=backend)
    torch.testing.assert_close(total.double(), want.sum(), rtol=1e-5, atol=1e-5)
    # the plain-PyTorch definition, with at least one position kept
    f = torch.nn.functional
    torch.testing.assert_close(mean, f.cross_entropy(f.linear(h3.reshape(-1, 33), w, bb),
                                                     y2.reshape(-1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_is_zero_with_zero_gradient(backend):
    """The documented choice: every position ignored -> 0 (F.cross_entropy: NaN) and a zero
    gradient, so one batch without masked tokens cannot poison the weights."""
    hidden = torch.randn(2, 5, 12, requires_grad=True)
    weight = torch.randn(20, 12, requires_grad=True)
    bias = torch.randn(20, requires_grad=True)
    labels = torch.full((2, 5), IGNORE)
    loss = fastssl.masked_token_loss(hidden, weight, labels, bias=bias, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    for t in (hidden, weight, bias):
        assert torch.count_nonzero(t.grad) == 0
    ref = reference.masked_token_loss(hidden, weight, labels, bias=bias)
    assert ref.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_inside_the_vocabulary(backend):
    # ignore_index = 0 (a [PAD] id) is a valid column too: rows labelled 0 are skipped, and
    # column 0 still takes part in every other row's log-sum-exp.
    hidden, weight, b, labels = _inputs(9, 16, 11)
    labels[[2, 3]] = 0
    hf, wf = hidden.float(), weight.float()
    out = fastssl.masked_token_loss(hf, wf, labels, ignore_index=0, reduction="none",
                                    backend=backend)
    want = reference.masked_token_loss(hidden, weight, labels, ignore_index=0, reduction="none")
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert out[2] == 0 and out[3] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits(backend):
    # Logits of several hundred: no fixed-max shortcut, the online max keeps exp in range.
    hidden, weight, b, labels = _inputs(5, 24, 90, bias=False)
    _check(backend, hidden * 30, weight, None, labels, torch.float32)


@needs_cpp
def test_cpp_equals_triton_interpreter():
    hidden, weight, b, labels = _inputs(19, 45, 77, ignored=[3])
    args = (hidden.float(), weight.float(), b.float())
    outs = []
    for be in ("cpp", "triton"):
        ctx = kernels(be)
        with ctx:
            xs = [t.detach().clone().requires_grad_() for t in args]
            loss = fastssl.masked_token_loss(xs[0], xs[1], labels, bias=xs[2], backend=be)
            loss.backward()
            outs.append([loss.detach()] + [x.grad for x in xs])
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c, rtol=2e-5, atol=1e-6)


@needs_cpp
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_thread_count_does_not_change_bits(reduction):
    # "mean": gradients formed in the forward (two row blocks of 256 and 42 rows, 3 vocabulary
    # tiles in 2 splits); "none": the forward, then the recomputing backward.
    hidden, weight, b, labels = _inputs(300, 40, 1100, ignored=[7, 8])
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            xs = [t.float().requires_grad_() for t in (hidden, weight, b)]
            loss = fastssl.masked_token_loss(xs[0], xs[1], labels, bias=xs[2], backend="cpp",
                                             reduction=reduction)
            loss.sum().backward()
            outs.append([loss.detach()] + [x.grad for x in xs])
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(outs[0], other))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    hidden, weight = torch.randn(6, 10, requires_grad=True), torch.randn(13, 10, requires_grad=True)
    bias = torch.randn(13, requires_grad=True)
    labels = torch.tensor([3, -100, 12, 0, 5, -100])
    with kernels(backend):
        torch.library.opcheck(torch.ops.fastssl.masked_token_loss_fwd,
                              (hidden, weight, bias, labels, -100))
        torch.library.opcheck(torch.ops.fastssl.masked_token_loss_fwd,
                              (hidden, weight, None, labels, -100))
        for b in (bias, None):
            torch.library.opcheck(torch.ops.fastssl.masked_token_loss_sum,
                                  (hidden, weight, b, labels, -100))
    # The scaling ops of its backward (plain tensors: the forward's gradients have no history).
    g, dh, dw = torch.tensor(1.5), torch.randn(6, 10), torch.randn(13, 10)
    for db in (torch.randn(13), torch.zeros(0)):
        torch.library.opcheck(torch.ops.fastssl.masked_token_loss_sum_bwd_, (g, dh, dw, db))
    for dt in DTYPES:
        h, w, b = (t.detach().to(dt) for t in (hidden, weight, bias))
        torch.library.opcheck(torch.ops.fastssl.masked_token_loss_sum_bwd,
                              (g, h, w, b, dh, dw, torch.randn(13)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    hidden, weight, b, labels = _inputs(3 * 4, 20, 30, ignored=[0, 4])
    args = [t.float().reshape(3, 4, 20) if t is hidden else t.float() for t in (hidden, weight, b)]
    y = labels.reshape(3, 4)
    fn = lambda h, w, bb: fastssl.masked_token_loss(h, w, y, bias=bb, backend=backend)  # noqa
    a = [t.clone().requires_grad_() for t in args]
    c = [t.clone().requires_grad_() for t in args]
    eager = fn(*a)
    eager.backward()
    compiled = torch.compile(fn, fullgraph=True)(*c)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for x, z in zip(a, c):
        torch.testing.assert_close(z.grad, x.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend):
    hidden = torch.randn(4, 6, requires_grad=True)
    loss = fastssl.masked_token_loss(hidden, torch.randn(9, 6), torch.tensor([1, 2, 3, 4]),
                                     backend=backend)
    (g,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((g * g).sum(), hidden)


def test_float64_runs_the_reference_and_meta_gives_shapes():
    h, w = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 3, -100])
    assert fastssl.masked_token_loss(h, w, y).dtype == torch.float64
    hm, wm = torch.randn(2, 7, 8, device="meta"), torch.randn(50, 8, device="meta")
    ym = torch.zeros(2, 7, dtype=torch.long, device="meta")
    assert fastssl.masked_token_loss(hm, wm, ym, reduction="none").shape == (2, 7)
    assert fastssl.masked_token_loss(hm, wm, ym).shape == ()


def test_bad_inputs():
    h, w, b = torch.randn(2, 5, 8), torch.randn(30, 8), torch.randn(30)
    y = torch.randint(0, 30, (2, 5))
    with pytest.raises(ValueError, match=r"weight must be \(V, H\) with H = 8"):
        fastssl.masked_token_loss(h, w[:, :7], y)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 5\)"):
        fastssl.masked_token_loss(h, w, y.reshape(-1))
    with pytest.raises(ValueError, match=r"bias must be \(V,\) = \(30,\)"):
        fastssl.masked_token_loss(h, w, y, bias=b[:29])
    with pytest.raises(TypeError, match="same dtype"):
        fastssl.masked_token_loss(h, w.half(), y)
    with pytest.raises(TypeError, match="same dtype"):
        fastssl.masked_token_loss(h, w, y, bias=b.double())
    with pytest.raises(TypeError, match="integer"):
        fastssl.masked_token_loss(h, w, y.float())
    with pytest.raises(TypeError, match="floating-point"):
        fastssl.masked_token_loss(h.long(), w.long(), y)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fastssl.masked_token_loss(h, w, y, ignore_index=-100.0)
    with pytest.raises(ValueError, match="reduction"):
        fastssl.masked_token_loss(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match=r"H >= 1"):
        fastssl.masked_token_loss(h[..., :0], w[:, :0], y)
    bad = y.clone()
    bad[1, 2] = 30
    with pytest.raises(ValueError, match=r"labels must be in \[0, 30\).*got 30"):
        fastssl.masked_token_loss(h, w, bad)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match=r"got -1"):
        fastssl.masked_token_loss(h, w, bad)


def test_bad_labels_under_compile_raise_without_a_host_read():
    """torch.compile (and CUDA) check the label range with torch._assert_async: the compiled
    graph raises a RuntimeError naming the problem, with no graph break."""
    torch._dynamo.reset()
    h, w = torch.randn(4, 8), torch.randn(30, 8)
    fn = torch.compile(lambda hh, ww, yy: fastssl.masked_token_loss(hh, ww, yy),
                       fullgraph=True)
    assert torch.isfinite(fn(h, w, torch.tensor([1, 2, -100, 29])))
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 30\)"):
        fn(h, w, torch.tensor([1, 2, -100, 30]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_dtypes(backend):
    hidden, weight, b, labels = _inputs(6, 9, 40, ignored=[2])
    h, w = hidden.float(), weight.float()
    want = fastssl.masked_token_loss(h, w, labels, backend=backend)
    for dt in (torch.int32, torch.int16):
        got = fastssl.masked_token_loss(h, w, labels.to(dt), backend=backend)
        torch.testing.assert_close(got, want)


def _run_scalar(fn, hidden, weight, bias, labels, dtype, reduction, **kw):
    xs = [t.to(dtype).detach().clone().requires_grad_() if t is not None else None
          for t in (hidden, weight, bias)]
    out = fn(xs[0], xs[1], labels, bias=xs[2], reduction=reduction, **kw)
    (out * 1.375).backward()
    return [out.detach()] + [x.grad if x is not None else None for x in xs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p,h,v", [(1, 3, 7), (3, 300, 1000), (257, 200, 1000)])
def test_scalar_loss_gradients_from_the_forward_vs_fp64(p, h, v, dtype, reduction, backend):
    """reduction "mean" / "sum" under autograd: masked_token_loss_sum forms the gradients in
    the forward (C++: 257 valid rows are two row blocks of the whole vocabulary), the backward
    scales them by the upstream scalar; loss and gradients against the fp64 truth."""
    if backend == "triton" and p * h * v > 10_000_000 and dtype != torch.float32:
        pytest.skip("interpreter time: the largest shape runs in fp32 only")
    hidden, weight, b, labels = _inputs(p, h, v, bias=p != 3, ignored=[1] if p > 2 else [])
    rounded = [t.to(dtype).double() if t is not None else None for t in (hidden, weight, b)]
    with kernels(backend):
        fused = _run_scalar(lambda *a, **k: fastssl.masked_token_loss(*a, backend=backend, **k),
                            *rounded, labels, dtype, reduction)
    truth = _run_scalar(reference.masked_token_loss, *rounded, labels, torch.float64, reduction)
    lowp = _run_scalar(reference.masked_token_loss, *rounded, labels, dtype, reduction)
    for name, f, t, lp in zip(("loss", "dhidden", "dweight", "dbias"), fused, truth, lowp):
        if t is None:
            assert f is None
            continue
        assert f.dtype == dtype, f"{name}: dtype {f.dtype}"
        assert_close_to_truth(f"masked_token_loss {reduction} {name}", f.reshape(t.shape), t,
                              lp, dtype)


@needs_cpp
def test_scalar_loss_past_the_logits_block_budget_takes_two_passes():
    # V = 530,000: not even 16 rows of logits fit the C++ block budget (8 Mi floats), so the
    # gradients come from the forward + recomputing backward inside the op; same contract.
    hidden, weight, b, labels = _inputs(5, 3, 530_000, ignored=[2])
    fused = _run_scalar(lambda *a, **k: fastssl.masked_token_loss(*a, backend="cpp", **k),
                        hidden, weight, b, labels, torch.float32, "mean")
    truth = _run_scalar(reference.masked_token_loss, hidden, weight, b, labels, torch.float64,
                        "mean")
    lowp = _run_scalar(reference.masked_token_loss, hidden, weight, b, labels, torch.float32,
                       "mean")
    for name, f, t, lp in zip(("loss", "dhidden", "dweight", "dbias"), fused, truth, lowp):
        assert_close_to_truth(f"masked_token_loss two-pass {name}", f, t, lp, torch.float32)


@needs_cpp
def test_scalar_loss_does_not_recompute_in_the_backward():
    """With a gradient needed and a scalar reduction, the forward runs masked_token_loss_sum
    and the backward only its scaling op (no masked_token_loss_bwd: no logit recompute)."""
    hidden, weight, b, labels = _inputs(7, 10, 30, ignored=[2])
    xs = [t.float().requires_grad_() for t in (hidden, weight, b)]
    called = []

    new_big = []  # backward ops that return a new tensor of hidden's or weight's size

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            called.append(str(func.overloadpacket))
            out = func(*args, **(kwargs or {}))
            ins = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves(
                (args, kwargs)) if isinstance(a, torch.Tensor)}
            for o in torch.utils._pytree.tree_leaves(out):
                if (isinstance(o, torch.Tensor) and o.numel() >= xs[0].numel()
                        and o.untyped_storage().data_ptr() not in ins):
                    new_big.append(called[-1])
            return out

    with Spy():
        loss = fastssl.masked_token_loss(xs[0], xs[1], labels, bias=xs[2], backend="cpp")
        n_forward = len(called)
        new_big.clear()
        loss.backward()
    ours = [c for c in called if "masked_token" in c]
    # fp32: the saved gradients are scaled in place and become the .grad tensors (no copy).
    assert ours == ["fastssl.masked_token_loss_sum", "fastssl.masked_token_loss_sum_bwd_"], ours
    assert not new_big, new_big
    # Nor zero-filled gradients for the op's gradient outputs (a [V, H] fp32 buffer each step).
    zeros = [c for c in called[n_forward:] if "zero" in c or "full" in c]
    assert not zeros, zeros
    with torch.no_grad():  # no gradient needed: the loss-only forward
        called.clear()
        with Spy():
            fastssl.masked_token_loss(xs[0], xs[1], labels, bias=xs[2], backend="cpp")
        assert [c for c in called if "masked_token" in c] == ["fastssl.masked_token_loss_fwd"]


def _scalar_step(backend, dtype, reduction, *, prior=None, grad_only=False):
    """(loss * 1.375).backward() through the public function: the gradients of hidden, weight
    and bias (weight.grad starting at ``prior``). ``grad_only``: torch.autograd.grad with
    create_graph=True instead, which takes the out-of-place scaling (the backward before the
    in-place one), with ``prior`` added as AccumulateGrad would."""
    hidden, weight, b, labels = _inputs(41, 70, 130, ignored=[0, 5])
    xs = [t.to(dtype).requires_grad_() for t in (hidden, weight, b)]
    if prior is not None and not grad_only:
        xs[1].grad = prior.clone()
    with kernels(backend):
        loss = fastssl.masked_token_loss(xs[0], xs[1], labels, bias=xs[2], backend=backend,
                                         reduction=reduction) * 1.375
        if grad_only:
            grads = [g.detach() for g in torch.autograd.grad(loss, xs, create_graph=True)]
            if prior is not None:
                grads[1] = prior + grads[1]
            return grads
        loss.backward()
    return [x.grad for x in xs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_backward_gives_the_out_of_place_bits(backend, dtype, reduction):
    """fp32: the backward scales the forward's gradients in place; bf16 / fp16: a new tensor
    in the dtype. Both give the bits of the out-of-place scaling (fp32 product, one rounding),
    under an upstream gradient != 1 and with weight.grad accumulating onto an earlier one."""
    prior = torch.randn(130, 70).to(dtype)
    for p in (None, prior):
        got = _scalar_step(backend, dtype, reduction, prior=p)
        want = _scalar_step(backend, dtype, reduction, prior=p, grad_only=True)
        for name, a, c in zip(("hidden", "weight", "bias"), got, want):
            assert a.dtype == dtype
            assert torch.equal(a, c), f"{name}: {first_mismatches(a, c, 0.0)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_grads_are_the_saved_buffers(backend):
    """The gradients formed in the forward become hidden.grad / weight.grad / bias.grad
    themselves: AccumulateGrad takes the scaled buffers (no copy; BERT-base: 107 MB)."""
    hidden, weight, b, labels = _inputs(9, 16, 40, ignored=[3])
    xs = [t.float().requires_grad_() for t in (hidden, weight, b)]
    with kernels(backend):
        loss = fastssl.masked_token_loss(xs[0], xs[1], labels, bias=xs[2], backend=backend)
        node = loss.grad_fn
        while "masked_token_loss_sum" not in type(node).__name__:
            node = node.next_functions[0][0]
        saved = [t.data_ptr() for t in node.saved_tensors[3:]]
        (loss * 0.75).backward()
    assert [x.grad.data_ptr() for x in xs] == saved


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_second_backward_with_retain_graph(backend, dtype):
    """fp32: the first backward consumed the saved gradients (scaled in place), so a second
    backward through the same graph raises, naming the op and retain_graph, instead of scaling
    them again; bf16 / fp16 scale into new tensors, so it runs and accumulates."""
    hidden, weight, b, labels = _inputs(9, 16, 40, ignored=[3])
    xs = [t.to(dtype).requires_grad_() for t in (hidden, weight, b)]
    with kernels(backend):
        loss = fastssl.masked_token_loss(xs[0], xs[1], labels, bias=xs[2], backend=backend)
        (loss * 2).backward(retain_graph=True)
        first = [x.grad.clone() for x in xs]
        if dtype == torch.float32:
            with pytest.raises(RuntimeError, match="masked_token_loss.*retain_graph=True"):
                (loss * 2).backward()
            assert all(torch.equal(x.grad, f) for x, f in zip(xs, first))
        else:
            (loss * 2).backward()
            assert all(torch.equal(x.grad, 2 * f) for x, f in zip(xs, first))
    rounded = [t.to(dtype).double() for t in (hidden, weight, b)]
    want = _run_scalar(reference.masked_token_loss, *rounded, labels, torch.float64, "mean")
    lowp = _run_scalar(reference.masked_token_loss, *rounded, labels, dtype, "mean")
    for name, f, t, lp in zip(("dhidden", "dweight", "dbias"), first, want[1:], lowp[1:]):
        assert_close_to_truth(f"masked_token_loss retain_graph {name}", f / 2, t / 1.375,
                              lp / 1.375, dtype)


def test_a_caller_holding_the_op_outputs_keeps_them():
    """Called directly, the op returns its gradients to the caller: while the caller holds
    them, the backward scales into new tensors and leaves them as they were."""
    hidden, weight, b, labels = _inputs(9, 16, 40, ignored=[3])
    xs = [t.float().requires_grad_() for t in (hidden, weight, b)]
    kernel = "cpp" if _ext.available() else "triton"
    with kernels(kernel):
        loss, dh, dw, db = torch.ops.fastssl.masked_token_loss_sum(*xs, labels, IGNORE)
        kept = [t.detach().clone() for t in (dh, dw, db)]
        (loss * 3).backward()
    assert all(torch.equal(t, k) for t, k in zip((dh, dw, db), kept))
    for x, k in zip(xs, kept):
        torch.testing.assert_close(x.grad, 3 * k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_scaling_in_chunks_equals_one_rounding(dtype):
    """bf16 / fp16 gradients are written a chunk at a time (no whole fp32 product): the same
    bits as (d * g).to(dtype), across chunk boundaries (dweight of 1.5 chunks)."""
    from fastssl.ops import masked_token_loss as mtl
    v = mtl._CAST_CHUNK * 3 // 2 // 64 + 1
    g = torch.tensor(0.3)
    dh, dw, db = torch.randn(5, 64), torch.randn(v, 64), torch.randn(v)
    h, w, b = torch.zeros(5, 64, dtype=dtype), torch.zeros(v, 64, dtype=dtype), None
    got = torch.ops.fastssl.masked_token_loss_sum_bwd(g, h, w, b, dh, dw, db)
    for a, d in zip(got, (dh, dw, db)):
        assert a.dtype == dtype and torch.equal(a, (d * g).to(dtype))
