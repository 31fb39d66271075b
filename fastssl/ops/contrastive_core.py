"""Triton kernels of the contrastive core shared by ``info_nce``, ``clip_loss`` and ``supcon``
(``fastssl/ops/{info_nce,clip,supcon}.py``): rows Qhat (M x D) against columns Chat (Nc x D),
``S = alpha Qhat Chat^T``, never stored.

* :func:`row_lse` -- ``_lse_kernel``: program (row block I, column split s) streams the column
  tiles of split s with an online (max, sum) (flash-attention forward without the output) and
  writes per-split partials (splits x M fp32, twice); ``_lse_combine_kernel`` merges them in
  split order. Reads (M + Nc·M/BLOCK_M)·D, writes 2·splits·M + M floats.
* :func:`softmax_grad` -- ``_softmax_grad_kernel``: ``alpha * P @ Chat`` with
  ``P_ij = g_i exp(S_ij - lse_i) + h_j exp(S_ij - clse_j)`` (either term optional), program
  (I, s) recomputing S over split s's column tiles and writing a partial dQ (splits x M x D
  fp32; with one split it is the output itself); ``_sum_splits_kernel`` adds the partials in
  split order. The column-side gradient is the same kernel with the roles of rows and columns
  swapped (``P^T`` has the same form), so no atomics are needed.

Grid: (cdiv(M, BLOCK_M), splits). Columns are split only when the row blocks alone are fewer
than the SMs (``_triton_utils.num_sms``): splits = cdiv(tiles, cdiv(tiles, cdiv(sms,
row_blocks))), every split non-empty, so partials are bounded by ~(sms + row_blocks) x BLOCK_M
rows (dQ: ~(sms + row_blocks) BLOCK_M D 4 bytes, ~4.4 MB at D = 128 on 132 SMs). All reductions
run in a fixed order: results are bitwise reproducible for a given shape and GPU, no atomics.
Grids on an H100 (132 SMs), D = 128 (``plan``):
    MoCo, N = 256 queries vs a K = 65,536 queue (was 4 programs per pass): bf16/fp16 LSE
        4 row blocks x 32 splits (32 tiles of 64 columns each) = 128 programs, gradient
        4 x 33 = 132 (63 tiles of 32); fp32 4 x 33 = 132 both passes. dQ partials: 33 x 256
        x 128 fp32 = 4.3 MB. (A100, 108 SMs: 4 x 27.)
    CLIP, B = 16,384 (row and column passes alike): 256 row blocks >= 132 SMs -> 256 x 1
        programs, no partials, no combine traffic.
Counts per ``row_lse``: 2 M Nc D FLOPs (x3 products for fp32 bf16x3), M Nc exp; per
``softmax_grad``: 4 M Nc D FLOPs, M Nc exp per present term (g and/or h); split overhead
(2 splits M + splits M D fp32 written and read once) is O(M D), only when M is small.

Tile configs (``CONFIGS``: BLOCK_M x BLOCK_N, warps), each checked with ``fastssl gpu-report``
for 0 spills and tensor-core instructions (mma.sync / wgmma) on sm_80 and sm_90 at D = 128;
``aot_entries`` lists exactly these. bf16/fp16: LSE 64 x 64, 4 warps; gradient 64 x 32, 4
warps (64 x 64 spilled 8-32 bytes on sm_90 and 12 on sm_80 with both P terms: CLIP). fp32 dots
run as ``tl.dot(input_precision=...)`` from ``FASTSSL_FP32_DOT`` (default ``"bf16x3"``: three
bf16 tensor-core products, ~1e-5 relative; see :mod:`fastssl.ops._triton_utils`), whose
operand halves double the register footprint (64 x 64 spilled 128-156 bytes on sm_80): LSE
64 x 32, 4 warps; gradient 64 x 16, 8 warps (4 warps spilled 12 bytes on sm_80 for CLIP;
BLOCK_M = 32 loses wgmma on sm_90). Under the interpreter fp32 products are exact and tiles
are small (BLOCK_M != BLOCK_N) to keep tests fast, and ``num_sms`` is small so small test
shapes take the column-split path. Larger D (BLOCK_D > 128) uses the same tiles and is not
covered by the spill check.

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

from ._triton_utils import INTERPRET, TL_TYPE, dot_in_fp32, dot_precision, num_sms

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; see the module docstring.
CONFIGS = {
    "half": dict(lse=(64, 64, 4, 3), grad=(64, 32, 4, 3)),
    "fp32": dict(lse=(64, 32, 4, 2), grad=(64, 16, 8, 2)),
    "interpret": dict(lse=(32, 16, 4, 1), grad=(32, 16, 4, 1)),
}
COMBINE_BLOCK = 256  # rows per program of the LSE combine
ROW_BLOCK = 8        # rows per program of the dQ split sum (memory-bound)


@triton.jit
def _lse_kernel(Q, C, MPART, LPART, M, NC, D, alpha, stride_q, stride_c, TILES_PER_SPLIT,
                MASK_DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    rmask = rows < M
    q = tl.load(Q + rows[:, None] * stride_q + dd[None, :],
                mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    j_begin = pid_s * TILES_PER_SPLIT * BLOCK_N
    j_end = tl.minimum(j_begin + TILES_PER_SPLIT * BLOCK_N, NC)
    for j0 in range(j_begin, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        c = tl.load(C + cols[:, None] * stride_c + dd[None, :],
                    mask=cmask[:, None] & (dd[None, :] < D), other=0.0)
        if DOT_FP32:
            c = c.to(tl.float32)
        # 1. S tile = alpha Q C^T (fp32 accumulation on the tensor cores).
        s = tl.dot(q, tl.trans(c), input_precision=INPUT_PRECISION) * alpha
        valid = cmask[None, :] & (rows[:, None] >= 0)
        if MASK_DIAG:
            valid = valid & (rows[:, None] != cols[None, :])
        s = tl.where(valid, s, float("-inf"))
        # 2. [Online softmax] rescale the running sum to the new max (-inf: nothing seen yet).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - shift) + tl.sum(tl.exp(s - shift[:, None]), 1)
        m_i = m_new
    tl.store(MPART + pid_s * M + rows, m_i, mask=rmask)
    tl.store(LPART + pid_s * M + rows, l_i, mask=rmask)


@triton.jit
def _lse_combine_kernel(MPART, LPART, LSE, M, SPLITS, BLOCK: tl.constexpr):
    # reads 2 SPLITS M fp32, writes M fp32; split order fixed: deterministic.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = rows < M
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for s in range(SPLITS):
        m = tl.maximum(m, tl.load(MPART + s * M + rows, mask=inb, other=float("-inf")))
    shift = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLITS):
        ms = tl.load(MPART + s * M + rows, mask=inb, other=float("-inf"))
        total += tl.load(LPART + s * M + rows, mask=inb, other=0.0) * tl.exp(ms - shift)
    # A row with every column masked (SupCon with N = 1) has lse = -inf.
    lse = tl.where(m == float("-inf"), m, m + tl.log(tl.where(total > 0, total, 1.0)))
    tl.store(LSE + rows, lse, mask=inb)


@triton.jit
def _softmax_grad_kernel(Q, C, G, LSE, H, CLSE, OUT, M, NC, D, alpha, stride_q, stride_c,
                         stride_o, TILES_PER_SPLIT, HAS_ROW: tl.constexpr,
                         HAS_COL: tl.constexpr, MASK_DIAG: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # OUT: (splits, M, D) fp32 partials, split s at OUT + s * M * stride_o.
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
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
    j_begin = pid_s * TILES_PER_SPLIT * BLOCK_N
    j_end = tl.minimum(j_begin + TILES_PER_SPLIT * BLOCK_N, NC)
    for j0 in range(j_begin, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        c = tl.load(C + cols[:, None] * stride_c + dd[None, :],
                    mask=cmask[:, None] & (dd[None, :] < D), other=0.0)
        if DOT_FP32:
            c = c.to(tl.float32)
        # 1. Recompute the S tile.
        s = tl.dot(q, tl.trans(c), input_precision=INPUT_PRECISION) * alpha
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
        acc = tl.dot(p.to(c.dtype), c, acc, input_precision=INPUT_PRECISION)
    tl.store(OUT + pid_s * M * stride_o + rows[:, None] * stride_o + dd[None, :], acc * alpha,
             mask=rmask[:, None] & (dd[None, :] < D))


@triton.jit
def _sum_splits_kernel(PART, OUT, M, D, SPLITS, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # reads SPLITS M D fp32, writes M D fp32; split order fixed: deterministic.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    mask = (rows < M)[:, None] & (dd < D)[None, :]
    off = rows[:, None] * D + dd[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(SPLITS):
        acc += tl.load(PART + s * M * D + off, mask=mask, other=0.0)
    tl.store(OUT + off, acc, mask=mask)


# ---------------------------------------------------------------------------------------
# Launch configuration and launchers
# ---------------------------------------------------------------------------------------


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def config_name(dtype: torch.dtype, interpret: bool = INTERPRET) -> str:
    if interpret:
        return "interpret"
    return "fp32" if dtype == torch.float32 else "half"


def plan(m: int, nc: int, kernel: str, dtype: torch.dtype, sms: int,
         interpret: bool = INTERPRET) -> dict:
    """Tiles and grid of ``kernel`` ("lse" or "grad") for M = ``m`` rows against ``nc``
    columns on a GPU with ``sms`` SMs: ``BLOCK_M, BLOCK_N, num_warps, num_stages,
    row_blocks, splits, tiles_per_split``; the grid is ``(row_blocks, splits)``."""
    bm, bn, warps, stages = CONFIGS[config_name(dtype, interpret)][kernel]
    row_blocks, tiles = triton.cdiv(m, bm), max(1, triton.cdiv(nc, bn))
    splits = 1 if row_blocks >= sms else min(tiles, triton.cdiv(sms, row_blocks))
    per = triton.cdiv(tiles, splits)
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
                row_blocks=row_blocks, splits=triton.cdiv(tiles, per), tiles_per_split=per)


def row_lse(q: torch.Tensor, c: torch.Tensor, alpha: float, *, mask_diag: bool = False):
    """(M,) fp32 row log-sum-exp of ``alpha q c^T`` (diagonal masked with ``mask_diag``)."""
    q, c = q.contiguous(), c.contiguous()
    m, d = q.shape
    cfg = plan(m, c.shape[0], "lse", q.dtype, num_sms(q.device))
    splits = cfg["splits"]
    part = torch.empty((2, splits, m), dtype=torch.float32, device=q.device)
    _lse_kernel[(cfg["row_blocks"], splits)](
        q, c, part[0], part[1], m, c.shape[0], d, alpha, q.stride(0), c.stride(0),
        cfg["tiles_per_split"], MASK_DIAG=mask_diag, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_block_d(d), DOT_FP32=dot_in_fp32(q.dtype),
        INPUT_PRECISION=dot_precision(q.dtype), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    out = torch.empty(m, dtype=torch.float32, device=q.device)
    _lse_combine_kernel[(triton.cdiv(m, COMBINE_BLOCK),)](part[0], part[1], out, m, splits,
                                                         BLOCK=COMBINE_BLOCK)
    return out


def softmax_grad(q, c, alpha: float, g=None, lse=None, h=None, clse=None, *,
                 mask_diag: bool = False) -> torch.Tensor:
    """(M, D) fp32 ``alpha * P c`` with ``P_ij = g_i exp(S_ij - lse_i) + h_j exp(S_ij -
    clse_j)``; pass (g, lse) and/or (h, clse)."""
    q, c = q.contiguous(), c.contiguous()
    m, d = q.shape
    cfg = plan(m, c.shape[0], "grad", q.dtype, num_sms(q.device))
    splits = cfg["splits"]
    out = torch.empty(m, d, dtype=torch.float32, device=q.device)
    part = out if splits == 1 else torch.empty((splits, m, d), dtype=torch.float32,
                                               device=q.device)
    dummy = out  # never read when the matching HAS_* is False
    _softmax_grad_kernel[(cfg["row_blocks"], splits)](
        q, c, g if g is not None else dummy, lse if lse is not None else dummy,
        h if h is not None else dummy, clse if clse is not None else dummy, part,
        m, c.shape[0], d, alpha, q.stride(0), c.stride(0), d, cfg["tiles_per_split"],
        HAS_ROW=g is not None, HAS_COL=h is not None, MASK_DIAG=mask_diag,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_block_d(d),
        DOT_FP32=dot_in_fp32(q.dtype), INPUT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits > 1:
        _sum_splits_kernel[(triton.cdiv(m, ROW_BLOCK),)](part, out, m, d, splits,
                                                         BLOCK_R=ROW_BLOCK,
                                                         BLOCK_D=_block_d(d))
    return out


def aot_entries(op: str, *, mask_diag: bool, has_col: bool) -> list:
    """The AOT_KERNELS entries of an op: every kernel and config its launchers use on a GPU
    (``CONFIGS`` "half" for bf16/fp16, "fp32" with bf16x3 dots for fp32; D = 128)."""
    entries = []
    common = {"M": "i32", "NC": "i32", "D": "i32", "alpha": "fp32", "stride_q": "i32",
              "stride_c": "i32"}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ty = TL_TYPE[dtype]
        cfg = CONFIGS[config_name(dtype, interpret=False)]
        prec = "bf16x3" if dtype == torch.float32 else "ieee"
        bm, bn, warps, stages = cfg["lse"]
        entries.append({
            "name": f"{op}_lse_{ty}", "fn": _lse_kernel,
            "signature": {"Q": f"*{ty}", "C": f"*{ty}", "MPART": "*fp32", "LPART": "*fp32",
                          **common, "TILES_PER_SPLIT": "i32"},
            "constexprs": {"MASK_DIAG": mask_diag, "BLOCK_M": bm, "BLOCK_N": bn,
                           "BLOCK_D": 128, "DOT_FP32": False, "INPUT_PRECISION": prec},
            "tensor_cores": True, "num_warps": warps, "num_stages": stages})
        bm, bn, warps, stages = cfg["grad"]
        entries.append({
            "name": f"{op}_softmax_grad_{ty}", "fn": _softmax_grad_kernel,
            "signature": {"Q": f"*{ty}", "C": f"*{ty}", "G": "*fp32", "LSE": "*fp32",
                          "H": "*fp32", "CLSE": "*fp32", "OUT": "*fp32", **common,
                          "stride_o": "i32", "TILES_PER_SPLIT": "i32"},
            "constexprs": {"HAS_ROW": True, "HAS_COL": has_col, "MASK_DIAG": mask_diag,
                           "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": 128, "DOT_FP32": False,
                           "INPUT_PRECISION": prec},
            "tensor_cores": True, "num_warps": warps, "num_stages": stages})
    # The split reductions are dtype-independent (fp32 partials); listed once per op.
    entries.append({
        "name": f"{op}_lse_combine", "fn": _lse_combine_kernel,
        "signature": {"MPART": "*fp32", "LPART": "*fp32", "LSE": "*fp32", "M": "i32",
                      "SPLITS": "i32"},
        "constexprs": {"BLOCK": COMBINE_BLOCK}, "tensor_cores": False, "num_warps": 4,
        "num_stages": 1})
    entries.append({
        "name": f"{op}_sum_splits", "fn": _sum_splits_kernel,
        "signature": {"PART": "*fp32", "OUT": "*fp32", "M": "i32", "D": "i32",
                      "SPLITS": "i32"},
        "constexprs": {"BLOCK_R": ROW_BLOCK, "BLOCK_D": 128}, "tensor_cores": False,
        "num_warps": 4, "num_stages": 1})
    return entries
