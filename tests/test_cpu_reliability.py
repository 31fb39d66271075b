"""Reliability of the C++ CPU kernels (issue 10, points 2, 3 and 8):

* results bitwise independent of ``torch.set_num_threads`` (1, 2, 3, 4), losses and every
  gradient, for every loss: nt_xent (plain, decoupled), info_nce (MoCo queue, in-batch),
  clip_loss, supcon and the rows-vs-gathered-columns kernel behind every ``gather=True`` loss;
* overflow-safe normalisation: rows of 1e19 .. 1e30 (one huge row, or all rows) in fp32 and
  bf16 match an fp64 truth (the squared norm of such a row overflows fp32);
* the positive logit read from the tile arithmetic: no negative NT-Xent row where plain
  PyTorch gives exactly 0, and SupCon's positive term as accurate as plain fp32 PyTorch.

All through the public functions with ``backend="cpp"``.
"""
from __future__ import annotations

import pytest
import torch

import fastssl
from fastssl import _ext, functional, reference
from helpers import FACTOR, ULP, assert_close_to_truth, rel_err

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension: "
                                f"{_ext.why_unavailable()}")

THREADS = (1, 2, 3, 4)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------
# Every loss as (inputs that get a gradient, a function of them), at shapes with several
# 256-row tiles per side (so that thread splits, chunks and merges are all exercised) and odd
# sizes on purpose.
# ---------------------------------------------------------------------------------------

def _cases():
    g = torch.Generator().manual_seed(1234)

    def rn(*shape):
        return torch.randn(*shape, generator=g)

    n, d = 301, 40                       # 2N = 602: 3 row blocks, a partial one
    z1, z2 = rn(n, d), rn(n, d)
    q, k, queue = rn(300, d), rn(300, d), rn(1100, d)
    img, txt = rn(520, d), rn(520, d)
    feats, labels = rn(530, d), torch.randint(0, 7, (530,), generator=g)
    # gather=True's kernel: 2N local rows vs the [z1; z2] of 3 ranks, self and target masked
    # (decoupled), as functional._nt_xent_gathered builds them for rank 1.
    loc, world = rn(2 * 150, d), rn(3 * 2 * 150, d)
    a = torch.arange(300)
    base = 300
    target, self_idx = base + (a + 150) % 300, base + a

    def t(v):
        return torch.tensor(v, requires_grad=True)

    return {
        "nt_xent": ([z1, z2, t(0.2)], lambda a, b, tt: fastssl.nt_xent(
            a, b, tt, reduction="none", backend="cpp")),
        "nt_xent_decoupled": ([z1, z2, t(0.2)], lambda a, b, tt: fastssl.nt_xent(
            a, b, tt, reduction="none", decoupled=True, backend="cpp")),
        "info_nce_queue": ([q, k, t(0.07)], lambda a, b, tt: fastssl.info_nce(
            a, b, queue, tt, reduction="none", backend="cpp")),
        "info_nce_in_batch": ([q, k, t(0.07)], lambda a, b, tt: fastssl.info_nce(
            a, b, None, tt, reduction="none", backend="cpp")),
        "clip_loss": ([img, txt, t(14.0)], lambda a, b, s: fastssl.clip_loss(
            a, b, s, backend="cpp")),
        "supcon": ([feats, t(0.1)], lambda a, tt: fastssl.supcon(a, labels, tt, backend="cpp")),
        # No process group here, so gather=True takes the local path; the gathered kernel is
        # reached through the one function every gather=True loss calls.
        "gather_xent": ([loc, world, t(0.2)], lambda a, b, tt: functional._rows_vs_columns(
            a, b, tt, target, self_idx, normalize=True, mask_target=True, backend="cpp",
            op="nt_xent", invert=True)),
    }


