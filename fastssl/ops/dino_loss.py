r"""``dino_loss``: the DINO / iBOT prototype head (Caron et al. 2021,
https://arxiv.org/abs/2104.14294; Zhou et al. 2022, https://arxiv.org/abs/2111.07832), streamed
over tiles of the K prototypes: the [rows, K] logits are never stored.

With hhat, that the L2-normalised student / teacher bottleneck rows and vhat_k, uhat_k the
weight-normalised prototypes (g = 1) of the student / teacher last layer:

.. math:: x_{rk} = s_s\,\hat h_r\cdot\hat v_k,\qquad y_{tk} = s_t\,\hat t_t\cdot\hat u_k - \mathrm{shift}_k

(s = 1 / temperature; centering: shift = center * s_t; Sinkhorn-Knopp: shift = -c, the column
log-scalings from ``dino_teacher_lse`` passes), P_t = softmax(y) without gradient, and

.. math:: \mathcal L = \sum_{(t, r)\ \text{paired}} \omega_t\,\Big(\operatorname{LSE}(x_r)
          - \sum_k P_{t,k}\, x_{rk}\Big)

over the pairs of teacher row t and student row r: ``cross_view`` (DINO, rows crop-major:
teacher row i B + b with student rows v B + b, v != i) or the same row (iBOT patches), with pair
weight omega_t per teacher row (DINO: 1 / (n_pairs B)). The cross term needs, per teacher row,
sum_k e^{y_k - m} U_k with U_t = sum of its paired student logit rows; it streams with the online
teacher maximum m (rescaled with the running sum when m moves).

Ops (CPU kernels ``csrc/cpu/dino_loss.cpp``, CUDA kernels below in Triton):

* ``dino_loss_fwd(student_h, teacher_h, weight_student, weight_teacher, teacher_shift,
  student_scale, teacher_scale, pair_weight, n_global, cross_view)
  -> (loss, student_lse, teacher_lse, teacher_logit_sum)``
* ``dino_loss_bwd(grad, <the forward's tensors>, student_lse, teacher_lse, n_global,
  cross_view) -> (dstudent_h, dweight_student)``
* ``dino_teacher_lse(teacher_h, weight_teacher, teacher_scale, row_shift, col_shift)
  -> (row_lse, col_lse)``: one streamed pass of a Sinkhorn-Knopp iteration.

Saved-tensor contract (both devices): the forward's inputs plus ``student_lse`` [S] and
``teacher_lse`` [T] (fp32, natural log, of x and of y). The teacher inputs get no gradient
(stop-gradient); ``teacher_logit_sum`` [K] (column sums of the teacher cosines) is the
centre's batch statistic.

Backward: with G_rk = g (W_r P_s,rk - Q_rk), W_r = sum of the pair weights of row r and
Q_r = sum over its teacher rows of omega_t P_t: dhhat = s_s G vhat, dvhat = s_s G^T hhat, then the
F.normalize chain rule for both (for the prototypes it is weight-norm's,
dV = (dvhat - vhat (vhat . dvhat)) / ||V||).
"""
from __future__ import annotations

import torch

from . import _library

_library.define("dino_loss_fwd",
                "(Tensor student_h, Tensor teacher_h, Tensor weight_student, "
                "Tensor weight_teacher, Tensor teacher_shift, Tensor student_scale, "
                "Tensor teacher_scale, Tensor pair_weight, int n_global, bool cross_view) -> "
                "(Tensor loss, Tensor student_lse, Tensor teacher_lse, Tensor teacher_logit_sum)")
_library.define("dino_loss_bwd",
                "(Tensor grad, Tensor student_h, Tensor teacher_h, Tensor weight_student, "
                "Tensor weight_teacher, Tensor teacher_shift, Tensor student_scale, "
                "Tensor teacher_scale, Tensor pair_weight, Tensor student_lse, "
                "Tensor teacher_lse, int n_global, bool cross_view) -> "
                "(Tensor dstudent_h, Tensor dweight_student)")
_library.define("dino_teacher_lse",
                "(Tensor teacher_h, Tensor weight_teacher, Tensor teacher_scale, "
                "Tensor row_shift, Tensor col_shift) -> (Tensor row_lse, Tensor col_lse)")


