"""Fuzz: hundreds of seeded bad and edge inputs thrown at every public function and class.

Every case is classified before it runs, as one of

* **clear error**: a ValueError / TypeError / RuntimeError / NotImplementedError whose message
  names the problem (a word the case gives, e.g. the argument's name), or
* **correct result**: compared with an independent fp64 formula written here (not
  ``fastssl.reference``), with a tolerance from the dtype.

Anything else -- a silent wrong answer, another exception type, a message that does not name
the problem -- fails the test, and the failures of one test are reported together.

Cases are generated from fixed seeds (``random.Random``/``torch.Generator``), so a failure
reproduces by its id. The losses run on backend="cpp" and "reference", plus a few small
"triton" cases under the interpreter.

Three test functions check behaviour that other branches deliver (they fail until the lead's
merge, by design):

* ``test_double_backward_is_error_or_correct``: the op registrations must raise a
  RuntimeError that says "double backward" (or return the true second derivative) -- today
  they return zeros (issue 10, point 1; the lead's change to fastssl/cpp and fastssl/ops).
* ``test_huge_magnitudes_match_fp64``: rows ~1e20 / 1e30 (issue 10, point 2; branch relcpp).
* ``test_huge_magnitudes_match_fp64[...reference...]`` cases pass already: the reference is
  the model.
"""
from __future__ import annotations

import math
import random
import contextlib
import re

import pytest
import torch

import fastssl
from fastssl import _dispatch
from fastssl import _ext, augment, reference
from fastssl.augment import AugmentParams, AugmentRecipe, SSLAugment, sample_params

HAS_CPP = _ext.has_op("ntxent_fwd")
BACKENDS = (["cpp"] if HAS_CPP else []) + ["reference"]
CLEAR = (ValueError, TypeError, RuntimeError, NotImplementedError)
F64 = torch.float64

# ---------------------------------------------------------------------------------------
# Independent fp64 formulas (differentiable twice: they also give the double-backward truth)
# ---------------------------------------------------------------------------------------


def _unit(x, normalize):
    if not normalize:
        return x
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _xent_rows(logits, target, exclude=None):
    """-log softmax(logits)[target] per row, with ``exclude`` (bool mask) left out of the
    normaliser; max-shifted so any finite logit is safe."""
    if exclude is not None:
        logits = logits.masked_fill(exclude, -math.inf)
    shift = logits.max(dim=1, keepdim=True).values.detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    lse = (logits - shift).exp().sum(dim=1).log() + shift[:, 0]
    return lse - logits.gather(1, target[:, None])[:, 0]


def truth_nt_xent(z1, z2, t, normalize=True, decoupled=False, reduction="mean"):
    z = _unit(torch.cat([z1, z2]).to(F64), normalize)
    m, n = z.shape[0], z1.shape[0]
    s = z @ z.T / t
    idx = torch.arange(m)
    pos = (idx + n) % m
    excl = torch.eye(m, dtype=torch.bool)
    rows_pos = s[idx, pos]
    if decoupled:
        excl[idx, pos] = True
    s_masked = s.masked_fill(excl, -math.inf)
    shift = s_masked.max(dim=1, keepdim=True).values.detach()
    rows = (s_masked - shift).exp().sum(1).log() + shift[:, 0] - rows_pos
    return {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]


def truth_info_nce(q, k, queue, t, normalize=True, reduction="mean"):
    q, k = _unit(q.to(F64), normalize), _unit(k.to(F64), normalize)
    if queue is None:
        rows = _xent_rows(q @ k.T / t, torch.arange(q.shape[0]))
    else:
        u = _unit(queue.detach().to(F64), normalize)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ u.T], dim=1) / t
        rows = _xent_rows(logits, torch.zeros(q.shape[0], dtype=torch.long))
    return {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]


def truth_clip(a, b, s, normalize=True):
    a, b = _unit(a.to(F64), normalize), _unit(b.to(F64), normalize)
    logits = s * (a @ b.T)
    tgt = torch.arange(a.shape[0])
    return (_xent_rows(logits, tgt).mean() + _xent_rows(logits.T, tgt).mean()) / 2


def truth_supcon(f, labels, t, normalize=True):
    z = _unit(f.to(F64), normalize)
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    s = (z @ z.T / t).masked_fill(eye, -math.inf)
    shift = s.max(dim=1, keepdim=True).values.detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    logp = s - ((s - shift).exp().sum(1, keepdim=True).log() + shift)
    lab = labels.to(torch.int64)
    pos = (lab[:, None] == lab[None, :]) & ~eye
    npos = pos.sum(1)
    per = torch.where(pos, logp, torch.zeros_like(logp)).sum(1) / npos.clamp(min=1)
    valid = npos > 0
    if not bool(valid.any()):
        return per.sum() * 0.0
    return -(per[valid]).mean()


# ---------------------------------------------------------------------------------------
# Case machinery
# ---------------------------------------------------------------------------------------

# Tolerance per dtype, relative to max(1, max|truth|). fp32: the fused kernels' 2-ulp exp and
# another summation order (helpers.ULP uses 1e-5 at well-conditioned shapes; the fuzz draws
# temperatures down to 0.05 and unnormalised rows, which scale the logits' rounding by |z|^2/t).
# bf16/fp16: the result is rounded to that dtype once (2 ulps).
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2.0 ** -7,
       torch.float16: 2.0 ** -9}


def _compare(got, want, dtype):
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.equal(torch.isnan(got), torch.isnan(want)):
        return (f"NaN pattern differs: got {got.flatten()[:4].tolist()} "
                f"want {want.flatten()[:4].tolist()}")
    fin = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), fin):
        return "inf pattern differs"
    if fin.any():
        err = (got[fin] - want[fin]).abs().max().item()
        scale = max(1.0, want[fin].abs().max().item())
        if not err <= TOL[dtype] * scale:
            return f"error {err:.3g} > {TOL[dtype]:.3g} x {scale:.3g}"
    return None


def _run_case(case):
    """-> None when the case behaved as classified, else a description of what went wrong."""
    kind, fn = case["kind"], case["fn"]
    # Triton cases run on CPU tensors: the ops' Triton kernels on the CPU key (interpreter).
    on_triton = "-triton" in case["id"] and not torch.cuda.is_available()
    try:
        with _dispatch.triton_on_cpu() if on_triton else contextlib.nullcontext():
            out = fn()
    except CLEAR as exc:
        if kind != "error":
            return f"unexpected {type(exc).__name__}: {str(exc)[:200]}"
        if not isinstance(exc, case["exc"]):
            return f"{type(exc).__name__} instead of {case['exc']}: {str(exc)[:200]}"
        if not re.search(case["match"], str(exc)):
            return f"message does not name the problem ({case['match']!r}): {str(exc)[:200]}"
        return None
    except Exception as exc:  # anything else is a crash
        return f"crash {type(exc).__name__}: {str(exc)[:200]}"
    if kind == "error":
        return f"no error (silent): returned {out!r:.100}"
    if kind == "nan":
        return None if bool(torch.isnan(out).any()) else f"not NaN: {out!r:.100}"
    if kind == "check":  # a callable returning None or a failure description
        return out
    got, want = out
    return _compare(got, want, case["dtype"])