def _run(inputs, fn, threads):
    torch.set_num_threads(threads)
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    gen = torch.Generator().manual_seed(7)
    upstream = torch.rand(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad(out, xs, upstream)
    return [out.detach()] + list(grads)


@pytest.mark.parametrize("name", list(_cases()))
def test_bitwise_equal_across_thread_counts(name, restore_threads):
    inputs, fn = _cases()[name]
    results = {t: _run(inputs, fn, t) for t in THREADS}
    labels = ["loss"] + [f"grad[{i}]" for i in range(len(inputs))]
    for t in THREADS[1:]:
        for label, a, b in zip(labels, results[1], results[t]):
            diff = (a.double() - b.double()).abs().max().item()
            same = torch.equal(a, b)
            assert same, (f"{name} {label}: {t} threads differ from 1 thread "
                                       f"(max |diff| {diff:.3g})")


# ---------------------------------------------------------------------------------------
# Overflow-safe normalisation
# ---------------------------------------------------------------------------------------

def _overflow_cases(n, d, gen):
    """name -> (fp64 masters of the differentiable inputs, extra fixed inputs, fn(*xs, *extra)
    running the loss on any dtype with the given backend)."""
    def rn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    labels = torch.arange(n) % 3
    return {
        "nt_xent": ([rn(n, d), rn(n, d)], [], lambda a, b, be: fastssl.nt_xent(
            a, b, 0.1, reduction="none", backend=be)),
        "info_nce_queue": ([rn(n, d), rn(n, d), rn(3 * n, d)], [],
                           lambda a, b, u, be: fastssl.info_nce(
                               a, b, u.detach(), 0.1, reduction="none", backend=be)),
        "info_nce_in_batch": ([rn(n, d), rn(n, d)], [], lambda a, b, be: fastssl.info_nce(
            a, b, None, 0.1, reduction="none", backend=be)),
        "clip_loss": ([rn(n, d), rn(n, d)], [], lambda a, b, be: fastssl.clip_loss(
            a, b, 10.0, backend=be)),
        "supcon": ([rn(n, d)], [labels], lambda a, y, be: fastssl.supcon(a, y, 0.1,
                                                                       backend=be)),
    }


def _loss_and_grads(fn, xs, extra, backend):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs, *extra, backend)
    grads = torch.autograd.grad(out.sum(), xs, allow_unused=True)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [1e19, 1e20, 1e30])
@pytest.mark.parametrize("which", ["one_row", "all_rows"])
@pytest.mark.parametrize("name", ["nt_xent", "info_nce_queue", "info_nce_in_batch",
                                  "clip_loss", "supcon"])
def test_huge_rows_match_fp64_truth(name, which, scale, dtype):
    gen = torch.Generator().manual_seed(5)
    masters, extra, fn = _overflow_cases(37, 29, gen)[name]
    unit = [m.to(dtype) for m in masters]          # the directions, in the test dtype
    huge = []
    for u in unit:
        h = u.double()
        if which == "one_row":
            h[3] = h[3] * scale
        else:
            h = h * scale
        huge.append(h.to(dtype))                   # representable: fp32/bf16 max ~3.4e38
    assert all(torch.isfinite(h).all() for h in huge)
    # Truth: fp64 on the very values the kernel gets. Tolerance: plain PyTorch's own error in
    # `dtype` on the same directions at scale 1 (normalisation makes the loss scale-free).
    truth, truth_g = _loss_and_grads(fn, [h.double() for h in huge], extra, "reference")
    unit_truth, unit_truth_g = _loss_and_grads(fn, [u.double() for u in unit], extra,
                                               "reference")
    unit_lowp, unit_lowp_g = _loss_and_grads(fn, unit, extra, "reference")
    out, out_g = _loss_and_grads(fn, huge, extra, "cpp")
    tol = FACTOR * rel_err(unit_lowp, unit_truth) + ULP[dtype]
    assert_close_to_truth(f"{name} loss", out, truth, None, dtype, abs_tol=tol)
    for i, (go, gt, gu, gul) in enumerate(zip(out_g, truth_g, unit_truth_g, unit_lowp_g)):
        if gt is None:
            continue
        gtol = FACTOR * rel_err(gul, gu) + ULP[dtype]
        assert_close_to_truth(f"{name} grad[{i}]", go, gt, None, dtype, abs_tol=gtol)