@torch.library.register_fake("fastssl::dino_loss_fwd")
def _fwd_fake(student_h, teacher_h, weight_student, weight_teacher, teacher_shift,
              student_scale, teacher_scale, pair_weight, n_global, cross_view):
    f32 = dict(dtype=torch.float32)
    return (student_h.new_empty((), **f32), student_h.new_empty((student_h.shape[0],), **f32),
            student_h.new_empty((teacher_h.shape[0],), **f32),
            student_h.new_empty((weight_student.shape[0],), **f32))


@torch.library.register_fake("fastssl::dino_loss_bwd")
def _bwd_fake(grad, student_h, teacher_h, weight_student, weight_teacher, teacher_shift,
              student_scale, teacher_scale, pair_weight, student_lse, teacher_lse, n_global,
              cross_view):
    return torch.empty_like(student_h), torch.empty_like(weight_student)


@torch.library.register_fake("fastssl::dino_teacher_lse")
def _teacher_lse_fake(teacher_h, weight_teacher, teacher_scale, row_shift, col_shift):
    f32 = dict(dtype=torch.float32)
    return (teacher_h.new_empty((teacher_h.shape[0],), **f32),
            teacher_h.new_empty((weight_teacher.shape[0],), **f32))


def _setup_context(ctx, inputs, output):
    (student_h, teacher_h, weight_student, weight_teacher, teacher_shift, student_scale,
     teacher_scale, pair_weight, n_global, cross_view) = inputs
    ctx.save_for_backward(student_h, teacher_h, weight_student, weight_teacher, teacher_shift,
                          student_scale, teacher_scale, pair_weight, output[1], output[2])
    ctx.n_global = n_global
    ctx.cross_view = cross_view


def _backward(ctx, grad_loss, _gs, _gt, _gsum):
    (student_h, teacher_h, weight_student, weight_teacher, teacher_shift, student_scale,
     teacher_scale, pair_weight, student_lse, teacher_lse) = ctx.saved_tensors
    dh, dw = torch.ops.fastssl.dino_loss_bwd(
        grad_loss, student_h, teacher_h, weight_student, weight_teacher, teacher_shift,
        student_scale, teacher_scale, pair_weight, student_lse, teacher_lse, ctx.n_global,
        ctx.cross_view)
    return (dh if ctx.needs_input_grad[0] else None, None,
            dw if ctx.needs_input_grad[2] else None) + (None,) * 7


torch.library.register_autograd("fastssl::dino_loss_fwd", _backward,
                                setup_context=_setup_context)
_library.no_double_backward("dino_loss_bwd", "dino_loss")


# ---------------------------------------------------------------------------------------
# CUDA kernels (Triton)
#
# The GPU path decouples the rows: the cross term sum_t omega_t sum_k P_t,k U_tk with
# U_t = s_s Z_t . vhat_k, Z_t = sum of the normalised student rows paired with teacher row t
# (an O(S d) precomputation), is a second dot of the teacher program against the student
# prototypes, so every program owns a block of rows of one matrix and no program needs rows of
# another. Backward likewise: dhhat = s_s (W P_s) vhat  (student rows), dZ = -s_s omega P_t vhat
# (teacher rows, scattered back to their student rows in O(S d)), and
# dvhat = s_s (P_s^T (W hhat) - P_t^T (omega Z)) (one program per prototype tile, over all rows).
# Cost in row-GEMMs of K x d: forward S + 2 T, backward 3 S + 3 T (student: recompute, P vhat,
# P^T h; teacher: recompute, P vhat, P^T Z) -- no [rows, K] buffer anywhere.
# ---------------------------------------------------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import _aot  # noqa: E402
from ._triton_utils import (TL_DTYPE, dot_in_fp32, dot_precision,  # noqa: E402
                            fp32_dot_precision, num_sms, round_cast)

NORM_EPS = 1e-12

# (BLOCK_R rows, BLOCK_K prototypes, BLOCK_D columns per dot step, warps, stages) per kernel:
# the largest tiles that `fastssl gpu-report` compiles with 0 spilled bytes on both sm_80 and
# sm_90, in every dtype (swept: 64 x 64 x 64 spills 170-3000 bytes in every kernel at 4 warps,
# and the two-dot cross kernel still spills at 8 warps on sm_80).
CONFIGS = {
    "row_lse": (32, 32, 32, 8, 2),
    "col_stats": (32, 32, 32, 4, 2),
    "bwd_rows": (64, 64, 32, 8, 2),
    "bwd_cols": (32, 32, 32, 4, 2),
}