def _report(cases):
    bad = []
    for c in cases:
        why = _run_case(c)
        if why:
            bad.append(f"{c['id']}: {why}")
    assert not bad, f"{len(bad)} of {len(cases)} cases failed:\n" + "\n".join(bad[:40])
    return len(cases)


def ok(cid, fn, dtype):
    return {"id": cid, "kind": "ok", "fn": fn, "dtype": dtype}


def err(cid, fn, exc, match):
    return {"id": cid, "kind": "error", "fn": fn, "exc": exc, "match": match}


# ---------------------------------------------------------------------------------------
# Loss inputs
# ---------------------------------------------------------------------------------------

LOSSES = ("nt_xent", "info_nce", "info_nce_queue", "clip_loss", "supcon")


def _emb(g, n, d, dtype, layout, scale=1.0):
    """(n, d) embeddings in one of several memory layouts."""
    if layout == "contiguous":
        x = torch.randn(n, d, generator=g, dtype=F64) * scale
    elif layout == "transposed":
        x = (torch.randn(d, n, generator=g, dtype=F64) * scale).T
    elif layout == "strided":
        x = (torch.randn(n, 2 * d, generator=g, dtype=F64) * scale)[:, ::2]
    elif layout == "expanded":  # every row the same storage: stride 0
        x = (torch.randn(1, d, generator=g, dtype=F64) * scale).expand(n, d)
    else:
        raise AssertionError(layout)
    if layout == "expanded":
        return x.to(dtype).expand(n, d) if dtype != F64 else x
    return x.to(dtype) if dtype != F64 else x


def _call(loss, backend, x, y, t, *, labels=None, queue=None, **kw):
    if loss == "nt_xent":
        return fastssl.nt_xent(x, y, t, backend=backend, **kw)
    if loss == "info_nce":
        return fastssl.info_nce(x, y, None, t, backend=backend, **kw)
    if loss == "info_nce_queue":
        return fastssl.info_nce(x, y, queue, t, backend=backend, **kw)
    if loss == "clip_loss":
        return fastssl.clip_loss(x, y, t, backend=backend, **kw)
    return fastssl.supcon(x, labels, t, backend=backend, **kw)


def _truth(loss, x, y, t, *, labels=None, queue=None, **kw):
    t = t.detach().double() if isinstance(t, torch.Tensor) else t
    if loss == "nt_xent":
        return truth_nt_xent(x, y, t, **kw)
    if loss == "info_nce":
        return truth_info_nce(x, y, None, t, **kw)
    if loss == "info_nce_queue":
        return truth_info_nce(x, y, queue, t, **kw)
    if loss == "clip_loss":
        return truth_clip(x, y, t, **kw)
    return truth_supcon(x, labels, t, **kw)


def _loss_and_grads(loss, backend, x, y, t, grad_inputs, **kw):
    """(value, grads of the scalar / weighted per-row loss w.r.t. x and y) in one tensor."""
    xs = x.detach().clone().requires_grad_(grad_inputs)
    ys = y.detach().clone().requires_grad_(grad_inputs and loss != "supcon")
    out = _call(loss, backend, xs, ys, t, **kw)
    if not grad_inputs:
        return out.detach()
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * w).sum().backward()
    parts = [out.detach().double().reshape(-1), xs.grad.double().reshape(-1)]
    if loss != "supcon":
        parts.append(ys.grad.double().reshape(-1))
    return torch.cat(parts)


def _truth_and_grads(loss, x, y, t, grad_inputs, **kw):
    xs = x.detach().to(F64).requires_grad_(grad_inputs)
    ys = y.detach().to(F64).requires_grad_(grad_inputs and loss != "supcon")
    out = _truth(loss, xs, ys, t, **kw)
    if not grad_inputs:
        return out.detach()
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=F64).reshape(out.shape)
    (out * w).sum().backward()
    parts = [out.detach().reshape(-1), xs.grad.reshape(-1)]
    if loss != "supcon":
        parts.append(ys.grad.reshape(-1))
    return torch.cat(parts)


