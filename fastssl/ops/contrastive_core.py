"""Triton kernels of the contrastive core shared by ``info_nce``, ``clip_loss`` and ``supcon``
(``fastssl/ops/{info_nce,clip,supcon}.py``): rows Qhat (M x D) against columns Chat (Nc x D),
``S = alpha Qhat Chat^T``, never stored.

* :func:`row_lse` -- ``_lse_kernel``: one program per BLOCK_M rows streams the columns with an
  online (max, sum) (flash-attention forward without the output). Reads (M + Nc·M/BLOCK_M)·D,
  writes M floats.
* :func:`softmax_grad` -- ``_softmax_grad_kernel``: ``alpha * P @ Chat`` with
  ``P_ij = g_i exp(S_ij - lse_i) + h_j exp(S_ij - clse_j)`` (either term optional), one
  program per BLOCK_M rows, recomputing S. The column-side gradient is the same kernel with
  the roles of rows and columns swapped (``P^T`` has the same form), so no atomics are needed.

The inputs are already L2-normalised (the op files do it with ``F.normalize`` under autograd);
target / positive terms and the gradient of alpha are O(M·D) PyTorch epilogues in the op files.
Differences from the C++ core (csrc/cpu/contrastive_core.*), by design for simplicity: CLIP's
column LSE is a second launch with the roles swapped (one extra S pass on the GPU), and the
only mask is the diagonal (``MASK_DIAG``: NT-Xent/SupCon self-similarity).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import INTERPRET, dot_in_fp32

# Tile sizes: 64 x 64 tiles keep S, P and two D <= 256 panels in registers/shared memory on
# sm_80/sm_90; under the interpreter smaller tiles keep the tests fast.
BLOCK = 32 if INTERPRET else 64


@triton.jit
def _lse_kernel(Q, C, LSE, M, NC, D, alpha, stride_q, stride_c,
                MASK_DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    rmask = rows < M
    q = tl.load(Q + rows[:, None] * stride_q + dd[None, :],
                mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, NC, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        c = tl.load(C + cols[:, None] * stride_c + dd[None, :],
                    mask=cmask[:, None] & (dd[None, :] < D), other=0.0)
        if DOT_FP32:
            c = c.to(tl.float32)
        # 1. S tile = alpha Q C^T (fp32 accumulation on the tensor cores).
        s = tl.dot(q, tl.trans(c)) * alpha
        valid = cmask[None, :] & (rows[:, None] >= 0)
        if MASK_DIAG:
            valid = valid & (rows[:, None] != cols[None, :])
        s = tl.where(valid, s, float("-inf"))
        # 2. [Online softmax] rescale the running sum to the new max (-inf: nothing seen yet).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - shift) + tl.sum(tl.exp(s - shift[:, None]), 1)
        m_i = m_new
    # A row with every column masked (SupCon with N = 1) has lse = -inf.
    lse = tl.where(m_i == float("-inf"), m_i, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)))
    tl.store(LSE + rows, lse, mask=rmask)


@triton.jit
def _softmax_grad_kernel(Q, C, G, LSE, H, CLSE, OUT, M, NC, D, alpha, stride_q, stride_c,
                         stride_o, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
                         MASK_DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    rmask = rows < M
    q = tl.load(Q + rows[:, None] * stride_q + dd[None, :],
                mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    g = tl.zeros([BLOCK_M], tl.float32)
    lse = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ROW:
        g = tl.load(G + rows, mask=rmask, other=0.0)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(0, NC, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        c = tl.load(C + cols[:, None] * stride_c + dd[None, :],
                    mask=cmask[:, None] & (dd[None, :] < D), other=0.0)
        if DOT_FP32:
            c = c.to(tl.float32)
        # 1. Recompute the S tile.
        s = tl.dot(q, tl.trans(c)) * alpha
        valid = cmask[None, :] & rmask[:, None]
        if MASK_DIAG:
            valid = valid & (rows[:, None] != cols[None, :])
        # 2. P = g_i softmax_row + h_j softmax_col (fp32), 0 where masked.
        p = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_ROW:
            p += g[:, None] * tl.exp(s - lse[:, None])
        if HAS_COL:
            h = tl.load(H + cols, mask=cmask, other=0.0)
            cl = tl.load(CLSE + cols, mask=cmask, other=0.0)
            p += h[None, :] * tl.exp(s - cl[None, :])
        p = tl.where(valid, p, 0.0)
        # 3. acc += P C (bi bj D flops on the tensor cores).
        acc += tl.dot(p.to(c.dtype), c)
    tl.store(OUT + rows[:, None] * stride_o + dd[None, :], acc * alpha,
             mask=rmask[:, None] & (dd[None, :] < D))


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def row_lse(q: torch.Tensor, c: torch.Tensor, alpha: float, *, mask_diag: bool = False):
    """(M,) fp32 row log-sum-exp of ``alpha q c^T`` (diagonal masked with ``mask_diag``)."""
    q, c = q.contiguous(), c.contiguous()
    m, d = q.shape
    out = torch.empty(m, dtype=torch.float32, device=q.device)
    _lse_kernel[(triton.cdiv(m, BLOCK),)](
        q, c, out, m, c.shape[0], d, alpha, q.stride(0), c.stride(0), MASK_DIAG=mask_diag,
        BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_D=_block_d(d), DOT_FP32=dot_in_fp32(q.dtype))
    return out


def softmax_grad(q, c, alpha: float, g=None, lse=None, h=None, clse=None, *,
                 mask_diag: bool = False) -> torch.Tensor:
    """(M, D) fp32 ``alpha * P c`` with ``P_ij = g_i exp(S_ij - lse_i) + h_j exp(S_ij -
    clse_j)``; pass (g, lse) and/or (h, clse)."""
    q, c = q.contiguous(), c.contiguous()
    m, d = q.shape
    out = torch.empty(m, d, dtype=torch.float32, device=q.device)
    dummy = out  # never read when the matching HAS_* is False
    _softmax_grad_kernel[(triton.cdiv(m, BLOCK),)](
        q, c, g if g is not None else dummy, lse if lse is not None else dummy,
        h if h is not None else dummy, clse if clse is not None else dummy, out,
        m, c.shape[0], d, alpha, q.stride(0), c.stride(0), out.stride(0),
        HAS_ROW=g is not None, HAS_COL=h is not None, MASK_DIAG=mask_diag, BLOCK_M=BLOCK,
        BLOCK_N=BLOCK, BLOCK_D=_block_d(d), DOT_FP32=dot_in_fp32(q.dtype))
    return out


def aot_entries(op: str, *, mask_diag: bool, has_col: bool) -> list:
    """The AOT_KERNELS entries of an op: the two kernels as its launchers configure them on a
    GPU (BLOCK 64, D = 128), for fp32 / bf16 / fp16 inputs."""
    entries = []
    for tl_t in ("fp32", "bf16", "fp16"):
        common = {"M": "i32", "NC": "i32", "D": "i32", "alpha": "fp32", "stride_q": "i32",
                  "stride_c": "i32"}
        entries.append({
            "name": f"{op}_lse_{tl_t}", "fn": _lse_kernel,
            "signature": {"Q": f"*{tl_t}", "C": f"*{tl_t}", "LSE": "*fp32", **common},
            "constexprs": {"MASK_DIAG": mask_diag, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128,
                           "DOT_FP32": False},
            "tensor_cores": True})
        entries.append({
            "name": f"{op}_softmax_grad_{tl_t}", "fn": _softmax_grad_kernel,
            "signature": {"Q": f"*{tl_t}", "C": f"*{tl_t}", "G": "*fp32", "LSE": "*fp32",
                          "H": "*fp32", "CLSE": "*fp32", "OUT": "*fp32", **common,
                          "stride_o": "i32"},
            "constexprs": {"HAS_ROW": True, "HAS_COL": has_col, "MASK_DIAG": mask_diag,
                           "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128, "DOT_FP32": False},
            "tensor_cores": True})
    return entries
