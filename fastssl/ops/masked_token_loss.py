r"""``masked_token_loss``: the BERT masked-language-model head, output projection and
cross-entropy over the vocabulary, streamed over vocabulary tiles (never the [P, V] logits).

.. math:: s_{iv} = h_i \cdot w_v + b_v,\qquad
          \ell_i = \operatorname{LSE}_v s_{iv} - s_{i,y_i} \quad (y_i \ne \text{ignore\_index})

Ops (CPU kernel ``csrc/cpu/masked_token_loss.cpp``, CUDA kernels below):

* ``masked_token_loss_fwd(hidden [R, H], weight [V, H], bias? [V], labels [R] int64,
  ignore_index) -> (loss [R] fp32, lse [R] fp32)``, 0 at ignored rows in both;
* ``masked_token_loss_bwd(grad [R], hidden, weight, bias?, labels, lse, ignore_index)
  -> (dhidden [R, H], dweight [V, H], dbias [V] or [0] without a bias)``, in the inputs'
  dtypes; ignored rows get a zero gradient.

* ``masked_token_loss_sum(hidden, weight, bias?, labels, ignore_index) -> (loss [] fp32,
  dhidden [R, H] fp32, dweight [V, H] fp32, dbias [V] or [0] fp32)``: the sum of the rows'
  losses and its gradients, formed in the forward (the public function uses it for the "sum"
  and "mean" reductions when a gradient is needed: the upstream gradient is then one scalar);
* ``masked_token_loss_sum_bwd(grad [], hidden, weight, bias?, dhidden, dweight, dbias) ->
  (dhidden, dweight, dbias)`` in the inputs' dtypes: the saved gradients times ``grad``
  (new tensors; bf16 / fp16 written 1 Mi elements at a time, so no whole fp32 product);
* ``masked_token_loss_sum_bwd_(grad [], dhidden!, dweight!, dbias!) -> ()``: the same fp32
  products written over the saved gradients (a Python kernel, CPU and CUDA).

Saved-tensor contract (both devices): ``_fwd``: hidden, weight, bias, labels and ``lse`` (R
floats): O(R + V H), never O(R V). ``_sum``: the three fp32 gradients (O(R H + V H), the
inputs' size in fp32) and hidden / weight / bias (dtypes; no copy). The ``_bwd`` kernels
recompute every logit tile once per kernel that needs it, with dlogits = g_i (softmax_i(v) -
[v = y_i]) (the -1 folded in fp32 before any down-cast).

Memory of ``_sum``'s backward: with fp32 inputs it runs ``_sum_bwd_`` and returns the scaled
buffers themselves, which AccumulateGrad takes as ``.grad`` (no copy): nothing beyond the saved
gradients (BERT-base, P = 4,096: 107 MB; backward-only extra peak 1 MB, was 102 MB with the
out-of-place scaling), so the fused op's peak is its forward's (154 MB, eager 1.43 GB: 1/9.5).
bf16 / fp16 (and fp32 under ``create_graph``, or when the caller of the op still holds its
gradient outputs) run ``_sum_bwd``: the results in the inputs' dtype beside the saved fp32
buffers, which autograd frees as soon as the node has run (bf16 backward-only extra peak 55 MB,
was 141 MB with a whole fp32 product). Since the fp32 backward consumes what its forward saved,
a second backward through the same graph (``retain_graph=True``) raises instead of scaling
again. Under torch.compile the mutation is functionalized (inductor copies the saved gradients
before scaling them, as much memory as the out-of-place op).

Cost (GEMM-equivalents of 2 P V H FLOPs, P = non-ignored rows): ``_sum`` on the CPU 3 in all
(logits, dH, dW: each row block's logits over the whole vocabulary stay in a bounded buffer
while its LSE is formed, then become dlogits in place; csrc/cpu/masked_token_loss.cpp), on the
GPU 5 (the forward kernel and the two backward kernels below, under a unit gradient); ``_fwd``
1 (logits); ``_bwd`` CPU 3 (recompute + dH + dW from one recompute per tile); ``_bwd`` Triton
4 (the dH kernel and the dW kernel each recompute their tiles: each program owns the rows, or
the vocabulary columns, that it writes, so no two programs add into the same gradient --
deterministic, no atomics; Cut Cross-Entropy and Liger trade that for atomics or a [chunk, V]
buffer). An eager PyTorch head costs 3 plus several passes over [P, V] fp32 buffers.

Ignored rows cost nothing on the GPU without a host sync: the launcher orders the row indices
valid-first with a stable device sort and passes the valid count as a device tensor; programs
past it return at once (the grid is sized for all rows; the count is never read on the host).
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from . import _aot, _library
from ._triton_utils import TL_DTYPE, dot_in_fp32, dot_precision, round_cast

_library.define("masked_token_loss_fwd",
                "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index)"
                " -> (Tensor loss, Tensor lse)")
_library.define("masked_token_loss_bwd",
                "(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
                "Tensor lse, int ignore_index) -> (Tensor dhidden, Tensor dweight, "
                "Tensor dbias)")


@torch.library.register_fake("fastssl::masked_token_loss_fwd")
def _fwd_fake(hidden, weight, bias, labels, ignore_index):
    r = hidden.shape[0]
    return (hidden.new_empty((r,), dtype=torch.float32),
            hidden.new_empty((r,), dtype=torch.float32))


def _dbias_shape(weight, bias):
    return (weight.shape[0],) if bias is not None else (0,)


@torch.library.register_fake("fastssl::masked_token_loss_bwd")
def _bwd_fake(grad, hidden, weight, bias, labels, lse, ignore_index):
    bdt = bias.dtype if bias is not None else weight.dtype
    return (torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty(_dbias_shape(weight, bias), dtype=bdt))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_loss, _glse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    dh, dw, db = torch.ops.fastssl.masked_token_loss_bwd(grad_loss, hidden, weight, bias, labels,
                                                         lse, ctx.ignore_index)
    need = ctx.needs_input_grad
    return (dh if need[0] else None, dw if need[1] else None,
            db if (bias is not None and need[2]) else None, None, None)


torch.library.register_autograd("fastssl::masked_token_loss_fwd", _backward,
                                setup_context=_setup_context)
_library.no_double_backward("masked_token_loss_bwd", "masked_token_loss")


# The "sum" / "mean" reductions under autograd: the summed loss and its gradients in one
# forward (the upstream gradient of a sum is one scalar, so the backward only scales them).
_library.define("masked_token_loss_sum",
                "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index)"
                " -> (Tensor loss, Tensor dhidden, Tensor dweight, Tensor dbias)")
# hidden / weight / bias: the output dtypes, and the graph edges that let a double backward
# reach no_double_backward's error (the saved gradients themselves carry no history).
_library.define("masked_token_loss_sum_bwd",
                "(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, Tensor dhidden, "
                "Tensor dweight, Tensor dbias) -> (Tensor dhidden, Tensor dweight, Tensor dbias)")
# fp32 inputs: the saved gradients are already in the output dtype, so the backward scales
# them in place and returns them (no second [V, H] + [R, H] fp32 copy: 107 MB at BERT-base).
_library.define("masked_token_loss_sum_bwd_",
                "(Tensor grad, Tensor(a!) dhidden, Tensor(b!) dweight, Tensor(c!) dbias) -> ()")


@torch.library.register_fake("fastssl::masked_token_loss_sum")
def _sum_fake(hidden, weight, bias, labels, ignore_index):
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty((), **f32), hidden.new_empty(hidden.shape, **f32),
            weight.new_empty(weight.shape, **f32), weight.new_empty(_dbias_shape(weight, bias),
                                                                    **f32))


# bf16 / fp16 gradients are written this many elements at a time (4 MB of fp32 products):
# (dweight * g).to(dtype) in one piece would hold a whole fp32 product ([V, H]: 94 MB at
# BERT-base) beside the saved gradients and the result; mul(out=) of another dtype does the same
# on the CPU.
_CAST_CHUNK = 1 << 20


def _scaled(src, g, dtype):
    """src * g (fp32 products, one rounding to ``dtype``) as a new tensor."""
    if dtype == torch.float32:
        return src * g
    out = torch.empty(src.shape, dtype=dtype, device=src.device)
    flat_src, flat_out = src.reshape(-1), out.view(-1)
    for i in range(0, flat_src.numel(), _CAST_CHUNK):
        flat_out[i:i + _CAST_CHUNK].copy_(flat_src[i:i + _CAST_CHUNK] * g)
    return out


def _scale_grads(grad, hidden, weight, bias, dhidden, dweight, dbias):
    g = grad.to(torch.float32)
    # fp32 products, one rounding to the inputs' dtype (the saved gradients are fp32).
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return (_scaled(dhidden, g, hidden.dtype), _scaled(dweight, g, weight.dtype),
            _scaled(dbias, g, bias_dtype))


def _scale_grads_(grad, dhidden, dweight, dbias) -> None:
    # The same fp32 products as _scale_grads, written over the saved gradients.
    g = grad.to(torch.float32)
    for t in (dhidden, dweight, dbias):
        t.mul_(g)


torch.library.register_kernel("fastssl::masked_token_loss_sum_bwd", ("cpu", "cuda"),
                              _scale_grads)
torch.library.register_kernel("fastssl::masked_token_loss_sum_bwd_", ("cpu", "cuda"),
                              _scale_grads_)


@torch.library.register_fake("fastssl::masked_token_loss_sum_bwd")
def _sum_bwd_fake(grad, hidden, weight, bias, dhidden, dweight, dbias):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            dbias.new_empty(dbias.shape, dtype=bias.dtype if bias is not None else weight.dtype))


@torch.library.register_fake("fastssl::masked_token_loss_sum_bwd_")
def _sum_bwd_inplace_fake(grad, dhidden, dweight, dbias) -> None:
    return None


def _sum_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index = inputs
    ctx.save_for_backward(hidden, weight, bias, *output[1:])
    ctx.has_bias = bias is not None
    # Whether the caller still holds the gradient outputs (masked_token_sum drops them; a direct
    # caller of the op, or opcheck, may not): the backward overwrites them only if not.
    ctx.grad_outputs = [weakref.ref(t) for t in output[1:]]
    ctx.scaled_in_place = False
    # The gradient outputs have no gradient of their own: without this, autograd would hand
    # the backward zero-filled [V, H] / [R, H] fp32 gradients for them (~100 MB at BERT-base).
    ctx.set_materialize_grads(False)


def _sum_backward(ctx, grad_loss, _gdh, _gdw, _gdb):
    if grad_loss is None:  # only the gradient outputs were used: they carry no gradient
        return None, None, None, None, None
    if ctx.scaled_in_place:
        # (Unpacking would also fail, on the saved tensors' version counter, with a message
        # that names neither the op nor the reason.)
        raise RuntimeError(
            "fastssl.masked_token_loss: backward through the same graph a second time "
            "(retain_graph=True) is not supported for an fp32 'mean' / 'sum' loss: the first "
            "backward scaled the gradients its forward saved in place (to keep no second copy "
            "of them); recompute the loss for each backward, or use reduction='none' (whose "
            "backward recomputes) or backend='reference'")
    hidden, weight, bias, dh, dw, db = ctx.saved_tensors
    unseen = all(ref() is None for ref in ctx.grad_outputs)
    if hidden.dtype == torch.float32 and unseen and not torch.is_grad_enabled():
        # In place, then returned: weight.grad (when unset) takes the buffer itself
        # (AccumulateGrad steals a tensor nobody else references: no copy). detach(): the
        # unpacked outputs carry this node as grad_fn; the alias shares their version counter,
        # so a later unpack of the scaled tensors still fails rather than reading them.
        dh, dw, db = dh.detach(), dw.detach(), db.detach()
        torch.ops.fastssl.masked_token_loss_sum_bwd_(grad_loss, dh, dw, db)
        ctx.scaled_in_place = True
    else:
        # bf16 / fp16: the cast makes new (half-size) tensors anyway; create_graph: the
        # out-of-place op keeps the edges to no_double_backward's error and the saved
        # gradients intact.
        dh, dw, db = torch.ops.fastssl.masked_token_loss_sum_bwd(grad_loss, hidden, weight,
                                                                 bias, dh, dw, db)
    need = ctx.needs_input_grad
    return (dh if need[0] else None, dw if need[1] else None,
            db if (ctx.has_bias and need[2]) else None, None, None)


torch.library.register_autograd("fastssl::masked_token_loss_sum", _sum_backward,
                                setup_context=_sum_setup_context)
_library.no_double_backward("masked_token_loss_sum_bwd", "masked_token_loss")


# ---------------------------------------------------------------------------------------
# CUDA kernels (Triton)
# ---------------------------------------------------------------------------------------
#
# Rows are visited through ``order`` (valid rows first, original indices) up to ``n_valid``
# (a device scalar). Tiles: BLOCK_P rows x BLOCK_V vocabulary columns, the logits a GEMM
# K-loop over H in BLOCK_K chunks (fp32 accumulators); gradients are written in BLOCK_K-wide
# panels of H, read-modify-written in fp32 by the one program that owns them.


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, src, rmask, v0, V, H, stride_h, stride_w,
                 BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """s[BLOCK_P, BLOCK_V] fp32 of rows ``src`` (int64 row indices into hidden) and
    vocabulary columns v0.., -inf beyond V."""
    cols = v0 + tl.arange(0, BLOCK_V)
    cmask = cols < V
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_P, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kmask = (k0 + ks) < H
        h = tl.load(h_ptr + src[:, None] * stride_h + (k0 + ks)[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_w + (k0 + ks)[None, :],
                    mask=cmask[:, None] & kmask[None, :], other=0.0)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return tl.where(cmask[None, :], acc, float("-inf"))


@triton.jit
def mtl_fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, order_ptr, nvalid_ptr, loss_ptr, lse_ptr,
                   V, H, stride_h, stride_w,
                   BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # 1. This program's rows (valid-first order); past the valid count: nothing to do.
    start = tl.program_id(0) * BLOCK_P
    n_valid = tl.load(nvalid_ptr)
    if start < n_valid:
        idx = start + tl.arange(0, BLOCK_P)
        rmask = idx < n_valid
        src = tl.load(order_ptr + idx, mask=rmask, other=0).to(tl.int64)
        y = tl.load(y_ptr + src, mask=rmask, other=-1)
        # 2. [Online softmax] running max and sum over the vocabulary tiles (read V H of
        # the weight per row block; write nothing of size V).
        m = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_P], dtype=tl.float32)
        tgt = tl.zeros([BLOCK_P], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            s = _logits_tile(h_ptr, w_ptr, b_ptr, src, rmask, v0, V, H, stride_h, stride_w,
                             BLOCK_P, BLOCK_V, BLOCK_K, HAS_BIAS, DOT_FP32, PRECISION)
            cols = v0 + tl.arange(0, BLOCK_V)
            tgt += tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), axis=1)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new
        lse = m + tl.log(l)
        # (max - target) + log(sum): the precision of log_softmax, not of lse - target.
        tl.store(loss_ptr + src, (m - tgt) + tl.log(l), mask=rmask)
        tl.store(lse_ptr + src, lse, mask=rmask)


@triton.jit
def _dlogits(s, y, g, lse, cols):
    """g_i (softmax - onehot) in fp32 (the target's -1 folded before any down-cast)."""
    p = tl.exp(s - lse[:, None])
    return g[:, None] * (p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0))