def _good_cases(seed, count, backends, dtypes, max_n=17, max_d=33, layouts=None):
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        loss = LOSSES[i % len(LOSSES)]
        backend = backends[(i // len(LOSSES)) % len(backends)]
        dtype = rng.choice(dtypes)
        if backend == "reference" and dtype not in (torch.float32, F64):
            dtype = torch.float32  # plain PyTorch in bf16/fp16 is the tolerance baseline
        n = rng.choice([1, 2, 3, 5, 8, max_n])
        if loss == "nt_xent" and rng.random() < 0.1:
            n = 1  # one pair: the positive is the only column
        d = rng.choice([1, 2, 3, 7, max_d])
        layout = rng.choice(layouts or ["contiguous", "contiguous", "transposed", "strided",
                                        "expanded"])
        normalize = rng.random() < 0.7
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        scale = 1.0 if normalize else d ** -0.5
        x = _emb(g, n, d, dtype, layout, scale)
        y = _emb(g, n, d, dtype, rng.choice(["contiguous", "strided"]), scale)
        kw = {"normalize": normalize}
        if loss in ("nt_xent", "info_nce", "info_nce_queue"):
            kw["reduction"] = rng.choice(["mean", "sum", "none"])
        if loss == "nt_xent" and n >= 2 and rng.random() < 0.3:
            kw["decoupled"] = True
        if loss == "info_nce_queue":
            kq = rng.choice([1, 4, 31])
            kw["queue"] = _emb(g, kq, d, dtype, "contiguous", scale)
        if loss == "supcon":
            ldt = rng.choice([torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
            kw["labels"] = torch.randint(0, rng.choice([1, 2, 3, n + 1]), (n,), generator=g,
                                         dtype=torch.int64).to(ldt)
        if loss == "clip_loss":
            tval = rng.choice([1.0, 3.0, 10.0, 20.0])
        else:
            tval = rng.choice([0.05, 0.1, 0.3, 1.0, 2.0])
        tkind = rng.choice(["float", "tensor32", "tensor64", "int"])
        if tkind == "float":
            t = tval
        elif tkind == "int":
            t = int(max(1, round(tval)))
            tval = float(t)
        else:
            t = torch.tensor(tval, dtype=torch.float32 if tkind == "tensor32" else F64)
        grads = dtype in (torch.float32, F64) and rng.random() < 0.6
        cid = (f"{loss}-{backend}-{str(dtype)[6:]}-n{n}-d{d}-{layout}-norm{int(normalize)}-"
               f"{tkind}{tval:g}-{kw.get('reduction', '')}{'-dcl' if kw.get('decoupled') else ''}"
               f"{'-grad' if grads else ''}-#{i}")

        def fn(loss=loss, backend=backend, x=x, y=y, t=t, grads=grads, kw=kw):
            got = _loss_and_grads(loss, backend, x, y, t, grads, **kw)
            want = _truth_and_grads(loss, x, y, t, grads, **kw)
            return got, want
        cases.append(ok(cid, fn, dtype))
    return cases


def _nan_cases(seed, backends):
    rng = random.Random(seed)
    cases = []
    for backend in backends:
        for loss in LOSSES:
            for bad in (math.nan, math.inf, -math.inf):
                for dtype in (torch.float32, torch.bfloat16):
                    if backend == "reference" and dtype != torch.float32:
                        continue
                    n, d = rng.choice([2, 5]), rng.choice([3, 8])
                    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
                    x, y = _emb(g, n, d, dtype, "contiguous"), _emb(g, n, d, dtype, "contiguous")
                    which = rng.choice(["x", "y"]) if loss != "supcon" else "x"
                    (x if which == "x" else y)[rng.randrange(n), rng.randrange(d)] = bad
                    kw = {}
                    if loss == "supcon":
                        kw["labels"] = torch.tensor([0, 0] + [1] * (n - 2))
                    if loss == "info_nce_queue":
                        kw["queue"] = _emb(g, 3, d, dtype, "contiguous")
                    t = 3.0 if loss == "clip_loss" else 0.2
                    cases.append({"id": f"nan-{loss}-{backend}-{str(dtype)[6:]}-{bad}-{which}",
                                  "kind": "nan",
                                  "fn": (lambda loss=loss, backend=backend, x=x, y=y, t=t, kw=kw:
                                         _call(loss, backend, x, y, t, **kw))})
    return cases


def _bad_loss_cases(backends):
    """Bad inputs for every loss: (id, callable, exception type, what the message must say)."""
    cases = []
    g = torch.Generator().manual_seed(7)
    good = torch.randn(4, 6, generator=g)
    names = {"nt_xent": ("z1", "z2", "temperature"), "info_nce": ("query", "key", "temperature"),
             "info_nce_queue": ("query", "key", "temperature"),
             "clip_loss": ("image", "text", "logit_scale"),
             "supcon": ("features", "labels", "temperature")}
    labels = torch.tensor([0, 1, 0, 1])
    queue = torch.randn(5, 6, generator=g)
    for backend in backends:
        for loss in LOSSES:
            a, b, tn = names[loss]
            kw = {"labels": labels} if loss == "supcon" else {}
            if loss == "info_nce_queue":
                kw["queue"] = queue

            def add(what, x, y, t, exc, match, extra=None, loss=loss, backend=backend, kw=kw):
                k = dict(kw, **(extra or {}))
                cases.append(err(f"bad-{loss}-{backend}-{what}",
                                 lambda: _call(loss, backend, x, y, t, **k), exc, match))
            y = good.clone()
            # the first embedding argument
            add("x-numpy", good.numpy(), y, 0.5, TypeError, f"{a} must be a torch.Tensor")
            add("x-list", good.tolist(), y, 0.5, TypeError, f"{a} must be a torch.Tensor")
            add("x-1d", good[0], y, 0.5, ValueError, f"{a} must be 2-D")
            add("x-3d", good[None], y, 0.5, ValueError, f"{a} must be 2-D")
            add("x-empty-n", good[:0], y[:0], 0.5, ValueError, f"{a} must have N >= 1")
            add("x-empty-d", good[:, :0], y[:, :0], 0.5, ValueError, f"{a} must have N >= 1")
            for idt in (torch.int64, torch.int32, torch.uint8, torch.bool):
                add(f"x-{idt}", good.to(idt), y.to(idt), 0.5, TypeError, f"{a} must be a floating")
            add("x-complex", good.to(torch.complex64), y.to(torch.complex64), 0.5, TypeError,
                f"{a} must be a floating")
            add("x-meta-mixed", good.to("meta"), y, 0.5, ValueError, "device")
            # temperature / logit scale
            for tv, exc, match in ((0.0, ValueError, f"{tn} must be > 0"),
                                   (-0.5, ValueError, f"{tn} must be > 0"),
                                   (math.nan, ValueError, f"{tn} must be > 0 and finite"),
                                   (math.inf, ValueError, f"{tn} must be > 0 and finite"),
                                   (-math.inf, ValueError, f"{tn} must be > 0"),
                                   ("0.1", TypeError, f"{tn} must be a float"),
                                   (None, TypeError, f"{tn} must be a float"),
                                   (True, TypeError, f"{tn} must be a float"),
                                   (torch.tensor(-0.5), ValueError, f"{tn} must be > 0"),
                                   (torch.tensor(math.nan), ValueError, f"{tn} must be > 0"),
                                   (torch.tensor([0.1, 0.2]), ValueError, "exactly one element"),
                                   (torch.tensor(1), TypeError, f"{tn} must be a floating"),
                                   (torch.tensor(0.5, device="meta"), ValueError, tn)):
                add(f"t-{tv!r}"[:40], good, y, tv, exc, match)
            if loss == "supcon":
                for ldt in (torch.float32, torch.bool):
                    add(f"labels-{ldt}", good, y, 0.5, TypeError, "labels must be an integer",
                        {"labels": labels.to(ldt)})
                add("labels-short", good, y, 0.5, ValueError, r"labels must have shape \(4,\)",
                    {"labels": labels[:3]})
                add("labels-2d", good, y, 0.5, ValueError, "labels must have shape",
                    {"labels": labels[None]})
                add("labels-list", good, y, 0.5, TypeError, "labels must be a torch.Tensor",
                    {"labels": [0, 1, 0, 1]})
                add("labels-meta", good, y, 0.5, ValueError, "labels must be on the same device",
                    {"labels": labels.to("meta")})
                continue
            # the second embedding argument
            add("y-shape", good, y[:, :5], 0.5, ValueError, f"{a} and {b} must have the same shape")
            add("y-rows", good, y[:3], 0.5, ValueError, f"{a} and {b} must have the same shape")
            add("y-dtype", good, y.double(), 0.5,
                TypeError, f"{a} and {b} must have the same dtype")
            add("y-bf16", good, y.bfloat16(), 0.5, TypeError, "same dtype")
            add("y-meta", good, y.to("meta"), 0.5, ValueError, "same device")
            add("y-none", good, None, 0.5, TypeError, f"{b} must be a torch.Tensor")
            if loss in ("nt_xent", "info_nce", "info_nce_queue"):
                add("reduction", good, y, 0.5, ValueError, "reduction must be one of",
                    {"reduction": "avg"})
            if loss == "nt_xent":
                add("decoupled-n1", good[:1], y[:1], 0.5, ValueError, "N >= 2",
                    {"decoupled": True})
            if loss == "info_nce_queue":
                add("queue-d", good, y, 0.5, ValueError, "queue must have D = 6",
                    {"queue": queue[:, :4]})
                add("queue-dtype", good, y, 0.5, TypeError, "same dtype",
                    {"queue": queue.double()})
                add("queue-1d", good, y, 0.5, ValueError, "queue must be 2-D",
                    {"queue": queue[0]})
                add("queue-empty", good, y, 0.5, ValueError, "queue must have N >= 1",
                    {"queue": queue[:0]})
                add("queue-gather", good, y, 0.5, ValueError, "gather=True",
                    {"gather": True})
            if loss == "clip_loss":
                add("logit-bias", good, y, 3.0, NotImplementedError, "logit_bias",
                    {"logit_bias": torch.tensor(1.0)})
    for loss in ("nt_xent", "clip_loss", "supcon"):
        cases.append(err(f"bad-{loss}-backend-name",
                         lambda loss=loss: _call(loss, "gpu", good, good, 0.5, labels=labels),
                         ValueError, "backend must be one of"))
    return cases


# ---------------------------------------------------------------------------------------
# The loss tests
# ---------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float32, F64, torch.bfloat16, torch.float16]


def test_fuzz_losses_correct_results():
    n = _report(_good_cases(seed=1, count=300, backends=BACKENDS, dtypes=DTYPES))
    assert n == 300


def test_fuzz_losses_nan_inputs_give_nan():
    assert _report(_nan_cases(seed=2, backends=BACKENDS)) >= 40


def test_fuzz_losses_bad_inputs_are_clear_errors():
    assert _report(_bad_loss_cases(BACKENDS)) >= 300


def test_fuzz_losses_triton_interpreter():
    # A few small shapes only: the interpreter runs every program on the host (slow).
    _report(_good_cases(seed=3, count=10, backends=["triton"], dtypes=[torch.float32],
                        max_n=5, max_d=7, layouts=["contiguous", "strided"]))


def _module_cases(i, backend, x, y, t, lab, queue):
    mods = [
        ("NTXentLoss", lambda: fastssl.NTXentLoss(t, backend=backend)(x, y),
         lambda: truth_nt_xent(x, y, t)),
        ("InfoNCELoss", lambda: fastssl.InfoNCELoss(t, backend=backend)(x, y, queue),
         lambda: truth_info_nce(x, y, queue, t)),
        ("InfoNCELoss-inbatch", lambda: fastssl.InfoNCELoss(t, backend=backend)(x, y),
         lambda: truth_info_nce(x, y, None, t)),
        ("CLIPLoss", lambda: fastssl.CLIPLoss(t, backend=backend)(x, y),
         lambda: truth_clip(x, y, 1.0 / torch.tensor(t).double())),
        ("SupConLoss", lambda: fastssl.SupConLoss(t, backend=backend)(x, lab),
         lambda: truth_supcon(x, lab, t)),
    ]
    return [ok(f"module-{name}-{backend}-{i}", lambda got=got, want=want: (got(), want()),
               torch.float32) for name, got, want in mods]


def test_fuzz_loss_modules():
    rng = random.Random(4)
    cases = []
    for i in range(40):
        backend = BACKENDS[i % len(BACKENDS)]
        n, d = rng.choice([2, 3, 6]), rng.choice([3, 8])
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        t = rng.choice([0.1, 0.5])
        lab = torch.randint(0, 2, (n,), generator=g)
        queue = torch.randn(5, d, generator=g)
        cases += _module_cases(i, backend, x, y, t, lab, queue)
    bad_ctor = [
        ("NTXentLoss-t-neg", lambda: fastssl.NTXentLoss(temperature=-1), ValueError, "temperature"),
        ("NTXentLoss-t-zero", lambda: fastssl.NTXentLoss(temperature=0.0),
         ValueError, "temperature"),
        ("NTXentLoss-t-nan", lambda: fastssl.NTXentLoss(temperature=math.nan),
         ValueError, "temperature"),
        ("NTXentLoss-t-str", lambda: fastssl.NTXentLoss(temperature="0.1"),
         TypeError, "temperature"),
        ("NTXentLoss-t-param-neg", lambda: fastssl.NTXentLoss(
            temperature=torch.nn.Parameter(torch.tensor(-0.1))), ValueError, "temperature"),
        ("NTXentLoss-reduction", lambda: fastssl.NTXentLoss(reduction="avg"),
         ValueError, "reduction"),
        ("NTXentLoss-backend", lambda: fastssl.NTXentLoss(backend="gpu"), ValueError, "backend"),
        ("InfoNCELoss-t-neg", lambda: fastssl.InfoNCELoss(temperature=-0.07),
         ValueError, "temperature"),
        ("InfoNCELoss-t-inf", lambda: fastssl.InfoNCELoss(temperature=math.inf),
         ValueError, "temperature"),
        ("SupConLoss-t-neg", lambda: fastssl.SupConLoss(temperature=-1), ValueError, "temperature"),
        ("SupConLoss-backend", lambda: fastssl.SupConLoss(backend="x"), ValueError, "backend"),
        ("CLIPLoss-init-0", lambda: fastssl.CLIPLoss(init_temperature=0),
         ValueError, "init_temperature"),
        ("CLIPLoss-init-neg", lambda: fastssl.CLIPLoss(init_temperature=-1),
         ValueError, "init_temperature"),
        ("CLIPLoss-init-nan", lambda: fastssl.CLIPLoss(init_temperature=math.nan),
         ValueError, "init_temperature"),
        ("CLIPLoss-init-str", lambda: fastssl.CLIPLoss(init_temperature="0.07"),
         TypeError, "init_temperature"),
        ("CLIPLoss-max-0", lambda: fastssl.CLIPLoss(max_scale=0), ValueError, "max_scale"),
        ("CLIPLoss-max-neg", lambda: fastssl.CLIPLoss(max_scale=-5.0), ValueError, "max_scale"),
        ("CLIPLoss-max-nan", lambda: fastssl.CLIPLoss(max_scale=math.nan), ValueError, "max_scale"),
        ("CLIPLoss-backend", lambda: fastssl.CLIPLoss(backend="gpu"), ValueError, "backend"),
    ]
    cases += [err(f"ctor-{c}", f, e, m) for c, f, e, m in bad_ctor]
    # A learnable temperature driven negative after construction: caught in forward.
    tau = torch.nn.Parameter(torch.tensor(0.2))
    crit = fastssl.NTXentLoss(tau)
    x = torch.randn(3, 4)

    def negative_later():
        with torch.no_grad():
            tau.fill_(-0.2)
        return crit(x, x)
    cases.append(err("learnable-temperature-goes-negative", negative_later, ValueError,
                     "temperature must be > 0"))
    cases.append(ok("CLIPLoss-max-inf", lambda: (fastssl.CLIPLoss(0.5, max_scale=math.inf)(x, x),
                                                 truth_clip(x, x, 2.0)), torch.float32))
    assert _report(cases) >= 200


# ---------------------------------------------------------------------------------------
# MoCo machinery, EMA, reference, augmentation
# ---------------------------------------------------------------------------------------

EMA_PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
             (torch.float32, torch.float16), (F64, F64), (F64, torch.float32),
             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]


def test_fuzz_ema():
    rng = random.Random(5)
    cases = []
    backends = BACKENDS + ["triton"]
    for i in range(60):
        backend = backends[i % len(backends)]
        td, od = rng.choice(EMA_PAIRS)
        if backend == "triton" and td == F64:
            continue  # pending: test_triton_ema_float64_weight (below)
        shapes = [tuple(rng.choice([0, 1, 3, 17]) for _ in range(rng.choice([0, 1, 2])))
                  for _ in range(rng.choice([1, 2, 5]))]
        m = rng.choice([0.0, 0.5, 0.9, 0.999, 1.0])
        mt = rng.choice(["float", "tensor"])
        g = torch.Generator().manual_seed(100 + i)
        tgt = [torch.randn(s, generator=g, dtype=F64).to(td) for s in shapes]
        onl = [torch.randn(s, generator=g, dtype=F64).to(od) for s in shapes]
        if rng.random() < 0.3 and tgt[0].dim() == 2 and tgt[0].shape[0] > 1:
            onl[0] = onl[0].T.contiguous().T  # same values, column-major
        want = [(m * t.double() + (1 - m) * o.double()) for t, o in zip(tgt, onl)]

        def fn(backend=backend, tgt=tgt, onl=onl, m=m, mt=mt, want=want):
            mom = m if mt == "float" else torch.tensor(m, dtype=F64)  # fp32 would round m
            fastssl.ema_update_(tgt, onl, mom, backend=backend)
            got = torch.cat([t.double().reshape(-1) for t in tgt] + [torch.zeros(0, dtype=F64)])
            return got, torch.cat([w.reshape(-1) for w in want] + [torch.zeros(0, dtype=F64)])
        cases.append(ok(f"ema-{backend}-{td}-{od}-m{m}-{len(shapes)}-#{i}", fn, td))
    t3, o3 = [torch.zeros(3)], [torch.zeros(3)]
    for backend in backends:
        for what, args, exc, match in [
                ("m-neg", (t3, o3, -0.1), ValueError, "momentum must be in"),
                ("m-big", (t3, o3, 1.5), ValueError, "momentum must be in"),
                ("m-nan", (t3, o3, math.nan), ValueError, "momentum must be in"),
                ("m-str", (t3, o3, "0.9"), TypeError, "momentum must be"),
                ("m-bool", (t3, o3, True), TypeError, "momentum must be"),
                ("m-2el", (t3, o3, torch.tensor([0.9, 0.9])), ValueError, "momentum must have"),
                ("len", ([torch.zeros(3)] * 2, o3, 0.9), ValueError, "same number"),
                ("shape", (t3, [torch.zeros(4)], 0.9), ValueError, "same shape"),
                ("dtype-narrow", (t3, [torch.zeros(3, dtype=F64)], 0.9), TypeError, "dtype"),
                ("int", ([torch.zeros(3, dtype=torch.int64)], [torch.zeros(3, dtype=torch.int64)],
                         0.9), TypeError, "dtype"),
                ("non-tensor", ([1.0], o3, 0.9), TypeError, r"target\[0\] must be a torch.Tensor"),
                ("single-tensors", (torch.zeros(3), torch.zeros(3), 0.9), TypeError, "sequences"),
                ("module-vs-list", (torch.nn.Linear(2, 2), o3, 0.9), TypeError, "nn.Module"),
                ("modules-differ", (torch.nn.Linear(2, 2), torch.nn.Linear(2, 3), 0.9),
                 ValueError, "same shape|same parameters")]:
            cases.append(err(f"ema-bad-{backend}-{what}",
                             lambda args=args, backend=backend: fastssl.ema_update_(
                                 *[[x.clone() for x in a] if isinstance(a, list) and a and
                                   isinstance(a[0], torch.Tensor) else a for a in args],
                                 backend=backend), exc, match))
    assert _report(cases) >= 90


def test_triton_ema_float64_weight():
    """Found by the fuzz (not fixed here: fastssl/ops/ema.py is the lead's): the Triton EMA
    passes ``weight`` as an fp32 kernel argument, so an fp64 EMA at m = 0.999 errs ~1e-10
    relative (1 - m rounded to fp32) where the C++ kernel and lerp_ are exact."""
    g = torch.Generator().manual_seed(14)
    t, o = torch.randn(17, 3, generator=g, dtype=F64), torch.randn(17, 3, generator=g, dtype=F64)
    want = t.clone().lerp_(o, 1 - 0.999)
    fastssl.ema_update_([t], [o], 0.999, backend="triton")
    assert (t - want).abs().max().item() <= 1e-15


def test_fuzz_moco_queue():
    rng = random.Random(6)
    cases = []
    backends = BACKENDS + ["triton"]
    for i in range(45):
        backend = backends[i % len(backends)]
        size, dim = rng.choice([1, 3, 8]), rng.choice([1, 4])
        dtype = rng.choice([torch.float32, F64, torch.bfloat16])
        batches = [rng.choice([0, 1, 2, 5, 9]) for _ in range(rng.choice([1, 3, 6]))]
        g = torch.Generator().manual_seed(200 + i)
        keys = [torch.randn(b, dim, generator=g) for b in batches]

        def fn(backend=backend, size=size, dim=dim, dtype=dtype, keys=keys):
            q = fastssl.MoCoQueue(dim, size, dtype=dtype, init="zeros", backend=backend)
            model, p = torch.zeros(size, dim, dtype=F64), 0  # key by key: obviously right
            for k in keys:
                q.enqueue(k if rng.random() < 0.5 else k.T.contiguous().T)
                for row in k:
                    model[p] = row.to(dtype).double()
                    p = (p + 1) % size
            if int(q.ptr) != p:
                return "ptr", torch.tensor([float(int(q.ptr))]), torch.tensor([float(p)])
            return q.buffer, model
        cases.append(ok(f"queue-{backend}-K{size}-D{dim}-{dtype}-{batches}-#{i}", fn, dtype))
    for backend in backends:
        def mk(backend=backend):
            return fastssl.MoCoQueue(4, 5, init="zeros", backend=backend)
        for what, fn, exc, match in [
                ("keys-1d", lambda: mk().enqueue(torch.zeros(4)), ValueError, "keys must be 2-D"),
                ("keys-dim", lambda: mk().enqueue(torch.zeros(2, 3)), ValueError, "dim = 4"),
                ("keys-int", lambda: mk().enqueue(torch.zeros(2, 4, dtype=torch.int64)),
                 TypeError, "keys must be a floating"),
                ("keys-list", lambda: mk().enqueue([[0.0] * 4]), TypeError,
                 "keys must be a torch.Tensor"),
                ("keys-meta", lambda: mk().enqueue(torch.zeros(2, 4, device="meta")), ValueError,
                 "keys are on meta"),
                ("ptr-7", lambda: _with_ptr(mk(), 7),
                 ValueError, r"ptr = 7 is outside \[0, size = 5\)"),
                ("ptr-neg", lambda: _with_ptr(mk(), -3), ValueError, "ptr = -3 is outside"),
                ("ptr-float", lambda: _set_ptr(mk(), torch.tensor(1.0)), ValueError, "0-dim int64"),
                ("ptr-1d", lambda: _set_ptr(mk(), torch.tensor([1])), ValueError, "0-dim int64"),
                ("dim-0", lambda: fastssl.MoCoQueue(0, 5, backend=backend),
                 ValueError, "dim must be >= 1"),
                ("size-float", lambda: fastssl.MoCoQueue(4, 5.0, backend=backend),
                 TypeError, "size must be an int"),
                ("dtype-int", lambda: fastssl.MoCoQueue(4, 5, dtype=torch.int32, backend=backend),
                 TypeError, "dtype must be a floating"),
                ("init", lambda: fastssl.MoCoQueue(4, 5, init="ones", backend=backend),
                 ValueError, "init must be")]:
            cases.append(err(f"queue-bad-{backend}-{what}", fn, exc, match))
    assert _report(cases) >= 80


def _with_ptr(q, p):
    q.ptr.fill_(p)
    q.enqueue(torch.ones(2, 4))


def _set_ptr(q, p):
    q.ptr = p
    q.enqueue(torch.ones(2, 4))


def test_fuzz_momentum_encoder_and_schedule():
    cases = []
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    for mode in ("ema", "copy", "frozen"):
        for m in (0.0, 0.5, 0.99, 1.0):
            def fn(mode=mode, m=m):
                online = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
                enc = fastssl.MomentumEncoder(online, buffers=mode).eval()
                with torch.no_grad():
                    for p in online.parameters():
                        p.add_(1.0)
                online.train()(torch.randn(6, 3))
                pb = [p.double().clone() for p in enc.module.parameters()]
                bb = [b.double().clone() for b in enc.module.buffers()]
                enc.update(online, m)
                want = [m * a + (1 - m) * p.detach().double()
                        for a, p in zip(pb, online.parameters())]
                for a, b in zip(bb, online.buffers()):
                    ema = m * a + (1 - m) * b.double() if b.is_floating_point() else b.double()
                    want.append({"ema": ema, "copy": b.double(), "frozen": a}[mode])
                got = [p.double() for p in enc.module.parameters()] + \
                      [b.double() for b in enc.module.buffers()]
                return (torch.cat([g.reshape(-1) for g in got]),
                        torch.cat([w.reshape(-1) for w in want]))
            cases.append(ok(f"encoder-{mode}-m{m}", fn, torch.float32))
    for what, fn, exc, match in [
            ("not-module", lambda: fastssl.MomentumEncoder([torch.zeros(2)]),
             TypeError, "nn.Module"),
            ("buffers-bad", lambda: fastssl.MomentumEncoder(net, buffers="mean"),
             ValueError, "buffers"),
            ("buffers-int", lambda: fastssl.MomentumEncoder(net, buffers=2), TypeError, "buffers"),
            ("backend", lambda: fastssl.MomentumEncoder(net, backend="gpu"), ValueError, "backend"),
            ("update-momentum", lambda: fastssl.MomentumEncoder(net).update(net, 2.0), ValueError,
             "momentum must be in"),
            ("update-other-net", lambda: fastssl.MomentumEncoder(net).update(
                torch.nn.Linear(3, 4), 0.9), ValueError, "same parameters|same buffers"),
            ("schedule-step", lambda: fastssl.momentum_schedule(11, 10),
             ValueError, "step must be in"),
            ("schedule-total", lambda: fastssl.momentum_schedule(0, 0), ValueError, "total_steps"),
            ("schedule-float", lambda: fastssl.momentum_schedule(0.5, 10),
             TypeError, "step must be an int"),
            ("schedule-base", lambda: fastssl.momentum_schedule(1, 10, base=-1.0),
             ValueError, "momentum")]:
        cases.append(err(f"encoder-bad-{what}", fn, exc, match))
    for k in (0, 1, 5, 10):
        want = 1.0 - (1.0 - 0.9) * (math.cos(math.pi * k / 10) + 1) / 2
        cases.append(ok(f"schedule-{k}", lambda k=k, want=want: (
            torch.tensor(fastssl.momentum_schedule(k, 10, 0.9, 1.0)), torch.tensor(want)),
            torch.float64))
    assert _report(cases) >= 25


def test_fuzz_reference_functions():
    """fastssl.reference is public too: it must match the independent formulas."""
    rng = random.Random(8)
    cases = []
    for i in range(30):
        n, d = rng.choice([1, 2, 4, 9]), rng.choice([1, 3, 8])
        g = torch.Generator().manual_seed(300 + i)
        x, y = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64)
        t = rng.choice([0.1, 0.7])
        q = torch.randn(3, d, generator=g, dtype=F64)
        lab = torch.randint(0, 3, (n,), generator=g)
        for name, got, want in [
                ("nt_xent", lambda: reference.nt_xent(x, y, t, reduction="none"),
                 lambda: truth_nt_xent(x, y, t, reduction="none")),
                ("info_nce", lambda: reference.info_nce(x, y, q, t),
                 lambda: truth_info_nce(x, y, q, t)),
                ("clip_loss", lambda: reference.clip_loss(x, y, 1 / t),
                 lambda: truth_clip(x, y, 1 / t)),
                ("supcon", lambda: reference.supcon(x, lab, t), lambda: truth_supcon(x, lab, t))]:
            cases.append(ok(f"reference-{name}-n{n}-d{d}-#{i}",
                            lambda got=got, want=want: (got(), want()), F64))
    assert _report(cases) == 120


def _identity(b, h, w, flip=False):
    off = torch.zeros(b, dtype=torch.bool)
    return AugmentParams(
        crop=torch.tensor([[0, 0, h, w]] * b), flip=torch.full((b,), flip), jitter=off,
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * b), order=torch.tensor([[0, 1, 2, 3]] * b),
        gray=off, blur=off, sigma=torch.ones(b),
        taps=augment.gaussian_taps(torch.ones(b), min(3, 2 * h - 1)),
        solarize=off, solarize_threshold=0.5, in_sizes=[(h, w)] * b)


def test_fuzz_augment():
    rng = random.Random(9)
    cases = []
    backends = (["cpp"] if _ext.has_op("ssl_augment") else []) + ["reference"]
    unit = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    for i in range(24):
        backend = backends[i % len(backends)]
        b, s = rng.choice([1, 3]), rng.choice([1, 2, 5, 8])
        flip = rng.random() < 0.5
        u8 = rng.random() < 0.5
        g = torch.Generator().manual_seed(400 + i)
        img = torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8)
        if not u8:
            img = img.float() / 255.0
        strided = rng.random() < 0.3

        def fn(backend=backend, img=img, b=b, s=s, flip=flip, strided=strided):
            x = img.transpose(2, 3).contiguous().transpose(2, 3) if strided else img
            out = augment.apply(x, _identity(b, s, s, flip), s, **unit, backend=backend)
            want = img.double() / 255.0 if img.dtype == torch.uint8 else img.double()
            return out, (want.flip(-1) if flip else want)
        cases.append(ok(f"augment-identity-{backend}-b{b}-s{s}-flip{int(flip)}-u8{int(u8)}-#{i}",
                        fn, torch.float32))
    x = torch.zeros(2, 3, 9, 9, dtype=torch.uint8)
    p = sample_params(2, (9, 9), 4, generator=torch.Generator().manual_seed(0))
    bad = [
        ("recipe-frac-inf", lambda: AugmentRecipe(blur_kernel_frac=math.inf),
         ValueError, "blur_kernel_frac"),
        ("recipe-hue", lambda: AugmentRecipe(hue=0.7), ValueError, "hue"),
        ("recipe-hue-nan", lambda: AugmentRecipe(hue=math.nan), ValueError, "hue"),
        ("recipe-flip-p", lambda: AugmentRecipe(flip_p=1.5), ValueError, "flip_p"),
        ("recipe-contrast-neg", lambda: AugmentRecipe(contrast=-0.1), ValueError, "contrast"),
        ("recipe-saturation-inf", lambda: AugmentRecipe(saturation=math.inf),
         ValueError, "saturation"),
        ("recipe-scale-order", lambda: AugmentRecipe(crop_scale=(0.9, 0.1)),
         ValueError, "crop_scale"),
        ("recipe-scale-3", lambda: AugmentRecipe(crop_scale=(0.1, 0.5, 0.9)),
         ValueError, "crop_scale"),
        ("recipe-ratio-0", lambda: AugmentRecipe(crop_ratio=(0.0, 1.0)), ValueError, "crop_ratio"),
        ("recipe-sigma-str", lambda: AugmentRecipe(blur_sigma=("a", 1.0)), TypeError, "blur_sigma"),
        ("recipe-bool", lambda: AugmentRecipe(gray_p=True), TypeError, "gray_p"),
        ("sample-in-size-1", lambda: sample_params(2, (8,), 4), ValueError, "in_size"),
        ("sample-in-size-int", lambda: sample_params(2, 8, 4), TypeError, "in_size"),
        ("sample-in-size-0", lambda: sample_params(2, (0, 8), 4), ValueError, "H, W >= 1"),
        ("sample-in-size-float", lambda: sample_params(2, (8.0, 8.0), 4),
         ValueError, "in_size|H, W"),
        ("sample-batch-0", lambda: sample_params(0, (8, 8), 4), ValueError, "batch_size"),
        ("sample-out-float", lambda: sample_params(2, (8, 8), 4.0), TypeError, "out_size"),
        ("sample-generator-int", lambda: sample_params(2, (8, 8), 4, generator=0),
         TypeError, "generator"),
        ("sample-strength-neg", lambda: sample_params(2, (8, 8), 4, strength=-1.0),
         ValueError, "strength"),
        ("sample-recipe-int", lambda: sample_params(2, (8, 8), 4, recipe=3), TypeError, "recipe"),
        ("ssl-generator-int", lambda: SSLAugment(8, generator=0), TypeError, "generator"),
        ("ssl-out-0", lambda: SSLAugment(0), ValueError, "out_size"),
        ("ssl-dtype", lambda: SSLAugment(8, out_dtype=torch.int8), TypeError, "out_dtype"),
        ("ssl-backend", lambda: SSLAugment(8, backend="gpu"), ValueError, "backend"),
        ("ssl-mean-nan", lambda: SSLAugment(8, mean=(math.nan, 0, 0)),
         ValueError, "mean must be finite"),
        ("ssl-std-zero", lambda: SSLAugment(8, std=(1, 0, 1)), ValueError, "std"),
        ("ssl-meta", lambda: SSLAugment(4)(x.to("meta")), ValueError, "meta"),
        ("apply-meta", lambda: augment.apply(x.to("meta"), p, 4), ValueError, "meta"),
        ("apply-int32", lambda: augment.apply(x.int(), p, 4), TypeError, "uint8"),
        ("apply-2ch", lambda: augment.apply(x[:, :2], p, 4), ValueError, "3 \\(RGB\\)"),
        ("apply-params", lambda: augment.apply(x, "p", 4),
         TypeError, "params must be AugmentParams"),
        ("apply-batch", lambda: augment.apply(x[:1], p, 4), ValueError, "drawn for 2 images"),
        ("apply-small", lambda: augment.apply(x[:, :, :2, :2], p, 4), ValueError, "does not fit"),
        ("apply-empty-image", lambda: augment.apply([torch.zeros(3, 0, 4, dtype=torch.uint8)] * 2,
                                                    p, 4), ValueError, "empty"),
        ("apply-mixed-dtypes", lambda: augment.apply([x[0], x[1].float()], p, 4), ValueError,
         "all images must match"),
    ]
    cases += [err(f"augment-bad-{w}", f, e, m) for w, f, e, m in bad]
    assert _report(cases) >= 55


