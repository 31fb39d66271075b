"""The Triton contrastive core (fastssl/ops/contrastive_core.py) under the interpreter.

Every launcher result is compared with an fp64 formula computed from the same (rounded)
inputs. 16-bit dtypes run with the GPU-faithful rounding switch (``_triton_utils.round_cast``): the
tolerance is tests/helpers.py's rule, 2x plain PyTorch's own error in that dtype + one ulp.
Shapes are odd and small (the interpreter is slow); the interpreter's tiles are 16/32 rows x
32/16 columns with 64-wide D-chunks, so D = 1 and 3 take the resident path and D = 200, 520,
1030 the chunked one, and ``INTERPRET_NUM_SMS`` = 16 makes M <= 130 take the column-split path.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastssl.ops import _triton_utils as tu
from fastssl.ops import contrastive_core as cc
from helpers import assert_close_to_truth as _assert_close_finite
from helpers import FACTOR, ULP, rel_err

pytestmark = pytest.mark.skipif(not tu.INTERPRET, reason="interpreter tests (CPU tensors)")

HALF = (torch.bfloat16, torch.float16)


def assert_close_to_truth(name, out, truth, ref_lowp, dtype, **kw):
    """tests/helpers.py's rule on the finite entries of the truth; the -inf of a row with no
    valid column must be reproduced exactly (the helper's max |out - truth| is NaN there)."""
    fin = truth.isfinite()
    assert torch.equal(out[~fin], truth[~fin].to(out.dtype)), f"{name}: non-finite entries differ"
    _assert_close_finite(name, out[fin], truth[fin],
                         ref_lowp[fin] if ref_lowp is not None else None, dtype, **kw)


def _rows(n: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=gen), dim=1).to(dtype)