# ---------------------------------------------------------------------------------------
# Positive terms from the tile arithmetic
# ---------------------------------------------------------------------------------------

def test_no_negative_ntxent_rows_with_correlated_views():
    # 2N = 514, D = 200, tau = 0.01, the two views nearly equal: the positive dominates every
    # row, loss_i = LSE_i - S_i,t(i) ~ 0 and is >= 0 in exact arithmetic. Plain PyTorch gives
    # exactly 0 on such rows; a positive logit computed apart from the LSE's tile gave
    # negative rows (down to -3e-5 on 208 of 514).
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(257, 200, generator=gen)
    z2 = z1 + 1e-3 * torch.randn(257, 200, generator=gen)
    for decoupled in (False,):
        rows = fastssl.nt_xent(z1, z2, 0.01, reduction="none", backend="cpp",
                               decoupled=decoupled)
        neg = (rows < 0).sum().item()
        assert neg == 0, f"{neg} of {rows.numel()} rows negative (min {rows.min().item():.3g})"
    truth = reference.nt_xent(z1.double(), z2.double(), 0.01, reduction="none")
    lowp = reference.nt_xent(z1, z2, 0.01, reduction="none")
    assert_close_to_truth("nt_xent rows", rows, truth, lowp, torch.float32,
                          abs_tol=FACTOR * (lowp.double() - truth).abs().max().item() + 1e-6)


def test_supcon_positive_term_as_accurate_as_plain_fp32():
    # N = 3, D = 3, tau = 0.01 (logits ~ 100), one pair of positives: where the loss is small
    # (1e-4 .. 1), a positive term formed from class sums (alpha zhat_i . (L_c - zhat_i))
    # lost ~ulp(100) absolute, i.e. up to 7e-2 relative, where plain fp32 PyTorch
    # (log_softmax) errs up to 7e-3. Worst case over random draws, relative to each truth.
    y = torch.tensor([0, 0, 1])
    worst, worst_ref, cases = 0.0, 0.0, 0
    for seed in range(400):
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(3, 3, generator=gen)
        truth = reference.supcon(z.double(), y, 0.01).item()
        if not 1e-4 < abs(truth) < 1.0:
            continue
        cases += 1
        out = fastssl.supcon(z, y, 0.01, backend="cpp").item()
        lowp = reference.supcon(z, y, 0.01).item()
        worst = max(worst, abs(out - truth) / abs(truth))
        worst_ref = max(worst_ref, abs(lowp - truth) / abs(truth))
    assert cases >= 10, f"only {cases} draws with a small loss"
    assert worst <= FACTOR * worst_ref, (
        f"supcon: worst relative error {worst:.3g} over {cases} small losses, plain fp32 "
        f"PyTorch {worst_ref:.3g}")


def test_supcon_small_tau_gradients_as_accurate_as_plain_fp32():
    # The same draws as above (the positive term of the gradient is formed in the tiles too):
    # worst relative gradient error over the draws with a small loss, against plain fp32.
    y = torch.tensor([0, 0, 1])
    worst, worst_ref, cases = 0.0, 0.0, 0
    for seed in range(400):
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(3, 3, generator=gen)
        if not 1e-4 < abs(reference.supcon(z.double(), y, 0.01).item()) < 1.0:
            continue
        cases += 1
        grads = {}
        for key, x, be in (("fused", z, "cpp"), ("truth", z.double(), "reference"),
                           ("lowp", z, "reference")):
            x = x.clone().requires_grad_(True)
            fastssl.supcon(x, y, 0.01, backend=be).backward()
            grads[key] = x.grad
        worst = max(worst, rel_err(grads["fused"], grads["truth"]))
        worst_ref = max(worst_ref, rel_err(grads["lowp"], grads["truth"]))
    assert worst <= FACTOR * worst_ref + ULP[torch.float32], (
        f"supcon grad: worst relative error {worst:.3g} over {cases} draws, plain fp32 "
        f"PyTorch {worst_ref:.3g}")