# ---------------------------------------------------------------------------------------
# Issue 10 points with their own tests
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_fp64_python_temperature_is_exact(loss, backend):
    """Point 5: a Python-float temperature with float64 inputs was rounded to fp32 (4e-8
    relative error in nt_xent, 1e-8 in info_nce / supcon)."""
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(7, 5, generator=g, dtype=F64), torch.randn(7, 5, generator=g, dtype=F64)
    kw = {}
    if loss == "supcon":
        kw["labels"] = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    if loss == "info_nce_queue":
        kw["queue"] = torch.randn(9, 5, generator=g, dtype=F64)
    t = 1.0 / 7.3 if loss == "clip_loss" else 0.1  # 0.1 and 1/7.3 are not fp32 numbers
    for reduction in (["mean", "none"] if loss in ("nt_xent", "info_nce") else [None]):
        rk = {} if reduction is None else {"reduction": reduction}
        got = _call(loss, backend, x, y, t, **kw, **rk)
        want = _truth(loss, x, y, t, **kw, **rk)
        assert got.dtype == F64
        err_ = ((got - want).abs().max() / want.abs().max()).item()
        assert err_ <= 1e-12, f"{loss} {reduction}: relative error {err_:.3g}"


def test_scale_tensor_keeps_float64():
    from fastssl import _validate
    t = _validate.positive_scalar("temperature", 0.1, torch.device("cpu"))
    assert t.dtype == F64 and t.item() == 0.1
    assert _validate.scale_tensor(t, torch.device("cpu"), invert=True).dtype == torch.float32
    s = _validate.scale_tensor(t, torch.device("cpu"), invert=True, dtype=F64)
    assert s.dtype == F64 and s.item() == 1 / 0.1