@triton.jit
def mtl_bwd_dh_kernel(g_ptr, h_ptr, w_ptr, b_ptr, y_ptr, order_ptr, nvalid_ptr, lse_ptr,
                      dh_ptr, V, H, stride_h, stride_w,
                      BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                      PRECISION: tl.constexpr, IN_DTYPE: tl.constexpr):
    """dH[rows] = sum_v dlogits[rows, v] w_v: the program owns its rows of dh (fp32, zeroed),
    so its read-modify-writes need no atomics."""
    start = tl.program_id(0) * BLOCK_P
    n_valid = tl.load(nvalid_ptr)
    if start < n_valid:
        idx = start + tl.arange(0, BLOCK_P)
        rmask = idx < n_valid
        src = tl.load(order_ptr + idx, mask=rmask, other=0).to(tl.int64)
        y = tl.load(y_ptr + src, mask=rmask, other=-1)
        g = tl.load(g_ptr + src, mask=rmask, other=0.0)
        lse = tl.load(lse_ptr + src, mask=rmask, other=0.0)
        ks = tl.arange(0, BLOCK_K)
        for v0 in range(0, V, BLOCK_V):
            s = _logits_tile(h_ptr, w_ptr, b_ptr, src, rmask, v0, V, H, stride_h, stride_w,
                             BLOCK_P, BLOCK_V, BLOCK_K, HAS_BIAS, DOT_FP32, PRECISION)
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < V
            ds = _dlogits(s, y, g, lse, cols)
            ds = tl.where(cmask[None, :], ds, 0.0)
            # The GPU's dot operand is ds rounded to the input dtype (nearest-even); under
            # the interpreter the same rounded values are multiplied in fp32.
            ds_op = round_cast(ds, IN_DTYPE)
            if DOT_FP32:
                ds_op = ds_op.to(tl.float32)
            for k0 in range(0, H, BLOCK_K):
                kmask = (k0 + ks) < H
                w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_w + (k0 + ks)[None, :],
                            mask=cmask[:, None] & kmask[None, :], other=0.0)
                if DOT_FP32:
                    w = w.to(tl.float32)
                ptrs = dh_ptr + src[:, None] * H + (k0 + ks)[None, :]
                pmask = rmask[:, None] & kmask[None, :]
                acc = tl.load(ptrs, mask=pmask, other=0.0)
                acc = tl.dot(ds_op, w, acc, input_precision=PRECISION)
                tl.store(ptrs, acc, mask=pmask)


