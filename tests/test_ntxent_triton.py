"""Fused Triton NT-Xent (``fastssl/ops/ntxent.py``) under ``TRITON_INTERPRET=1`` on CPU tensors,
via ``fastssl.nt_xent(..., backend="triton")``: loss and gradients (z1, z2, temperature) against
an fp64 truth, at odd shapes with ragged tiles and column splits, plus bad inputs and the grid.

The interpreter runs 64 x 32 tiles with 16 pretend SMs (``fastssl/ops/_triton_utils.py``), so
2N = 130 / 514 have ragged row and column tiles and a column split; 2N = 2 / 6 one program.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastssl
from fastssl import reference
from fastssl.ops import _triton_utils
from fastssl.ops import ntxent as tntx
from helpers import assert_close_to_truth, rel_err

pytestmark = pytest.mark.skipif(
    not (_triton_utils.INTERPRET or torch.cuda.is_available()),
    reason="needs TRITON_INTERPRET=1 (set by conftest.py) or a GPU")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(fn, z1, z2, temp, grad, **kw):
    """Loss and (dz1, dz2, dtemp) of ``fn`` on fresh leaves made from the given tensors."""
    a = z1.detach().clone().requires_grad_(True)
    b = z2.detach().clone().requires_grad_(True)
    t = temp.detach().clone().requires_grad_(True)
    loss = fn(a, b, t, **kw)
    loss.backward(grad.to(loss.dtype) if grad is not None else None)
    return loss.detach(), (a.grad, b.grad, t.grad)


def _check_all(n, d, dtype, *, temperature=0.2, reduction="none", scale=1.0, **kw):
    z1 = (torch.randn(n, d) * scale).to(dtype)
    z2 = (torch.randn(n, d) * scale).to(dtype)
    # a correlated second view, like SimCLR's, so the positive carries real weight
    z2 = (0.6 * z1.float() + 0.8 * z2.float()).to(dtype)
    temp = torch.tensor(temperature, dtype=torch.float32)
    grad = torch.randn(2 * n) if reduction == "none" else None
    out, grads = _run(fastssl.nt_xent, z1.to(DEV), z2.to(DEV), temp, grad,
                      reduction=reduction, backend="triton", **kw)
    truth, tgrads = _run(reference.nt_xent, z1.double(), z2.double(), temp.double(),
                         grad.double() if grad is not None else None, reduction=reduction, **kw)
    low, lgrads = (None, (None,) * 3)
    if dtype != torch.float32:
        low, lgrads = _run(reference.nt_xent, z1, z2, temp, grad, reduction=reduction, **kw)
    assert out.dtype == dtype and grads[0].dtype == dtype
    assert_close_to_truth("loss", out, truth, low, dtype)
    for name, g, tg, lg in zip(("dz1", "dz2", "dtemperature"), grads, tgrads, lgrads):
        assert_close_to_truth(name, g, tg, lg, dtype)
    if dtype == torch.float32:  # the bar, stated explicitly
        assert rel_err(out, truth) <= 1e-4
        assert max(rel_err(g, tg) for g, tg in zip(grads, tgrads)) <= 1e-4


# (2N, D): every 2N of the issue, every D, ragged against the 64 x 32 interpreter tiles.
SHAPES = [(1, 16), (3, 40), (65, 72), (257, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES, ids=lambda v: str(v))
def test_loss_and_grads_vs_fp64(n, d, dtype):
    _check_all(n, d, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,d", [(3, 16), (65, 40)])
def test_decoupled(n, d, dtype):
    _check_all(n, d, dtype, decoupled=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_normalize_off(dtype):
    # raw dot products: keep |S| moderate with small inputs and tau = 1
    _check_all(65, 40, dtype, normalize=False, temperature=1.0, scale=0.2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(reduction):
    _check_all(3, 16, torch.float32, reduction=reduction, temperature=0.5)


def test_fp16_mean_gradient():
    """The default reduction in fp16: g = 1/2N goes through the launcher's power-of-two
    pre-scaling of g (which keeps K ~ 1/(2N)^2 out of fp16's subnormals at 2N >= ~8192; at
    this size the scaling is not yet needed, so this checks that it is exact)."""
    _check_all(257, 40, torch.float16, reduction="mean", temperature=0.5)


def test_low_temperature_no_overflow():
    _check_all(65, 16, torch.float32, temperature=0.01)


def test_temperature_float_and_frozen():
    z1, z2 = torch.randn(3, 16, device=DEV), torch.randn(3, 16, device=DEV)
    out = fastssl.nt_xent(z1, z2, 0.3, backend="triton")
    ref = reference.nt_xent(z1.double().cpu(), z2.double().cpu(), 0.3)
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan(bad):
    z1, z2 = torch.randn(3, 16, device=DEV), torch.randn(3, 16, device=DEV)
    z1[1, 2] = bad
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    t = torch.tensor(0.5, requires_grad=True)
    loss = fastssl.nt_xent(a, b, t, backend="triton", reduction="none")
    assert loss.isnan().all()
    loss.sum().backward()
    assert a.grad.isnan().all() and b.grad.isnan().all() and t.grad.isnan()


def test_deterministic():
    z1, z2 = torch.randn(65, 40, device=DEV), torch.randn(65, 40, device=DEV)
    outs = []
    for _ in range(2):
        a = z1.clone().requires_grad_()
        loss = fastssl.nt_xent(a, z2, 0.2, backend="triton")
        loss.backward()
        outs.append((loss.detach(), a.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def _error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the type and message are what is compared
        return type(exc), str(exc)
    return None


BAD_INPUTS = {
    "shapes differ": lambda: (torch.randn(4, 8), torch.randn(4, 6), 0.1, {}),
    "1-D": lambda: (torch.randn(4), torch.randn(4), 0.1, {}),
    "empty": lambda: (torch.randn(0, 8), torch.randn(0, 8), 0.1, {}),
    "int dtype": lambda: (torch.ones(4, 8, dtype=torch.int32),) * 2 + (0.1, {}),
    "dtypes differ": lambda: (torch.randn(4, 8), torch.randn(4, 8).half(), 0.1, {}),
    "not a tensor": lambda: ([[1.0]], torch.randn(1, 1), 0.1, {}),
    "temperature 0": lambda: (torch.randn(4, 8), torch.randn(4, 8), 0.0, {}),
    "temperature < 0": lambda: (torch.randn(4, 8), torch.randn(4, 8), -1.0, {}),
    "temperature nan": lambda: (torch.randn(4, 8), torch.randn(4, 8), float("nan"), {}),
    "temperature 2 elements": lambda: (torch.randn(4, 8), torch.randn(4, 8),
                                       torch.ones(2), {}),
    "reduction": lambda: (torch.randn(4, 8), torch.randn(4, 8), 0.1, {"reduction": "avg"}),
    "decoupled N=1": lambda: (torch.randn(1, 8), torch.randn(1, 8), 0.1, {"decoupled": True}),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_same_errors_as_cpu_path(case):
    z1, z2, t, kw = BAD_INPUTS[case]()
    cpu = _error_of(lambda: fastssl.nt_xent(z1, z2, t, backend="cpp", **kw))
    tri = _error_of(lambda: fastssl.nt_xent(z1, z2, t, backend="triton", **kw))
    assert cpu is not None and cpu[0] in (TypeError, ValueError), cpu
    assert tri == cpu


def test_fp32_dot_precision_switch(monkeypatch):
    monkeypatch.setenv("FASTSSL_FP32_DOT", "ieee")
    assert _triton_utils.fp32_dot_precision() == "ieee"
    monkeypatch.setenv("FASTSSL_FP32_DOT", "fp64")
    with pytest.raises(ValueError, match="FASTSSL_FP32_DOT"):
        _triton_utils.fp32_dot_precision()


def test_large_d_is_refused_clearly():
    z = torch.randn(2, tntx.MAX_D + 1, device=DEV)
    with pytest.raises(NotImplementedError, match="D = 257"):
        fastssl.nt_xent(z, z, 0.1, backend="triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [512, 8192, 131072])
def test_grid_fills_an_h100(m, dtype):
    """2N = 512 and 131,072 both give at least ~an H100's 132 SMs of programs, in both passes,
    and no split is empty."""
    cfg = tntx.pick_config(m, 128, 132, dtype, interpret=False)
    for pass_ in ("fwd", "bwd"):
        c = cfg[pass_]
        assert c["row_blocks"] * c["splits"] >= 0.95 * 132, cfg
        assert (c["splits"] - 1) * c["tiles_per_split"] < math.ceil(m / c["BLOCK_N"])
        if m == 131072:
            assert c["splits"] == 1
    if m == 131072 and dtype == torch.bfloat16:
        assert cfg["name"] == "large"


def test_interpreter_grid_splits_columns():
    """The shapes above do exercise the column-split path (and the unsplit one)."""
    sms = _triton_utils.INTERPRET_NUM_SMS
    for pass_ in ("fwd", "bwd"):
        assert tntx.pick_config(130, 72, sms, interpret=True)[pass_]["splits"] > 1
        assert tntx.pick_config(514, 128, sms, interpret=True)[pass_]["splits"] > 1
        assert tntx.pick_config(6, 40, sms, interpret=True)[pass_]["splits"] == 1