def _scale(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _valid(m, nc, *, target=None, self_idx=None, col_target=None, col_self_idx=None,
           mask_target=False, mask_diag=False) -> torch.Tensor:
    i = torch.arange(m)[:, None]
    j = torch.arange(nc)[None, :]
    v = torch.ones(m, nc, dtype=torch.bool)
    if self_idx is not None:
        v &= j != self_idx[:, None]
    if col_self_idx is not None:
        v &= i != col_self_idx[None, :]
    if mask_diag:
        v &= i != j
    if mask_target:
        if target is not None:
            v &= j != target[:, None]
        if col_target is not None:
            v &= i != col_target[None, :]
    return v


def _lse_pos(s: torch.Tensor, valid: torch.Tensor, target):
    """Row lse over valid columns and the target logit, in s's dtype."""
    lse = torch.logsumexp(s.masked_fill(~valid, float("-inf")), dim=1)
    pos = torch.zeros(s.shape[0], dtype=s.dtype)
    if target is not None:
        has = target >= 0
        pos[has] = s[has, target[has]]
    return lse, pos


def _p_matrix(s, valid, row=None, col=None):
    """P of softmax_grad's docstring, in s's dtype (masked rows/columns contribute 0)."""
    p = torch.zeros_like(s)
    m, nc = s.shape
    if row is not None:
        g, lse, t = (x.to(s.dtype) if x is not None and x.is_floating_point() else x
                     for x in row)
        ok = (lse > float("-inf"))[:, None]
        e = torch.where(valid & ok, torch.exp(s - torch.where(ok, lse[:, None], 0)), 0)
        onehot = torch.zeros_like(s)
        if t is not None:
            has = t >= 0
            onehot[has.nonzero().flatten(), t[has]] = 1
        p = p + g[:, None] * (e - onehot * ok)
    if col is not None:
        h, clse, ct = (x.to(s.dtype) if x is not None and x.is_floating_point() else x
                       for x in col)
        ok = (clse > float("-inf"))[None, :]
        e = torch.where(valid & ok, torch.exp(s - torch.where(ok, clse[None, :], 0)), 0)
        onehot = torch.zeros_like(s)
        if ct is not None:
            has = ct >= 0
            onehot[ct[has], has.nonzero().flatten()] = 1
        p = p + h[None, :] * (e - onehot * ok)
    return p


def _grad_formula(q, c, scale, dtype, **kw):
    """sum_j P_ij c_j computed in ``dtype`` from q, c (already rounded to the test dtype)."""
    s = scale * (q.to(dtype) @ c.to(dtype).T)
    valid = _valid(q.shape[0], c.shape[0], **_formula_kwargs(kw))
    p = _p_matrix(s, valid, kw.get("row"), kw.get("col"))
    return p @ c.to(dtype)


# --------------------------------------------------------------------------------------
# row_lse: every mask, widths, shapes, dtypes
# --------------------------------------------------------------------------------------

LSE_MASKS = [
    dict(),
    dict(target=True),
    dict(target=True, self_idx=True),
    dict(target=True, self_idx=True, mask_target=True),
    dict(mask_diag=True),
    dict(target=True, mask_diag=True, mask_target=True),
]
# (M, NC, D): the first three for every mask, the wide ones once each (the interpreter is slow)
SHAPES = [(1, 1, 1), (3, 37, 3), (19, 45, 70), (37, 3, 200), (130, 3, 520), (5, 3, 1030)]


def _indices(m, nc, gen, *, target=False, self_idx=False):
    t = si = None
    if target:
        t = torch.randint(0, nc, (m,), generator=gen)
        t[::3] = -1  # rows without a target
    if self_idx:
        si = torch.randint(-1, nc, (m,), generator=gen)
    return t, si


@pytest.mark.parametrize("mask", LSE_MASKS, ids=lambda m: "-".join(m) or "plain")
@pytest.mark.parametrize("m,nc,d", SHAPES[:3], ids=lambda x: str(x))
def test_row_lse_masks_fp32(mask, m, nc, d):
    gen = torch.Generator().manual_seed(m * 1000 + nc + d)
    q, c = _rows(m, d, torch.float32, gen), _rows(nc, d, torch.float32, gen)
    t, si = _indices(m, nc, gen, target=mask.get("target", False),
                     self_idx=mask.get("self_idx", False))
    mt, md = mask.get("mask_target", False), mask.get("mask_diag", False)
    lse, pos = cc.row_lse(q, c, _scale(7.5), target=t, self_idx=si, mask_target=mt,
                          mask_diag=md)
    s64 = 7.5 * (q.double() @ c.double().T)
    valid = _valid(m, nc, target=t, self_idx=si, mask_target=mt, mask_diag=md)
    lse64, pos64 = _lse_pos(s64, valid, t)
    assert_close_to_truth("lse", lse, lse64, None, torch.float32)
    assert_close_to_truth("pos", pos, pos64, None, torch.float32)


@pytest.mark.parametrize("m,nc,d", SHAPES[3:], ids=lambda x: str(x))
def test_row_lse_wide_d(m, nc, d):
    gen = torch.Generator().manual_seed(d)
    q, c = _rows(m, d, torch.float32, gen), _rows(nc, d, torch.float32, gen)
    t, si = _indices(m, nc, gen, target=True, self_idx=True)
    lse, pos = cc.row_lse(q, c, _scale(3.0), target=t, self_idx=si)
    lse64, pos64 = _lse_pos(3.0 * (q.double() @ c.double().T),
                            _valid(m, nc, target=t, self_idx=si), t)
    assert_close_to_truth("lse", lse, lse64, None, torch.float32)
    assert_close_to_truth("pos", pos, pos64, None, torch.float32)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_row_lse_half(dtype):
    gen = torch.Generator().manual_seed(5)
    m, nc, d = 37, 45, 70
    q, c = _rows(m, d, dtype, gen), _rows(nc, d, dtype, gen)
    t, si = _indices(m, nc, gen, target=True, self_idx=True)
    lse, pos = cc.row_lse(q, c, _scale(14.0), target=t, self_idx=si, mask_target=True)
    valid = _valid(m, nc, target=t, self_idx=si, mask_target=True)
    lse64, pos64 = _lse_pos(14.0 * (q.double() @ c.double().T), valid, t)
    lse_lp, pos_lp = _lse_pos(14.0 * (q @ c.T), valid, t)
    assert_close_to_truth("lse", lse, lse64, lse_lp, dtype)
    assert_close_to_truth("pos", pos, pos64, pos_lp, dtype)


# --------------------------------------------------------------------------------------
# softmax_grad: the launch patterns of the op files
# --------------------------------------------------------------------------------------


def _grad_case(name, m, nc, gen):
    """kwargs of softmax_grad for one launch pattern (lse from the fp64 truth, as fp32)."""
    t, si = _indices(m, nc, gen, target=True, self_idx=True)
    ct = torch.randint(-1, m, (nc,), generator=gen)
    csi = torch.randint(-1, m, (nc,), generator=gen)
    g = torch.rand(m, generator=gen) + 0.1
    h = torch.rand(nc, generator=gen) + 0.1
    return {
        "row": dict(row=[g, None, None]),
        "row_target": dict(row=[g, None, t]),
        "row_target_self_dcl": dict(row=[g, None, t], self_idx=si, mask_target=True),
        "col_target_self_dcl": dict(col=[h, None, ct], col_self_idx=csi, mask_target=True),
        "clip": dict(row=[g, None, t], col=[h, None, ct]),
        "supcon": dict(row=[g, None, None], col=[h, None, None], mask_diag=True),
        "everything": dict(row=[g, None, t], col=[h, None, ct], self_idx=si,
                           col_self_idx=csi, mask_target=True, mask_diag=True),
    }[name]


def _fill_lse(q, c, scale, kw, s64=None):
    """Puts the fp64-truth row / column lse (as fp32) into kw's row / col terms (of ``s64``
    if given, else of scale q c^T)."""
    m, nc = q.shape[0], c.shape[0]
    valid = _valid(m, nc, **{k: v for k, v in kw.items() if k not in ("row", "col")},
                   target=kw["row"][2] if "row" in kw else None,
                   col_target=kw["col"][2] if "col" in kw else None)
    if s64 is None:
        s64 = scale * (q.double() @ c.double().T)
    if "row" in kw:
        kw["row"][1] = torch.logsumexp(s64.masked_fill(~valid, float("-inf")), 1).float()
        kw["row"] = tuple(kw["row"])
    if "col" in kw:
        kw["col"][1] = torch.logsumexp(s64.masked_fill(~valid, float("-inf")), 0).float()
        kw["col"] = tuple(kw["col"])
    return kw, valid


def _formula_kwargs(kw):
    out = {k: v for k, v in kw.items() if k not in ("row", "col")}
    if "row" in kw:
        out["target"] = kw["row"][2]
    if "col" in kw:
        out["col_target"] = kw["col"][2]
    return out


GRAD_CASES = ["row", "row_target", "row_target_self_dcl", "col_target_self_dcl", "clip",
              "supcon", "everything"]


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("m,nc,d", [(3, 37, 3), (19, 45, 70)], ids=lambda x: str(x))
def test_softmax_grad_masks_fp32(case, m, nc, d):
    if case in ("supcon", "everything"):
        nc = m  # the diagonal mask is meant for square (rows = columns) problems
    gen = torch.Generator().manual_seed(hash(case) % 1000 + d)
    q, c = _rows(m, d, torch.float32, gen), _rows(nc, d, torch.float32, gen)
    kw, valid = _fill_lse(q, c, 9.0, _grad_case(case, m, nc, gen))
    out = cc.softmax_grad(q, c, _scale(9.0), **kw)
    p64 = _p_matrix(9.0 * (q.double() @ c.double().T), valid, kw.get("row"), kw.get("col"))
    assert_close_to_truth(case, out, p64 @ c.double(), None, torch.float32)


@pytest.mark.parametrize("m,nc,d", [(1, 1, 1), (37, 3, 200), (130, 3, 520), (5, 3, 1030)],
                         ids=lambda x: str(x))
def test_softmax_grad_wide_d(m, nc, d):
    gen = torch.Generator().manual_seed(d)
    q, c = _rows(m, d, torch.float32, gen), _rows(nc, d, torch.float32, gen)
    kw, valid = _fill_lse(q, c, 4.0, _grad_case("clip", m, nc, gen))
    out = cc.softmax_grad(q, c, _scale(4.0), **kw)
    p64 = _p_matrix(4.0 * (q.double() @ c.double().T), valid, kw["row"], kw["col"])
    assert_close_to_truth("clip", out, p64 @ c.double(), None, torch.float32)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case,d", [("row_target_self_dcl", 70), ("clip", 3),
                                    ("supcon", 64)])