@triton.jit
def _logits_tile(A, V, rows, cols, rmask, cmask, D, stride_a, stride_v,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # reads (BLOCK_R + BLOCK_K) D elements, 2 BLOCK_R BLOCK_K D FLOPs, fp32 accumulation.
    acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dm = dd < D
        a = tl.load(A + rows.to(tl.int64)[:, None] * stride_a + dd[None, :],
                    mask=rmask[:, None] & dm[None, :], other=0.0)
        v = tl.load(V + cols.to(tl.int64)[:, None] * stride_v + dd[None, :],
                    mask=cmask[:, None] & dm[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(a, tl.trans(v), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _dino_row_lse_kernel(A, V, RA, RV, SCALE, SHIFT, Z, VZ, RVZ, ZSCALE, MPART, LPART, APART,
                         R, K, D, stride_a, stride_v, stride_z, stride_vz, TILES_PER_SPLIT,
                         HAS_SHIFT: tl.constexpr, HAS_CROSS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         FP32_PRECISION: tl.constexpr):
    # A block of rows against one split of the prototypes: y = SCALE ahat vhat^T - SHIFT.
    # Z is fp32 (a sum of normalised rows: rounding it to bf16 would put a 2^-9 relative error
    # on the whole cross term, so its dot runs in fp32 at FP32_PRECISION).
    # Writes the split's running (max, sum) per row and, with HAS_CROSS, sum_k e^{y - max} U_k
    # with U = ZSCALE Z vzhat^T (Z: rows already normalised and summed; VZ, RVZ: the student
    # prototypes and their inverse norms). reads BLOCK_R D (+ BLOCK_R D for Z) per tile and
    # the split's prototypes once (twice with HAS_CROSS); writes 2-3 BLOCK_R fp32 partials.
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    row_fac = tl.load(SCALE).to(tl.float32) * tl.load(RA + rows, mask=rmask, other=1.0)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    a_i = tl.zeros([BLOCK_R], tl.float32)
    k_begin = pid_s * TILES_PER_SPLIT * BLOCK_K
    k_end = tl.minimum(k_begin + TILES_PER_SPLIT * BLOCK_K, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        # 1. [Logits] the dot on raw rows, then the inverse norms and the scale per row/column.
        y = _logits_tile(A, V, rows, cols, rmask, cmask, D, stride_a, stride_v,
                         BLOCK_R, BLOCK_K, BLOCK_D, DOT_FP32, INPUT_PRECISION)
        rv = tl.load(RV + cols, mask=cmask, other=1.0)
        y = y * row_fac[:, None] * rv[None, :]
        if HAS_SHIFT:
            y = y - tl.load(SHIFT + cols, mask=cmask, other=0.0)[None, :]
        y = tl.where(cmask[None, :], y, float("-inf"))
        # 2. [Online softmax] running max and sum; the cross sum is rescaled with the sum.
        m_new = tl.maximum(m_i, tl.max(y, axis=1))
        sh = tl.where(m_new == float("-inf"), 0.0, m_new)
        resc = tl.exp(m_i - sh)
        e = tl.exp(y - sh[:, None])
        l_i = l_i * resc + tl.sum(e, axis=1)
        if HAS_CROSS:
            # 3. [Cross term] the paired student logits of these prototypes, U = s_s Z vhat_s^T.
            u = _logits_tile(Z, VZ, rows, cols, rmask, cmask, D, stride_z, stride_vz,
                             BLOCK_R, BLOCK_K, BLOCK_D, True, FP32_PRECISION)
            rvz = tl.load(RVZ + cols, mask=cmask, other=1.0)
            u = u * tl.load(ZSCALE).to(tl.float32) * rvz[None, :]
            a_i = a_i * resc + tl.sum(tl.where(cmask[None, :], e * u, 0.0), axis=1)
        m_i = m_new
    out = pid_s * R + rows
    tl.store(MPART + out, m_i, mask=rmask)
    tl.store(LPART + out, l_i, mask=rmask)
    if HAS_CROSS:
        tl.store(APART + out, a_i, mask=rmask)


@triton.jit
def _dino_col_stats_kernel(A, V, RA, RV, SCALE, ROW_SHIFT, COL_SHIFT, CSUM, CLSE, R, K, D,
                           stride_a, stride_v, HAS_LSE: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # One prototype tile against every row (the teacher's T rows): the column sums of the
    # cosines ahat vhat^T (the centre's batch statistic) and, with HAS_LSE, the column
    # log-sum-exp over rows of X = SCALE cos + ROW_SHIFT + COL_SHIFT (a Sinkhorn step).
    pid_k = tl.program_id(0)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    rv = tl.load(RV + cols, mask=cmask, other=1.0)
    scale = tl.load(SCALE).to(tl.float32)
    if HAS_LSE:
        cshift = tl.load(COL_SHIFT + cols, mask=cmask, other=0.0)
    csum = tl.zeros([BLOCK_K], tl.float32)
    m_j = tl.full([BLOCK_K], float("-inf"), tl.float32)
    l_j = tl.zeros([BLOCK_K], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < R
        cos = _logits_tile(A, V, rows, cols, rmask, cmask, D, stride_a, stride_v,
                           BLOCK_R, BLOCK_K, BLOCK_D, DOT_FP32, INPUT_PRECISION)
        ra = tl.load(RA + rows, mask=rmask, other=1.0)
        cos = cos * ra[:, None] * rv[None, :]
        csum += tl.sum(cos, axis=0)  # rows outside R are zero (masked loads)
        if HAS_LSE:
            x = cos * scale + tl.load(ROW_SHIFT + rows, mask=rmask, other=0.0)[:, None] \
                + cshift[None, :]
            x = tl.where(rmask[:, None], x, float("-inf"))
            m_new = tl.maximum(m_j, tl.max(x, axis=0))
            sh = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_j = l_j * tl.exp(m_j - sh) + tl.sum(tl.exp(x - sh[None, :]), axis=0)
            m_j = m_new
    tl.store(CSUM + cols, csum, mask=cmask)
    if HAS_LSE:
        tl.store(CLSE + cols, m_j + tl.log(l_j), mask=cmask)


@triton.jit
def _dino_bwd_rows_kernel(A, V, RA, RV, SCALE, SHIFT, LSE, COEF, VO, RVO, OUT, R, K, D,
                          stride_a, stride_v, stride_vo, TILES_PER_SPLIT,
                          HAS_SHIFT: tl.constexpr, OUT_DTYPE: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # OUT[split, r, d-block] = COEF_r sum_k P_rk vohat_k, P = exp(y - LSE_r) recomputed
    # (y as in _dino_row_lse_kernel). Grid (row blocks, d blocks, splits): each program
    # recomputes its tiles over all of D and accumulates one BLOCK_D slice of the output.
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    row_fac = tl.load(SCALE).to(tl.float32) * tl.load(RA + rows, mask=rmask, other=1.0)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    coef = tl.load(COEF + rows, mask=rmask, other=0.0)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = dd < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    k_begin = pid_s * TILES_PER_SPLIT * BLOCK_K
    k_end = tl.minimum(k_begin + TILES_PER_SPLIT * BLOCK_K, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        y = _logits_tile(A, V, rows, cols, rmask, cmask, D, stride_a, stride_v,
                         BLOCK_R, BLOCK_K, BLOCK_D, DOT_FP32, INPUT_PRECISION)
        y = y * row_fac[:, None] * tl.load(RV + cols, mask=cmask, other=1.0)[None, :]
        if HAS_SHIFT:
            y = y - tl.load(SHIFT + cols, mask=cmask, other=0.0)[None, :]
        p = tl.where(cmask[None, :], tl.exp(y - lse[:, None]), 0.0)
        # the prototypes' inverse norms go on P (a column scale) before the down-cast
        p = p * tl.load(RVO + cols, mask=cmask, other=0.0)[None, :]
        vo = tl.load(VO + cols.to(tl.int64)[:, None] * stride_vo + dd[None, :],
                     mask=cmask[:, None] & dm[None, :], other=0.0)
        if DOT_FP32:
            vo = vo.to(tl.float32)
            pd = p
        else:
            pd = round_cast(p, OUT_DTYPE)
        acc = tl.dot(pd, vo, acc, input_precision=INPUT_PRECISION)
    out = (pid_s * R + rows).to(tl.int64)[:, None] * D + dd[None, :]
    tl.store(OUT + out, acc * coef[:, None], mask=rmask[:, None] & dm[None, :])


@triton.jit
def _dino_bwd_cols_kernel(A, V, RA, RV, SCALE, SHIFT, LSE, COEF, Y, OUT, R, K, D,
                          stride_a, stride_v, stride_y,
                          HAS_SHIFT: tl.constexpr, ACCUMULATE: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                          FP32_PRECISION: tl.constexpr):
    # OUT[k, d-block] (+)= sum_r COEF_r P_rk Y_r: one prototype tile and one BLOCK_D slice per
    # program, every row block in order (no atomics: each program owns its output tile).
    # Y is fp32 (hhat for the student rows, Z for the teacher rows) and so is this dot, at
    # FP32_PRECISION: dvhat is the difference of the two calls' sums, which cancel where the
    # teacher agrees with the student; rounding P or Y to bf16 in one of them only would leave
    # a 2^-9 relative residue there (measured: 1.6e-3 at K = 1, where the truth is 0).
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    rv = tl.load(RV + cols, mask=cmask, other=1.0)
    scale = tl.load(SCALE).to(tl.float32)
    if HAS_SHIFT:
        cshift = tl.load(SHIFT + cols, mask=cmask, other=0.0)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = dd < D
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < R
        y = _logits_tile(A, V, rows, cols, rmask, cmask, D, stride_a, stride_v,
                         BLOCK_R, BLOCK_K, BLOCK_D, DOT_FP32, INPUT_PRECISION)
        ra = tl.load(RA + rows, mask=rmask, other=1.0)
        y = y * (scale * ra)[:, None] * rv[None, :]
        if HAS_SHIFT:
            y = y - cshift[None, :]
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        coef = tl.load(COEF + rows, mask=rmask, other=0.0)
        p = tl.where(rmask[:, None] & cmask[None, :], tl.exp(y - lse[:, None]), 0.0)
        p = p * coef[:, None]
        yr = tl.load(Y + rows.to(tl.int64)[:, None] * stride_y + dd[None, :],
                     mask=rmask[:, None] & dm[None, :], other=0.0)
        acc = tl.dot(tl.trans(p), yr, acc, input_precision=FP32_PRECISION)
    out = cols.to(tl.int64)[:, None] * D + dd[None, :]
    omask = cmask[:, None] & dm[None, :]
    if ACCUMULATE:
        acc += tl.load(OUT + out, mask=omask, other=0.0)
    tl.store(OUT + out, acc, mask=omask)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

def _rinv(x: torch.Tensor) -> torch.Tensor:
    """1 / max(||row||, eps) in fp32 (F.normalize's factor)."""
    return 1.0 / torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(NORM_EPS)


def _opts(kernel: str, dtype: torch.dtype, fp32_dots: bool = False) -> dict:
    br, bk, bd, warps, stages = CONFIGS[kernel]
    opts = dict(BLOCK_R=br, BLOCK_K=bk, BLOCK_D=bd, DOT_FP32=dot_in_fp32(dtype),
                INPUT_PRECISION=dot_precision(dtype), num_warps=warps, num_stages=stages)
    if fp32_dots:
        opts["FP32_PRECISION"] = dot_precision(torch.float32)
    return opts


def _split(kernel: str, rows: int, k: int, device: torch.device) -> tuple[int, int]:
    """(splits of the prototype tiles, tiles per split): about 4 programs per SM in all."""
    br, bk = CONFIGS[kernel][:2]
    tiles = triton.cdiv(k, bk)
    row_blocks = triton.cdiv(rows, br)
    splits = max(1, min(tiles, (4 * num_sms(device)) // row_blocks))
    per = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per), per


def _row_lse(a, v, ra, rv, scale, shift=None, cross=None):
    """Row LSE of y = scale ahat vhat^T - shift over all K (and, with cross = (Z, VZ, RVZ,
    ZSCALE), E_softmax(y)[U]); returns (lse, expectation or None), fp32 (R,)."""
    r, d = a.shape
    k = v.shape[0]
    splits, per = _split("row_lse", r, k, a.device)
    f32 = dict(dtype=torch.float32, device=a.device)
    mpart = torch.empty(splits, r, **f32)
    lpart = torch.empty(splits, r, **f32)
    apart = torch.empty(splits, r, **f32) if cross is not None else mpart
    z, vz, rvz, zscale = cross if cross is not None else (a, v, rv, scale)
    _dino_row_lse_kernel[(triton.cdiv(r, CONFIGS["row_lse"][0]), splits)](
        a, v, ra, rv, scale, shift if shift is not None else rv, z, vz, rvz, zscale,
        mpart, lpart, apart, r, k, d, a.stride(0), v.stride(0), z.stride(0), vz.stride(0), per,
        HAS_SHIFT=shift is not None, HAS_CROSS=cross is not None,
        **_opts("row_lse", a.dtype, True))
    # Merge the splits: LSE = M + log sum_s l_s e^{m_s - M} (every split holds >= 1 column).
    big = mpart.max(dim=0).values
    f = torch.exp(mpart - big)
    lsum = (lpart * f).sum(dim=0)
    lse = big + torch.log(lsum)
    expect = (apart * f).sum(dim=0) / lsum if cross is not None else None
    return lse, expect


def _col_stats(a, v, ra, rv, scale, row_shift=None, col_shift=None):
    """(column sums of the cosines (K,), column LSE of scale cos + row_shift + col_shift or
    None), fp32."""
    r, d = a.shape
    k = v.shape[0]
    f32 = dict(dtype=torch.float32, device=a.device)
    csum = torch.empty(k, **f32)
    has_lse = row_shift is not None
    clse = torch.empty(k, **f32) if has_lse else csum
    _dino_col_stats_kernel[(triton.cdiv(k, CONFIGS["col_stats"][1]),)](
        a, v, ra, rv, scale, row_shift if has_lse else ra, col_shift if has_lse else rv,
        csum, clse, r, k, d, a.stride(0), v.stride(0), HAS_LSE=has_lse,
        **_opts("col_stats", a.dtype))
    return csum, (clse if has_lse else None)


def _pairs(hhat: torch.Tensor, pair_weight: torch.Tensor, t: int, n_global: int,
           cross_view: bool):
    """(Z (T, d) fp32: sum of the normalised student rows paired with each teacher row,
    W (S,) fp32: the summed pair weights of each student row)."""
    s, d = hhat.shape
    if not cross_view:
        return hhat, pair_weight
    b = t // n_global
    n_crops = s // b
    per_sample = hhat.view(n_crops, b, d).sum(dim=0)
    z = per_sample.repeat(n_global, 1) - hhat[:t]
    w = pair_weight.view(n_global, b).sum(dim=0).repeat(n_crops)
    w = torch.cat([w[:t] - pair_weight, w[t:]])
    return z, w


def _unpair(dz: torch.Tensor, s: int, n_global: int, cross_view: bool) -> torch.Tensor:
    """The adjoint of _pairs' Z: dhhat contributions (S, d) from dZ (T, d)."""
    if not cross_view:
        return dz
    t, d = dz.shape
    b = t // n_global
    n_crops = s // b
    out = dz.view(n_global, b, d).sum(dim=0).repeat(n_crops, 1)
    out[:t] -= dz
    return out


def _normalize_backward(x, dxhat, rinv):
    """F.normalize's chain rule: (dxhat - xhat (xhat . dxhat)) / max(||x||, eps); a row whose
    norm is clamped to eps is x / eps, linear."""
    xhat = x.float() * rinv[:, None]
    clamped = rinv >= 1.0 / NORM_EPS
    proj = (xhat * dxhat).sum(dim=1, keepdim=True)
    proj = torch.where(clamped[:, None], torch.zeros_like(proj), proj)
    return (dxhat - xhat * proj) * rinv[:, None]


@_library.triton_kernel("dino_loss_fwd")
def dino_loss_fwd_triton(student_h, teacher_h, weight_student, weight_teacher, teacher_shift,
                         student_scale, teacher_scale, pair_weight, n_global: int,
                         cross_view: bool):
    hs, ht = student_h.contiguous(), teacher_h.contiguous()
    ws, wt = weight_student.contiguous(), weight_teacher.contiguous()
    ra_s, ra_t, rv_s, rv_t = _rinv(hs), _rinv(ht), _rinv(ws), _rinv(wt)
    ss = student_scale.reshape(1).to(torch.float32)
    ts = teacher_scale.reshape(1).to(torch.float32)
    omega = pair_weight.to(torch.float32)
    shift = teacher_shift.to(torch.float32).contiguous()
    z, w = _pairs(hs.float() * ra_s[:, None], omega, ht.shape[0], n_global, cross_view)
    slse, _ = _row_lse(hs, ws, ra_s, rv_s, ss)
    tlse, expect = _row_lse(ht, wt, ra_t, rv_t, ts, shift,
                            cross=(z.contiguous(), ws, rv_s, ss))
    loss = ((w.double() * slse.double()).sum()
            - (omega.double() * expect.double()).sum()).to(torch.float32)
    csum, _ = _col_stats(ht, wt, ra_t, rv_t, ts)
    return loss, slse, tlse, csum


@_library.triton_kernel("dino_loss_bwd")
def dino_loss_bwd_triton(grad, student_h, teacher_h, weight_student, weight_teacher,
                         teacher_shift, student_scale, teacher_scale, pair_weight, student_lse,
                         teacher_lse, n_global: int, cross_view: bool):
    hs, ht = student_h.contiguous(), teacher_h.contiguous()
    ws, wt = weight_student.contiguous(), weight_teacher.contiguous()
    s, d = hs.shape
    k = ws.shape[0]
    ra_s, ra_t, rv_s, rv_t = _rinv(hs), _rinv(ht), _rinv(ws), _rinv(wt)
    ss = student_scale.reshape(1).to(torch.float32)
    ts = teacher_scale.reshape(1).to(torch.float32)
    omega = pair_weight.to(torch.float32)
    shift = teacher_shift.to(torch.float32).contiguous()
    z, w = _pairs(hs.float() * ra_s[:, None], omega, ht.shape[0], n_global, cross_view)
    z = z.contiguous()
    gs = grad.reshape(()).to(torch.float32) * ss.reshape(())
    coef_s = (gs * w).contiguous()
    coef_t = (-gs * omega).contiguous()
    out_dtype = TL_DTYPE[hs.dtype]
    opts = _opts("bwd_rows", hs.dtype)
    f32 = dict(dtype=torch.float32, device=hs.device)

    def rows(a, v, ra, rv, scale, sh, lse, coef):
        r = a.shape[0]
        splits, per = _split("bwd_rows", r, k, a.device)
        part = torch.empty(splits, r, d, **f32)
        grid = (triton.cdiv(r, opts["BLOCK_R"]), triton.cdiv(d, opts["BLOCK_D"]), splits)
        _dino_bwd_rows_kernel[grid](
            a, v, ra, rv, scale, sh if sh is not None else rv, lse.contiguous(), coef, ws, rv_s,
            part, r, k, d, a.stride(0), v.stride(0), ws.stride(0), per,
            HAS_SHIFT=sh is not None, OUT_DTYPE=out_dtype, **opts)
        return part.sum(dim=0)

    # dhhat: the student's own softmax term, then the teacher rows' -omega P_t vhat scattered
    # back to the student rows they pair with.
    dhhat = rows(hs, ws, ra_s, rv_s, ss, None, student_lse, coef_s)
    dz = rows(ht, wt, ra_t, rv_t, ts, shift, teacher_lse, coef_t)
    dhhat = dhhat + _unpair(dz, s, n_global, cross_view)
    dvhat = torch.empty(k, d, **f32)
    cols_opts = _opts("bwd_cols", hs.dtype, True)
    grid = (triton.cdiv(k, cols_opts["BLOCK_K"]), triton.cdiv(d, cols_opts["BLOCK_D"]))
    hhat = (hs.float() * ra_s[:, None]).contiguous()
    _dino_bwd_cols_kernel[grid](hs, ws, ra_s, rv_s, ss, rv_s, student_lse.contiguous(),
                                coef_s, hhat, dvhat, s, k, d, hs.stride(0), ws.stride(0),
                                hhat.stride(0), HAS_SHIFT=False, ACCUMULATE=False, **cols_opts)
    _dino_bwd_cols_kernel[grid](ht, wt, ra_t, rv_t, ts, shift, teacher_lse.contiguous(),
                                coef_t, z, dvhat, ht.shape[0], k, d, ht.stride(0),
                                wt.stride(0), z.stride(0), HAS_SHIFT=True, ACCUMULATE=True,
                                **cols_opts)
    dh = _normalize_backward(hs, dhhat, ra_s)
    dw = _normalize_backward(ws, dvhat, rv_s)
    return dh.to(student_h.dtype), dw.to(weight_student.dtype)


@_library.triton_kernel("dino_teacher_lse")
def dino_teacher_lse_triton(teacher_h, weight_teacher, teacher_scale, row_shift, col_shift):
    ht, wt = teacher_h.contiguous(), weight_teacher.contiguous()
    ra, rv = _rinv(ht), _rinv(wt)
    ts = teacher_scale.reshape(1).to(torch.float32)
    rs = row_shift.to(torch.float32).contiguous()
    cs = col_shift.to(torch.float32).contiguous()
    row, _ = _row_lse(ht, wt, ra, rv, ts, (-cs).contiguous())
    _, col = _col_stats(ht, wt, ra, rv, ts, rs, cs)
    return row + rs, col


# Every configuration the launchers compile, for `fastssl gpu-report` (sm_80 / sm_90).
def _aot_entries() -> list:
    entries = []
    f32 = torch.float32

    def cfg(kernel, dtype, **flags):
        br, bk, bd, warps, stages = CONFIGS[kernel]
        prec = "ieee" if dtype != torch.float32 else fp32_dot_precision()
        return dict(constexprs=dict(BLOCK_R=br, BLOCK_K=bk, BLOCK_D=bd, DOT_FP32=False,
                                    INPUT_PRECISION=prec, **flags),
                    num_warps=warps, num_stages=stages, tensor_cores=True)

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        fp32p = fp32_dot_precision()
        for has_shift, has_cross in ((False, False), (True, True), (True, False)):
            entries.append(_aot.aot_entry(
                _dino_row_lse_kernel, op="dino_loss", dtype=dtype, D=None,
                pointers=dict(A=dtype, V=dtype, RA=f32, RV=f32, SCALE=f32, SHIFT=f32, Z=f32,
                              VZ=dtype, RVZ=f32, ZSCALE=f32, MPART=f32, LPART=f32, APART=f32),
                tag=f"shift{int(has_shift)}cross{int(has_cross)}",
                **cfg("row_lse", dtype, HAS_SHIFT=has_shift, HAS_CROSS=has_cross,
                      FP32_PRECISION=fp32p)))
        for has_lse in (False, True):
            entries.append(_aot.aot_entry(
                _dino_col_stats_kernel, op="dino_loss", dtype=dtype, D=None,
                pointers=dict(A=dtype, V=dtype, RA=f32, RV=f32, SCALE=f32, ROW_SHIFT=f32,
                              COL_SHIFT=f32, CSUM=f32, CLSE=f32),
                tag=f"lse{int(has_lse)}", **cfg("col_stats", dtype, HAS_LSE=has_lse)))
        for has_shift in (False, True):
            entries.append(_aot.aot_entry(
                _dino_bwd_rows_kernel, op="dino_loss", dtype=dtype, D=None,
                pointers=dict(A=dtype, V=dtype, RA=f32, RV=f32, SCALE=f32, SHIFT=f32, LSE=f32,
                              COEF=f32, VO=dtype, RVO=f32, OUT=f32),
                tag=f"shift{int(has_shift)}",
                **cfg("bwd_rows", dtype, HAS_SHIFT=has_shift, OUT_DTYPE=TL_DTYPE[dtype])))
            entries.append(_aot.aot_entry(
                _dino_bwd_cols_kernel, op="dino_loss", dtype=dtype, D=None,
                pointers=dict(A=dtype, V=dtype, RA=f32, RV=f32, SCALE=f32, SHIFT=f32, LSE=f32,
                              COEF=f32, Y=f32, OUT=f32),
                tag=f"shift{int(has_shift)}",
                **cfg("bwd_cols", dtype, HAS_SHIFT=has_shift, ACCUMULATE=has_shift,
                      FP32_PRECISION=fp32p)))
    return entries


AOT_KERNELS = _aot_entries()
