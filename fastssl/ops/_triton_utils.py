"""Shared switches for every Triton kernel in ``fastssl/ops`` (the ONE place that knows about
the Triton interpreter and about fp32 tensor-core precision).

* ``INTERPRET``: ``TRITON_INTERPRET=1`` was set before import; kernels then run on CPU tensors
  (tests only). Read once, like Triton itself does.
* ``dot_in_fp32(dtype)``: the interpreter stores bf16 as uint16 and its ``tl.dot`` multiplies
  the raw bit patterns (triton-lang/triton#11584). Launchers pass this as a constexpr; kernels
  then cast bf16 dot operands to fp32 first. A product of two bf16 values is exact in fp32, so
  the math equals the tensor-core path up to summation order. Never true on a GPU.
* ``fp32_dot_precision()``: how ``tl.dot`` treats **fp32** inputs on a GPU, from
  ``FASTSSL_FP32_DOT``: ``"bf16x3"`` (default: each operand split in two bf16 halves, three
  tensor-core products, ~1e-5 relative, 3x the bf16 tensor-core work), ``"tf32"`` (one TF32
  product: fastest, ~1e-3 relative: below fp32's 1e-4 bar), ``"tf32x3"`` (~1e-6, but its
  operand halves spill registers in fastssl's tiles: see ``fastssl gpu-report``) or ``"ieee"``
  (exact fp32 FMAs on CUDA cores: no tensor cores, slowest). bf16/fp16 inputs always use the
  tensor cores with fp32 accumulation; the switch does not apply to them. Under the
  interpreter fp32 products are exact whatever the switch says.
"""
from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FP32_DOT_PRECISIONS = ("bf16x3", "tf32", "tf32x3", "ieee")

# The one dtype-name map: torch dtype -> Triton's name for it (signature types of the
# ahead-of-time compiles, report entries) and -> the tl dtype (constexpr arguments).
TL_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
           torch.float64: "fp64"}
TL_DTYPE = {dtype: getattr(tl, str(dtype).removeprefix("torch.")) for dtype in TL_TYPE}

# What the launchers assume for the SM count under the interpreter: small, so that the
# column-split path of the grids is exercised by small test shapes.
INTERPRET_NUM_SMS = 16


def dot_in_fp32(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def fp32_dot_precision() -> str:
    """``tl.dot(input_precision=...)`` for fp32 inputs; see the module docstring."""
    value = os.environ.get("FASTSSL_FP32_DOT", "bf16x3") or "bf16x3"
    if value not in FP32_DOT_PRECISIONS:
        raise ValueError(f"FASTSSL_FP32_DOT must be one of {FP32_DOT_PRECISIONS}, got {value!r}")
    return value


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for a launch's ``tl.dot`` calls: the ``FASTSSL_FP32_DOT`` choice for
    fp32 inputs on a GPU, "ieee" otherwise (bf16/fp16 always run on tensor cores with fp32
    accumulation, and the interpreter multiplies fp32 exactly)."""
    if dtype != torch.float32 or INTERPRET:
        return "ieee"
    return fp32_dot_precision()


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``INTERPRET_NUM_SMS`` on CPU tensors)."""
    if device.type != "cuda":
        return INTERPRET_NUM_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


# ---------------------------------------------------------------------------------------
# GPU-faithful down-casts under the interpreter
# ---------------------------------------------------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_INTERPRET_RNE = tl.constexpr(INTERPRET)


@triton.jit
def round_cast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` for an fp32 tile, rounded to nearest-even on every backend.

    On a GPU this is ``x.to(dtype)`` (Triton's fp32 -> bf16/fp16 down-cast rounds to nearest
    even). The interpreter truncates fp32 -> bf16 (it drops the low 16 bits), which hides
    exactly the rounding errors a GPU makes; so there the fp32 bits are first rounded to the
    nearest-even bf16 value (add 0x7FFF + the kept LSB, clear the low half), after which the
    truncating cast is exact. NaN stays NaN; a value that rounds past bf16's max becomes inf,
    as on the GPU. fp16 and fp32 targets cast directly (numpy rounds to nearest even)."""
    if _INTERPRET_RNE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            rounded = bits.to(tl.float32, bitcast=True)
            x = tl.where(x != x, x, rounded)
    return x.to(dtype)


@triton.jit
def merge_lse_partials(MPART, LPART, PPART, rows, inb, M, SPLITS, EXP2: tl.constexpr):
    """Merges the column splits' online-softmax partials of rows ``rows`` (split ``s`` at
    ``s * M``): returns (shift, total, pos) with LSE = shift + log(total) (shift = 0 for a row
    with no valid column: total is then 0). Split order fixed: deterministic. EXP2: the
    partials' sums were taken with exp2((S - m) log2 e) (NT-Xent) instead of exp(S - m)."""
    m = tl.full(rows.shape, float("-inf"), tl.float32)
    for s in range(SPLITS):
        m = tl.maximum(m, tl.load(MPART + s * M + rows, mask=inb, other=float("-inf")))
    shift = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros(rows.shape, tl.float32)
    pos = tl.zeros(rows.shape, tl.float32)
    for s in range(SPLITS):
        ms = tl.load(MPART + s * M + rows, mask=inb, other=float("-inf"))
        if EXP2:
            rescale = tl.exp2((ms - shift) * 1.4426950408889634)
        else:
            rescale = tl.exp(ms - shift)
        total += tl.load(LPART + s * M + rows, mask=inb, other=0.0) * rescale
        # the target lies in one split; the others add an exact 0.
        pos += tl.load(PPART + s * M + rows, mask=inb, other=0.0)
    return shift, total, pos