def test_softmax_grad_half(dtype, case, d):
    gen = torch.Generator().manual_seed(d + len(case))
    m = 37 if case != "row_target_self_dcl" else 19
    nc = m if case == "supcon" else 45
    q, c = _rows(m, d, dtype, gen), _rows(nc, d, dtype, gen)
    kw, valid = _fill_lse(q, c, 12.0, _grad_case(case, m, nc, gen))
    out = cc.softmax_grad(q, c, _scale(12.0), **kw)
    truth = _grad_formula(q, c, 12.0, torch.float64, **kw)
    plain = _grad_formula(q, c, 12.0, dtype, **kw)
    assert_close_to_truth(case, out, truth, plain, dtype)


# --------------------------------------------------------------------------------------
# rq / rc: raw rows with fp32 per-row multipliers, S_ij = scale rq_i rc_j q_i . c_j
# --------------------------------------------------------------------------------------


def _raw_rows(n, d, dtype, gen, x64=None):
    """Raw rows exact in ``dtype`` and their fp32 inverse norms: rows scaled by a power of two
    (max |x| in [1, 2), as the op files do), then rounded -- the rounded rows ARE the inputs."""
    if x64 is None:
        x64 = torch.randn(n, d, generator=gen, dtype=torch.float64)
        x64 = x64 * 2.0 ** torch.randint(-3, 4, (n, 1), generator=gen)  # varied norms
    e = torch.floor(torch.log2(x64.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)))
    x = (x64 * 2.0 ** -e).to(dtype)
    return x, (1.0 / x.double().norm(dim=1)).float()


