"""Tolerance rules and comparison helpers for all op tests.

The rule (docs/DESIGN.md, section 5, after flash-attention): compute an fp64 truth from the same (low
precision) inputs; run plain PyTorch (``fastssl.reference``) in the test dtype to see how
wrong *it* is; the fused op must be within ``FACTOR`` x that error, plus one unit in the last
place of the output dtype (the fused op rounds its fp32 result to that dtype once).
"""
from __future__ import annotations

import torch

FACTOR = 2.0
# One ulp (machine epsilon) of each output dtype, relative to the scale of the truth.
# fp32 uses a floor of 1e-5: the fused kernels' exp is a 2-ulp polynomial and sums in
# another order than PyTorch, so they are not bit-identical to it (the issues' fp32 bar is
# 1e-4 relative; tests hold 10x tighter).
ULP = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11,
       torch.float64: 1e-12}


def rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    """max |out - truth| / max |truth| (0 when both are all zero)."""
    out = out.detach().double().cpu()
    truth = truth.detach().double().cpu()
    scale = truth.abs().max().item() if truth.numel() else 0.0
    diff = (out - truth).abs().max().item() if truth.numel() else 0.0
    return diff / scale if scale > 0 else diff


def first_mismatches(out: torch.Tensor, truth: torch.Tensor, tol: float, k: int = 5) -> str:
    out = out.detach().double().cpu().flatten()
    truth = truth.detach().double().cpu().flatten()
    scale = max(truth.abs().max().item(), 1e-30)
    bad = ((out - truth).abs() / scale > tol) | (out.isfinite() != truth.isfinite())
    idx = bad.nonzero().flatten()[:k].tolist()
    return ", ".join(f"[{i}] got {out[i].item():.6g} want {truth[i].item():.6g}" for i in idx)


def assert_close_to_truth(name: str, out: torch.Tensor, truth: torch.Tensor,
                          ref_lowp: torch.Tensor | None, dtype: torch.dtype,
                          *, abs_tol: float | None = None) -> None:
    """Asserts the fused result is within FACTOR x the reference's own error + one ulp.

    Args:
        name: what is compared, for the message.
        out: the fused op's result (any dtype).
        truth: the fp64 ground truth computed from the same inputs.
        ref_lowp: plain PyTorch's result in ``dtype`` (None: use the ulp bound alone).
        dtype: the dtype under test.
        abs_tol: overrides the computed bound (relative to max |truth|).
    """
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    t_fin = truth.detach().isfinite()
    o_fin = out.detach().cpu().isfinite()
    assert torch.equal(t_fin.cpu(), o_fin), (
        f"{name}: NaN/inf pattern differs from the truth: "
        f"{first_mismatches(out, truth, 0.0)}")
    ref_err = rel_err(ref_lowp, truth) if ref_lowp is not None else 0.0
    tol = abs_tol if abs_tol is not None else FACTOR * ref_err + ULP[dtype]
    err = rel_err(out, truth)
    assert err <= tol, (f"{name} ({dtype}): relative error {err:.3g} > tolerance {tol:.3g} "
                        f"(reference's own error {ref_err:.3g}); "
                        f"{first_mismatches(out, truth, tol)}")


def kernels(backend: str):
    """Context in which ``backend`` runs on CPU tensors: for "triton", the ops' Triton kernels
    replace the C++ ones on the CPU key (interpreter; ``fastssl._dispatch.triton_on_cpu``);
    put forward, backward and any torch.compile inside it."""
    import contextlib

    from fastssl import _dispatch
    return _dispatch.triton_on_cpu() if backend == "triton" else contextlib.nullcontext()


def spawn_or_fail(fn, args, nprocs: int, timeout: float = 300.0) -> None:
    """torch.multiprocessing.spawn with a deadline: a rank that dies or blocks (a collective
    its peer never joins) fails the test after ``timeout`` seconds instead of hanging CI."""
    import time

    import torch.multiprocessing as mp
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise AssertionError(f"spawned ranks did not finish within {timeout:.0f} s "
                                 f"(exit codes {[p.exitcode for p in ctx.processes]})")