@triton.jit
def mtl_bwd_dw_kernel(g_ptr, h_ptr, w_ptr, b_ptr, y_ptr, order_ptr, nvalid_ptr, lse_ptr,
                      dw_ptr, db_ptr, V, H, stride_h, stride_w,
                      BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                      PRECISION: tl.constexpr, IN_DTYPE: tl.constexpr):
    """dW[cols] = sum_i dlogits[i, cols]^T h_i and db[cols]: the program owns its vocabulary
    columns of dw / db (fp32, zeroed) and visits the valid rows in a fixed order."""
    v0 = tl.program_id(0) * BLOCK_V
    n_valid = tl.load(nvalid_ptr)
    cols = v0 + tl.arange(0, BLOCK_V)
    cmask = cols < V
    ks = tl.arange(0, BLOCK_K)
    dbias = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_valid, BLOCK_P):
        idx = start + tl.arange(0, BLOCK_P)
        rmask = idx < n_valid
        src = tl.load(order_ptr + idx, mask=rmask, other=0).to(tl.int64)
        y = tl.load(y_ptr + src, mask=rmask, other=-1)
        g = tl.load(g_ptr + src, mask=rmask, other=0.0)
        lse = tl.load(lse_ptr + src, mask=rmask, other=0.0)
        s = _logits_tile(h_ptr, w_ptr, b_ptr, src, rmask, v0, V, H, stride_h, stride_w,
                         BLOCK_P, BLOCK_V, BLOCK_K, HAS_BIAS, DOT_FP32, PRECISION)
        ds = _dlogits(s, y, g, lse, cols)
        ds = tl.where(rmask[:, None] & cmask[None, :], ds, 0.0)
        dbias += tl.sum(ds, axis=0)
        ds_op = round_cast(ds, IN_DTYPE)
        if DOT_FP32:
            ds_op = ds_op.to(tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kmask = (k0 + ks) < H
            h = tl.load(h_ptr + src[:, None] * stride_h + (k0 + ks)[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            if DOT_FP32:
                h = h.to(tl.float32)
            ptrs = dw_ptr + cols.to(tl.int64)[:, None] * H + (k0 + ks)[None, :]
            pmask = cmask[:, None] & kmask[None, :]
            acc = tl.load(ptrs, mask=pmask, other=0.0)
            acc = tl.dot(tl.trans(ds_op), h, acc, input_precision=PRECISION)
            tl.store(ptrs, acc, mask=pmask)
    if HAS_BIAS:
        tl.store(db_ptr + cols, dbias, mask=cmask)


# (BLOCK_P, BLOCK_V, BLOCK_K, num_warps, num_stages) per (kernel, fp32 inputs?), from the
# ahead-of-time sweep (`fastssl gpu-report --only masked_token_loss`, triton 3.9, H = 768):
# 64 x 64 x 64 at 4 warps spilled 336-3,956 B everywhere (the gathered-row pointer tiles and
# the masks are [64, 64] each); BLOCK_K = 32 at 8 warps holds 128-248 registers with 0 spills
# on sm_80 and sm_90, except fp32 (bf16x3 splits each operand into three) dh / dw on sm_80
# (16 / 228 B), which take 32-row blocks.
TILES = {("fwd", False): (64, 64, 32, 8, 2), ("dh", False): (64, 64, 32, 8, 2),
         ("dw", False): (64, 64, 32, 8, 2), ("fwd", True): (64, 64, 32, 8, 2),
         ("dh", True): (32, 64, 32, 8, 2), ("dw", True): (32, 64, 32, 8, 2)}


def _prologue(hidden, labels, ignore_index):
    """(order: valid rows first, stable; n_valid: 1-element int32 device tensor). No host
    sync: a device sort and a device sum."""
    valid = labels != ignore_index
    order = torch.argsort((~valid).to(torch.int8), stable=True).to(torch.int32)
    n_valid = valid.sum(dtype=torch.int32).reshape(1)
    return order, n_valid


def _flags(hidden):
    return dict(DOT_FP32=dot_in_fp32(hidden.dtype), PRECISION=dot_precision(hidden.dtype))


@_library.triton_kernel("masked_token_loss_fwd")
def masked_token_loss_fwd_triton(hidden, weight, bias, labels, ignore_index: int):
    hidden, weight = hidden.contiguous(), weight.contiguous()
    labels = labels.contiguous()
    r, h = hidden.shape
    v = weight.shape[0]
    loss = torch.zeros(r, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(r, dtype=torch.float32, device=hidden.device)
    order, n_valid = _prologue(hidden, labels, ignore_index)
    bp, bv, bk, nw, ns = TILES["fwd", hidden.dtype == torch.float32]
    b = bias.contiguous() if bias is not None else hidden  # unread without HAS_BIAS
    mtl_fwd_kernel[(triton.cdiv(r, bp),)](
        hidden, weight, b, labels, order, n_valid, loss, lse, v, h, hidden.stride(0),
        weight.stride(0), BLOCK_P=bp, BLOCK_V=bv, BLOCK_K=bk, HAS_BIAS=bias is not None,
        num_warps=nw, num_stages=ns, **_flags(hidden))
    return loss, lse


@_library.triton_kernel("masked_token_loss_bwd")
def masked_token_loss_bwd_triton(grad, hidden, weight, bias, labels, lse, ignore_index: int):
    dh, dw, db = _bwd_fp32(grad, hidden, weight, bias, labels, lse, ignore_index)
    db = db.to(bias.dtype) if bias is not None else db.to(weight.dtype)
    return dh.to(hidden.dtype), dw.to(weight.dtype), db


@_library.triton_kernel("masked_token_loss_sum")
def masked_token_loss_sum_triton(hidden, weight, bias, labels, ignore_index: int):
    """The GPU keeps the recompute: the forward kernel, then the dH and dW kernels under a unit
    upstream gradient (each program owns what it writes, so the logits are recomputed per
    kernel; no [rows, V] buffer)."""
    loss, lse = masked_token_loss_fwd_triton(hidden, weight, bias, labels, ignore_index)
    ones = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    return (loss.sum(),) + _bwd_fp32(ones, hidden, weight, bias, labels, lse, ignore_index)


def _bwd_fp32(grad, hidden, weight, bias, labels, lse, ignore_index):
    hidden, weight = hidden.contiguous(), weight.contiguous()
    labels, lse = labels.contiguous(), lse.contiguous()
    g = grad.to(torch.float32).contiguous()
    r, h = hidden.shape
    v = weight.shape[0]
    order, n_valid = _prologue(hidden, labels, ignore_index)
    b = bias.contiguous() if bias is not None else hidden
    dh = torch.zeros(r, h, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(v, h, dtype=torch.float32, device=hidden.device)
    db = torch.zeros(v if bias is not None else 0, dtype=torch.float32, device=hidden.device)
    common = dict(HAS_BIAS=bias is not None, IN_DTYPE=TL_DTYPE[hidden.dtype], **_flags(hidden))
    bp, bv, bk, nw, ns = TILES["dh", hidden.dtype == torch.float32]
    mtl_bwd_dh_kernel[(triton.cdiv(r, bp),)](
        g, hidden, weight, b, labels, order, n_valid, lse, dh, v, h, hidden.stride(0),
        weight.stride(0), BLOCK_P=bp, BLOCK_V=bv, BLOCK_K=bk, num_warps=nw, num_stages=ns,
        **common)
    bp, bv, bk, nw, ns = TILES["dw", hidden.dtype == torch.float32]
    mtl_bwd_dw_kernel[(triton.cdiv(v, bv),)](
        g, hidden, weight, b, labels, order, n_valid, lse, dw, db if bias is not None else dw,
        v, h, hidden.stride(0), weight.stride(0), BLOCK_P=bp, BLOCK_V=bv, BLOCK_K=bk,
        num_warps=nw, num_stages=ns, **common)
    return dh, dw, db


def _aot_entries():
    """One configuration per (kernel, dtype, bias): H is a runtime argument (the K-loop runs
    over it in BLOCK_K chunks), so the same compile serves every width; it is listed at each
    width of the report's sweep (gpu-report compiles it once: its cache key is the compiled
    configuration, not the label)."""
    from .contrastive_core import SWEEP_D
    out = []
    for dtype, d in ((dt, d) for dt in (torch.float32, torch.bfloat16, torch.float16)
                     for d in SWEEP_D):
        prec = "ieee" if dtype != torch.float32 else "bf16x3"
        for has_bias in (True, False):
            base = dict(HAS_BIAS=has_bias, DOT_FP32=False, PRECISION=prec)
            tag = "bias" if has_bias else "nobias"
            bp, bv, bk, nw, ns = TILES["fwd", dtype == torch.float32]
            out.append(_aot.aot_entry(
                mtl_fwd_kernel, op="masked_token_loss", dtype=dtype, D=d, tag=tag,
                pointers=dict(h_ptr=dtype, w_ptr=dtype, b_ptr=dtype, y_ptr=torch.int64,
                              order_ptr=torch.int32, nvalid_ptr=torch.int32,
                              loss_ptr=torch.float32, lse_ptr=torch.float32),
                constexprs=dict(base, BLOCK_P=bp, BLOCK_V=bv, BLOCK_K=bk),
                tensor_cores=True, num_warps=nw, num_stages=ns))
            for kind, kernel, extra in (
                    ("dh", mtl_bwd_dh_kernel, dict(dh_ptr=torch.float32)),
                    ("dw", mtl_bwd_dw_kernel, dict(dw_ptr=torch.float32,
                                                   db_ptr=torch.float32))):
                bp, bv, bk, nw, ns = TILES[kind, dtype == torch.float32]
                out.append(_aot.aot_entry(
                    kernel, op="masked_token_loss", dtype=dtype, D=d, tag=tag,
                    pointers=dict(g_ptr=torch.float32, h_ptr=dtype, w_ptr=dtype, b_ptr=dtype,
                                  y_ptr=torch.int64, order_ptr=torch.int32,
                                  nvalid_ptr=torch.int32, lse_ptr=torch.float32, **extra),
                    constexprs=dict(base, BLOCK_P=bp, BLOCK_V=bv, BLOCK_K=bk,
                                    IN_DTYPE=TL_DTYPE[dtype]),
                    tensor_cores=True, num_warps=nw, num_stages=ns))
    return out


# Every kernel configuration the launchers use, for `fastssl gpu-report`.
AOT_KERNELS = _aot_entries()


def masked_token_rows(hidden, weight, bias, labels, ignore_index: int):
    """Per-row losses (R,) fp32, 0 at ignored rows."""
    loss, _lse = torch.ops.fastssl.masked_token_loss_fwd(hidden, weight, bias, labels,
                                                          ignore_index)
    return loss


def masked_token_sum(hidden, weight, bias, labels, ignore_index: int):
    """Sum of the per-row losses (0-d fp32); its gradients are formed in the forward and
    saved (O(R H + V H) fp32), the backward scales them by the upstream scalar."""
    loss, _dh, _dw, _db = torch.ops.fastssl.masked_token_loss_sum(hidden, weight, bias, labels,
                                                                  ignore_index)
    return loss