def _s64(q, c, rq, rc, scale):
    """fp64 S from the raw rows and the given factors (rq / rc as fp64)."""
    return scale * rq.double()[:, None] * rc.double()[None, :] * (q.double() @ c.double().T)


@pytest.mark.parametrize("mask", LSE_MASKS, ids=lambda m: "-".join(m) or "plain")
@pytest.mark.parametrize("m,nc,d", [(19, 45, 3), (9, 20, 520)], ids=lambda x: str(x))
def test_row_lse_rq_rc_fp32(mask, m, nc, d):
    gen = torch.Generator().manual_seed(m * 100 + d + len(mask))
    (q, rq), (c, rc) = _raw_rows(m, d, torch.float32, gen), _raw_rows(nc, d, torch.float32, gen)
    t, si = _indices(m, nc, gen, target=mask.get("target", False),
                     self_idx=mask.get("self_idx", False))
    mt, md = mask.get("mask_target", False), mask.get("mask_diag", False)
    lse, pos = cc.row_lse(q, c, _scale(7.5), rq=rq, rc=rc, target=t, self_idx=si,
                          mask_target=mt, mask_diag=md)
    valid = _valid(m, nc, target=t, self_idx=si, mask_target=mt, mask_diag=md)
    lse64, pos64 = _lse_pos(_s64(q, c, rq, rc, 7.5), valid, t)
    assert_close_to_truth("lse", lse, lse64, None, torch.float32)
    assert_close_to_truth("pos", pos, pos64, None, torch.float32)


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("m,nc,d", [(19, 45, 3), (9, 20, 520)], ids=lambda x: str(x))
def test_softmax_grad_rq_rc_fp32(case, m, nc, d):
    if case in ("supcon", "everything"):
        nc = m
    gen = torch.Generator().manual_seed(hash(case) % 1000 + d + 7)
    (q, rq), (c, rc) = _raw_rows(m, d, torch.float32, gen), _raw_rows(nc, d, torch.float32, gen)
    s64 = _s64(q, c, rq, rc, 9.0)
    kw, valid = _fill_lse(q, c, 9.0, _grad_case(case, m, nc, gen), s64)
    out = cc.softmax_grad(q, c, _scale(9.0), rq=rq, rc=rc, **kw)
    p64 = _p_matrix(s64, valid, kw.get("row"), kw.get("col"))
    assert_close_to_truth(case, out, (p64 * rc.double()[None, :]) @ c.double(), None,
                          torch.float32)