def _compiled(loss, backend, compile_backend):
    def f(x, y, t):
        kw = {"labels": torch.tensor([0, 1, 0, 1, 0, 1])} if loss == "supcon" else {}
        return _call(loss, backend, x, y, t, **kw)
    return torch.compile(f, fullgraph=True, backend=compile_backend)


@pytest.mark.parametrize("loss", LOSSES)
def test_compiled_tensor_temperature_is_checked(loss):
    """Point 6: under torch.compile the value check was skipped (a temperature of -0.5 gave a
    loss of 2.739). fullgraph=True: no graph break either. backend="eager" (dynamo only)
    for every loss; inductor once in the next test (slow to compile)."""
    torch._dynamo.reset()
    x, y = torch.randn(6, 5), torch.randn(6, 5)
    backend = BACKENDS[0]
    _call(loss, backend, x, y, 0.5, labels=torch.tensor([0, 1] * 3))  # loads the extension
    f = _compiled(loss, backend, "eager")
    good = f(x, y, torch.tensor(0.5))
    torch.testing.assert_close(good, _call(loss, backend, x, y, torch.tensor(0.5),
                                           labels=torch.tensor([0, 1] * 3)))
    name = "logit_scale" if loss == "clip_loss" else "temperature"
    for bad in (-0.5, 0.0, math.nan, math.inf):
        with pytest.raises(RuntimeError, match=f"{name} must be > 0 and finite"):
            f(x, y, torch.tensor(bad))