def _grad_plain(q, c, rq, rc, scale, dtype, valid, kw):
    """sum_j P_ij rc_j c_j in ``dtype`` the plain way: rows normalised in ``dtype``."""
    qn, cn = q.to(dtype) * rq.to(dtype)[:, None], c.to(dtype) * rc.to(dtype)[:, None]
    p = _p_matrix(scale * (qn @ cn.T), valid, kw.get("row"), kw.get("col"))
    return p @ cn


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rq_rc_half_everything(dtype):
    # every mask and both terms, 16-bit raw rows (resident D = 3, chunked D = 130)
    for m, d in ((23, 3), (19, 130)):
        gen = torch.Generator().manual_seed(d)
        (q, rq), (c, rc) = _raw_rows(m, d, dtype, gen), _raw_rows(m, d, dtype, gen)
        t, si = _indices(m, m, gen, target=True, self_idx=True)
        lse, pos = cc.row_lse(q, c, _scale(12.0), rq=rq, rc=rc, target=t, self_idx=si,
                              mask_target=True, mask_diag=True)
        s64 = _s64(q, c, rq, rc, 12.0)
        valid = _valid(m, m, target=t, self_idx=si, mask_target=True, mask_diag=True)
        lse64, pos64 = _lse_pos(s64, valid, t)
        # S is exact up to fp32 arithmetic now: held to fp32's bar, not the dtype's
        assert_close_to_truth("lse", lse, lse64, None, torch.float32)
        assert_close_to_truth("pos", pos, pos64, None, torch.float32)
        kw, valid = _fill_lse(q, c, 12.0, _grad_case("everything", m, m, gen), s64)
        out = cc.softmax_grad(q, c, _scale(12.0), rq=rq, rc=rc, **kw)
        truth = (_p_matrix(s64, valid, kw["row"], kw["col"]) * rc.double()) @ c.double()
        plain = _grad_plain(q, c, rq, rc, 12.0, dtype, valid, kw)
        assert_close_to_truth("grad", out, truth, plain, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rq_rc_precision_clustered_tau_001(dtype):
    # Raw rows exact in the dtype + fp32 inverse norms at scale 100, rows clustered around one
    # direction (logits differ by O(1): informative gradients). The truth normalises the same
    # raw rows in fp64. lse / pos: only fp32 arithmetic is left (no 16-bit rounding of
    # normalised rows, which at |S| ~ 100 costs ~100 x 2^-9 absolute in S). Gradient: P's
    # one rounding to the dtype is left; held to the error of exactly that rounding applied
    # to the fp64 P (x 2 + fp32's ulp).
    gen = torch.Generator().manual_seed(11)
    m, nc, d, scale = 37, 45, 64, 100.0
    base = torch.randn(1, d, generator=gen, dtype=torch.float64)
    x = base + 0.1 * torch.randn(nc, d, generator=gen, dtype=torch.float64)
    (c, rc) = _raw_rows(nc, d, dtype, gen, x)
    (q, rq) = _raw_rows(m, d, dtype, gen, x[:m] + 0.03 * torch.randn(m, d, generator=gen,
                                                                     dtype=torch.float64))
    inv_q, inv_c = 1.0 / q.double().norm(dim=1), 1.0 / c.double().norm(dim=1)
    s64 = scale * inv_q[:, None] * inv_c[None, :] * (q.double() @ c.double().T)
    t = torch.arange(m)
    ct = torch.where(torch.arange(nc) < m, torch.arange(nc), -1)
    sc = _scale(scale)
    lse, pos = cc.row_lse(q, c, sc, rq=rq, rc=rc, target=t)
    clse, cpos = cc.row_lse(c, q, sc, rq=rc, rc=rq, target=ct)
    all_valid = torch.ones(m, nc, dtype=torch.bool)
    lse64, pos64 = _lse_pos(s64, all_valid, t)
    clse64, cpos64 = _lse_pos(s64.T, all_valid.T, ct)
    for name, out, truth in (("lse", lse, lse64), ("pos", pos, pos64),
                             ("col lse", clse, clse64), ("col pos", cpos, cpos64),
                             ("loss", lse - pos, lse64 - pos64)):
        err = (out.double() - truth).abs().max().item()
        # absolute: a few fp32 ulps of |S| <= 100 (the 16-bit normalised rows gave ~1e-1)
        assert err <= 8 * scale * 2.0 ** -24, f"{name}: max abs error {err:.3g}"
    g, h = torch.full((m,), 1.0 / m), torch.full((nc,), 1.0 / nc)
    row, col = (g, lse, t), (h, clse, ct)
    out = cc.softmax_grad(q, c, sc, rq=rq, rc=rc, row=row, col=col)
    p64 = _p_matrix(s64, all_valid, (g, lse64, t), (h, clse64, ct)) * inv_c[None, :]
    truth = p64 @ c.double()
    assert scale * truth.abs().max() > 1e-1  # informative: the softmax is not saturated
    p_rounded = (p64 * 2.0 ** 10).to(dtype).double() * 2.0 ** -10 if dtype == torch.float16 \
        else p64.to(dtype).double()
    bar = FACTOR * rel_err(p_rounded @ c.double(), truth) + ULP[torch.float32]
    err = rel_err(out, truth)
    # the old operands (normalised rows rounded to the dtype) for the record: far worse
    qn, cn = (q.double() * inv_q[:, None]).to(dtype), (c.double() * inv_c[:, None]).to(dtype)
    old = cc.softmax_grad(qn, cn, sc, row=row, col=col)
    old_err = rel_err(old, truth)
    assert err <= bar, f"grad: {err:.3g} > {bar:.3g} (old operands: {old_err:.3g})"
    assert err < old_err / 4, f"grad: {err:.3g}, old operands {old_err:.3g}"


def test_rq_rc_errors():
    q = torch.randn(4, 8)
    s = _scale(1.0)
    with pytest.raises(TypeError, match="rq"):
        cc.row_lse(q, q, s, rq=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="rc"):
        cc.row_lse(q, q[:3], s, rc=torch.ones(4))
    with pytest.raises(TypeError, match="rc"):
        cc.softmax_grad(q, q, s, rc=[1.0] * 4, row=(torch.ones(4), torch.zeros(4), None))


# --------------------------------------------------------------------------------------
# The precision cases, gradients assembled as the op files do
# --------------------------------------------------------------------------------------


def _clip_loss(ih, th, scale):
    s = scale * ih @ th.T
    t = torch.arange(ih.shape[0])
    return (F.cross_entropy(s, t) + F.cross_entropy(s.T, t)) / 2


def test_clip_fp16_confident_pairs():
    # issue 13: fp16, B = 37, D = 64, text = image + 1.5 noise, logit scale 30, diagonal
    # targets (CLIP dI was 4.8e-2 relative with the target folded after the cast).
    gen = torch.Generator().manual_seed(13)
    b, d, scale, dtype = 37, 64, 30.0, torch.float16
    image = torch.randn(b, d, generator=gen)
    text = image + 1.5 * torch.randn(b, d, generator=gen)
    ih, th = F.normalize(image, dim=1).to(dtype), F.normalize(text, dim=1).to(dtype)
    s = _scale(scale)
    ar = torch.arange(b)
    rl, rpos = cc.row_lse(ih, th, s, target=ar)
    cl, cpos = cc.row_lse(th, ih, s, target=ar)
    g = torch.full((b,), 1.0 / (2 * b))
    di = s * cc.softmax_grad(ih, th, s, row=(g, rl, ar), col=(g, cl, ar))
    dt = s * cc.softmax_grad(th, ih, s, row=(g, cl, ar), col=(g, rl, ar))
    loss = ((rl - rpos).mean() + (cl - cpos).mean()) / 2

    i64, t64 = ih.double().requires_grad_(), th.double().requires_grad_()
    loss64 = _clip_loss(i64, t64, scale)
    di64, dt64 = torch.autograd.grad(loss64, (i64, t64))
    ilp, tlp = ih.clone().requires_grad_(), th.clone().requires_grad_()
    loss_lp = _clip_loss(ilp, tlp, scale)
    di_lp, dt_lp = torch.autograd.grad(loss_lp, (ilp, tlp))
    assert_close_to_truth("clip loss", loss, loss64, loss_lp, dtype)
    assert_close_to_truth("clip dI", di, di64, di_lp, dtype)
    assert_close_to_truth("clip dT", dt, dt64, dt_lp, dtype)


def _infonce_loss(qh, ch, scale, t, si, dcl):
    s = scale * qh @ ch.T
    valid = _valid(qh.shape[0], ch.shape[0], target=t, self_idx=si, mask_target=dcl)
    lse, pos = _lse_pos(s, valid, t)
    return (lse - pos).mean()


@pytest.mark.parametrize("dtype,dcl", [(torch.float16, False), (torch.float16, True),
                                       (torch.bfloat16, True)], ids=str)
def test_infonce_tau_001(dtype, dcl):
    # In-batch / gathered InfoNCE at tau = 0.01 (scale 100), confident positives: rows are
    # the local 2 x 9 views, columns a 2 x 19 "global" batch holding them at an offset.
    # Embeddings cluster around one direction (cos ~0.86 between samples, ~0.94 between
    # views), so that at tau = 0.01 negatives keep ~1e-3 of the softmax: with unrelated
    # samples they would keep e^-60 and every gradient would round to 0 (nothing to compare).
    gen = torch.Generator().manual_seed(1)
    n_local, n_global, d, scale = 9, 19, 64, 100.0
    base = 20.0 * F.normalize(torch.randn(1, d, generator=gen), dim=1) + \
        torch.randn(n_global, d, generator=gen)
    views = torch.cat([base, base + torch.randn(n_global, d, generator=gen)])
    ch = F.normalize(views, dim=1).to(dtype)                      # (2 x 37, D) columns
    own = torch.cat([torch.arange(5, 5 + n_local), n_global + torch.arange(5, 5 + n_local)])
    qh = ch[own].clone()                                            # (2 x 19, D) rows
    m = qh.shape[0]
    t = torch.where(own < n_global, own + n_global, own - n_global)  # partner view
    si = own.clone()
    s = _scale(scale)
    lse, pos = cc.row_lse(qh, ch, s, target=t, self_idx=si, mask_target=dcl)
    g = torch.full((m,), 1.0 / m)
    dq = s * cc.softmax_grad(qh, ch, s, row=(g, lse, t), self_idx=si, mask_target=dcl)
    dc = s * cc.softmax_grad(ch, qh, s, col=(g, lse, t), col_self_idx=si, mask_target=dcl)
    loss = (lse - pos).mean()

    q64, c64 = qh.double().requires_grad_(), ch.double().requires_grad_()
    loss64 = _infonce_loss(q64, c64, scale, t, si, dcl)
    dq64, dc64 = torch.autograd.grad(loss64, (q64, c64))
    qlp, clp = qh.clone().requires_grad_(), ch.clone().requires_grad_()
    loss_lp = _infonce_loss(qlp, clp, scale, t, si, dcl)
    dq_lp, dc_lp = torch.autograd.grad(loss_lp, (qlp, clp))
    # the case is informative: the gradients do not vanish at this temperature
    assert dq64.abs().max() > 1e-2 and dc64.abs().max() > 1e-2
    assert_close_to_truth("loss", loss, loss64, loss_lp, dtype)
    # plain PyTorch's own error is large here (S rounded to the dtype at |S| ~ 100: 0.1-0.5
    # relative), so also hold the kernel to a few ulps of the dtype: its only rounding
    # beyond the inputs is P, once, to nearest (measured: fp16 7e-4, bf16 7e-3 in dq).
    for name, out, truth, plain in (("dq", dq, dq64, dq_lp), ("dc", dc, dc64, dc_lp)):
        bar = min(FACTOR * rel_err(plain, truth) + ULP[dtype], 8 * ULP[dtype])
        assert_close_to_truth(name, out, truth, plain, dtype, abs_tol=bar)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_supcon_negatives_tau_001_no_nan(dtype):
    # SupCon's log-sum-exp part at tau = 0.01: sum_i g_i lse_i over the off-diagonal, row and
    # column terms; plus a lone row (M = 1): no valid column, lse = -inf, gradient exactly 0.
    gen = torch.Generator().manual_seed(2)
    zh = _rows(37, 64, dtype, gen)
    s = _scale(100.0)
    lse, _ = cc.row_lse(zh, zh, s, mask_diag=True)
    g = torch.rand(37, generator=gen) / 37
    dz = s * cc.softmax_grad(zh, zh, s, row=(g, lse, None), col=(g, lse, None), mask_diag=True)

    def part(z):
        sim = 100.0 * z @ z.T
        sim = sim.masked_fill(torch.eye(37, dtype=torch.bool), float("-inf"))
        return (g.to(z.dtype) * torch.logsumexp(sim, 1)).sum()

    z64 = zh.double().requires_grad_()
    (dz64,) = torch.autograd.grad(part(z64), z64)
    zlp = zh.clone().requires_grad_()
    (dz_lp,) = torch.autograd.grad(part(zlp), zlp)
    assert_close_to_truth("supcon dz", dz, dz64, dz_lp, dtype)

    lone = zh[:1].contiguous()
    lse1, pos1 = cc.row_lse(lone, lone, s, mask_diag=True)
    assert lse1.item() == float("-inf") and pos1.item() == 0.0
    d1 = cc.softmax_grad(lone, lone, s, row=(torch.ones(1), lse1, None),
                         col=(torch.ones(1), lse1, None), mask_diag=True)
    assert torch.equal(d1, torch.zeros_like(d1))


def test_row_without_valid_column_mixed_with_valid_rows():
    # Row 1 masks its only column through self_idx; the others are ordinary. Row and column
    # gradients stay finite and the lone row contributes exactly 0.
    gen = torch.Generator().manual_seed(3)
    q, c = _rows(3, 8, torch.float16, gen), _rows(1, 8, torch.float16, gen)
    si = torch.tensor([-1, 0, -1])
    s = _scale(100.0)
    lse, _ = cc.row_lse(q, c, s, self_idx=si)
    assert torch.isinf(lse[1]) and torch.isfinite(lse[[0, 2]]).all()
    out = cc.softmax_grad(q, c, s, row=(torch.ones(3), lse, None), self_idx=si)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros(8))
    # the same masked entry seen from the column side (swapped call): column 1 has clse -inf
    col = cc.softmax_grad(c, q, s, col=(torch.ones(3), lse, None), col_self_idx=si)
    truth = _grad_formula(c, q, 100.0, torch.float64, col=(torch.ones(3), lse, None),
                          col_self_idx=si)
    assert_close_to_truth("column side", col, truth, None, torch.float16,
                          abs_tol=2 * 2.0 ** -11)


# --------------------------------------------------------------------------------------
# Paths, determinism, rounding switch, input checks
# --------------------------------------------------------------------------------------


def test_shapes_take_the_column_split_and_chunked_paths():
    # What the tests above rely on: the interpreter's plan splits columns for M <= 130 and
    # chunks D above 64.
    p = cc.plan(19, 45, 70, "grad", torch.float32, tu.INTERPRET_NUM_SMS, None)
    assert p["splits"] > 1 and not p["D_RESIDENT"]
    p = cc.plan(3, 37, 3, "lse", torch.float32, tu.INTERPRET_NUM_SMS, None)
    assert p["splits"] > 1 and p["D_RESIDENT"]


def test_deterministic():
    gen = torch.Generator().manual_seed(4)
    q, c = _rows(19, 70, torch.bfloat16, gen), _rows(45, 70, torch.bfloat16, gen)
    t, _ = _indices(19, 45, gen, target=True)
    s = _scale(20.0)
    a = cc.row_lse(q, c, s, target=t)
    b = cc.row_lse(q, c, s, target=t)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    row = (torch.rand(19, generator=gen), a[0], t)
    assert torch.equal(cc.softmax_grad(q, c, s, row=row), cc.softmax_grad(q, c, s, row=row))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_round_cast_is_round_to_nearest_even(dtype):
    # The switch the gradient kernel relies on for P (tu.round_cast), under the interpreter.
    import triton
    import triton.language as tl

    @triton.jit
    def _round_kernel(X, Y, N, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < N)
        tl.store(Y + offs, tu.round_cast(x, DTYPE).to(tl.float32), mask=offs < N)

    one = 1.0
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    # exact ties round to the even neighbour, just above a tie rounds up, plus subnormal,
    # overflow, inf and NaN
    values = [one + ulp / 2, one + 1.5 * ulp, one + ulp / 2 + ulp / 64, -(one + 1.5 * ulp),
              1e-30, 3.0e38, 7e4, float("inf"), float("nan"), 0.1, -0.3, 65519.0, 65520.0]
    x = torch.tensor(values, dtype=torch.float32)
    y = torch.empty_like(x)
    tl_dtype = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    _round_kernel[(1,)](x, y, x.numel(), DTYPE=tl_dtype, BLOCK=16)
    want = x.to(dtype).float()  # torch rounds to nearest even, as the GPU's cvt.rn
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(y[~want.isnan()], want[~want.isnan()])