def test_compiled_tensor_temperature_is_checked_inductor():
    torch._dynamo.reset()
    x, y = torch.randn(6, 5), torch.randn(6, 5)
    backend = BACKENDS[0]
    fastssl.nt_xent(x, y, 0.5, backend=backend)
    f = _compiled("nt_xent", backend, "inductor")
    torch.testing.assert_close(f(x, y, torch.tensor(0.5)),
                               fastssl.nt_xent(x, y, 0.5, backend=backend))
    with pytest.raises(RuntimeError, match="temperature must be > 0 and finite"):
        f(x, y, torch.tensor(-0.5))


def test_compiled_python_float_temperature_that_changes():
    """A float argument of a compiled function becomes symbolic once it changes between calls
    (dynamo's automatic dynamic shapes): fullgraph must still hold, values stay right, and a
    bad value still raises (before: a graph break on math.isfinite of a SymFloat)."""
    torch._dynamo.reset()
    x, y = torch.randn(6, 5), torch.randn(6, 5)
    backend = BACKENDS[0]
    fastssl.nt_xent(x, y, 0.5, backend=backend)
    f = torch.compile(lambda a, b, t: fastssl.nt_xent(a, b, t, backend=backend),
                      fullgraph=True, backend="eager")
    for t in (0.5, 0.25, 0.3):
        torch.testing.assert_close(f(x, y, t), fastssl.nt_xent(x, y, t, backend=backend))
    for bad in (-0.5, math.nan, 0.0):
        with pytest.raises(RuntimeError, match="temperature must be > 0 and finite"):
            f(x, y, bad)