def test_input_errors():
    q = torch.randn(4, 8)
    s = _scale(1.0)
    with pytest.raises(TypeError, match="scale"):
        cc.row_lse(q, q, 1.0)
    with pytest.raises(ValueError, match="scale"):
        cc.row_lse(q, q, torch.ones(2))
    with pytest.raises(TypeError, match="same dtype"):
        cc.row_lse(q, q.half(), s)
    with pytest.raises(ValueError, match="width"):
        cc.row_lse(q, torch.randn(4, 7), s)
    with pytest.raises(TypeError, match="target"):
        cc.row_lse(q, q, s, target=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="mask_target"):
        cc.row_lse(q, q, s, mask_target=True)
    with pytest.raises(ValueError, match="row"):
        cc.softmax_grad(q, q, s)
    with pytest.raises(ValueError, match="col"):
        cc.softmax_grad(q, q, s, col=(torch.ones(4), None, None))
    with pytest.raises(ValueError, match="shape"):
        cc.softmax_grad(q, q, s, row=(torch.ones(3), torch.zeros(4), None))


def test_aot_entries_cover_every_dtype_and_width():
    entries = cc.aot_entries("clip_loss")
    tiled = [e for e in entries if e["D"] is not None]
    assert {(e["dtype"], e["D"], e["arch"]) for e in tiled} == {
        (ty, d, arch) for ty in ("fp32", "bf16", "fp16") for d in cc.SWEEP_D
        for arch in (80, 90)}
    for e in entries:
        assert e["op"] == "clip_loss" and set(e["signature"]) == set(e["fn"].arg_names)
    with pytest.raises(ValueError, match="unknown op"):
        cc.aot_entries("nope")


def test_empty_shapes():
    s = _scale(2.0)
    q, none = torch.randn(3, 4), torch.randn(0, 4)
    lse, pos = cc.row_lse(q, none, s)
    assert torch.equal(lse, torch.full((3,), float("-inf"))) and torch.equal(pos, torch.zeros(3))
    assert cc.row_lse(none, q, s)[0].shape == (0,)
    out = cc.softmax_grad(q, none, s, row=(torch.ones(3), lse, None))
    assert torch.equal(out, torch.zeros(3, 4))