def test_eager_cpu_tensor_temperature_is_a_value_error():
    with pytest.raises(ValueError, match="temperature must be > 0 and finite, got -0.5"):
        fastssl.nt_xent(torch.randn(3, 4), torch.randn(3, 4), torch.tensor(-0.5))


@pytest.mark.parametrize("loss", LOSSES)
def test_meta_tensors_propagate_shapes(loss):
    """Point 7, decision: meta tensors (no data) work as shape propagation, with a float, a CPU
    or a meta temperature; the value check needs a value, so a meta temperature skips it."""
    x = torch.empty(4, 6, device="meta")
    for t in (0.5, torch.tensor(0.5), torch.tensor(0.5, device="meta")):
        kw = {}
        if loss == "supcon":
            kw["labels"] = torch.zeros(4, dtype=torch.int64, device="meta")
        if loss == "info_nce_queue":
            kw["queue"] = torch.empty(9, 6, device="meta")
        out = _call(loss, "auto", x, x, t, **kw)
        assert out.device.type == "meta" and out.shape == ()
    with pytest.raises(ValueError, match="backend='cpp' runs on CPU"):
        fastssl.nt_xent(x, x, torch.tensor(0.5, device="meta"), backend="cpp")


# ---------------------------------------------------------------------------------------
# Pending other branches (see the module docstring): fail until the lead's merge
# ---------------------------------------------------------------------------------------


def _second_order_cases(backends):
    cases = []
    for backend in backends:
        for loss in LOSSES:
            g = torch.Generator().manual_seed(12)
            n, d = 4, 5
            x, y = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
            kw = {"labels": torch.tensor([0, 1, 0, 1])} if loss == "supcon" else {}
            if loss == "info_nce_queue":
                kw["queue"] = torch.randn(6, d, generator=g)
            t = 3.0 if loss == "clip_loss" else 0.3

            def fn(loss=loss, backend=backend, x=x, y=y, t=t, kw=kw):
                def second(call, xx, yy):
                    out = call(xx, yy)
                    (gx,) = torch.autograd.grad(out, xx, create_graph=True)
                    (ggx,) = torch.autograd.grad((gx * gx).sum(), xx)
                    return ggx
                xs, ys = x.clone().requires_grad_(), y.clone()
                try:
                    got = second(lambda a, b: _call(loss, backend, a, b, t, **kw), xs, ys)
                except RuntimeError as exc:
                    if "double backward" in str(exc):
                        return None  # the accepted clear error
                    raise
                want = second(lambda a, b: _truth(loss, a, b, t, **kw),
                              x.double().requires_grad_(), y.double())
                return _compare(got, want, torch.float32)
            cases.append({"id": f"double-backward-{loss}-{backend}", "kind": "check", "fn": fn})
    return cases


def test_double_backward_is_error_or_correct():
    """Issue 10 point 1 (the lead): zeros today on cpp/triton; reference is exact."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "autograd kernel was not registered"
        _report(_second_order_cases(BACKENDS + ["triton"]))


def _huge_cases(backends):
    cases = []
    for backend in backends:
        for loss in LOSSES:
            for dtype in ((torch.float32, torch.bfloat16) if backend != "reference"
                          else (torch.float32,)):
                for mag in (1e20, 1e30):
                    for which in ("all", "one"):
                        g = torch.Generator().manual_seed(13)
                        x = torch.randn(5, 6, generator=g, dtype=F64)
                        y = x + 0.3 * torch.randn(5, 6, generator=g, dtype=F64)
                        if which == "all":
                            x, y = x * mag, y * mag
                        else:
                            x[2] *= mag
                        x, y = x.to(dtype), y.to(dtype)
                        kw = {"labels": torch.tensor([0, 1, 0, 1, 2])} if loss == "supcon" else {}
                        if loss == "info_nce_queue":
                            kw["queue"] = (torch.randn(7, 6, generator=g) * mag).to(dtype)
                        t = 3.0 if loss == "clip_loss" else 0.5
                        cases.append(ok(
                            f"huge-{loss}-{backend}-{str(dtype)[6:]}-{mag:g}-{which}",
                            lambda loss=loss, backend=backend, x=x, y=y, t=t, kw=kw: (
                                _call(loss, backend, x, y, t, **kw),
                                _truth(loss, x, y, t, **kw)), dtype))
    return cases


def test_huge_magnitudes_match_fp64():
    """Issue 10 point 2 (branch relcpp): normalisation must not overflow at |z| ~ 1e20..1e30
    in fp32 and bf16 (the squared norm overflows fp32 at ~1.8e19)."""
    _report(_huge_cases(BACKENDS + ["triton"]))
