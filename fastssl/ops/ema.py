"""Multi-tensor EMA (momentum) update in Triton: one launch for a whole model.

    target_k <- lerp(target_k, online_k, w),  w = 1 - momentum,  for every tensor k

Naive version (official MoCo / BYOL code): a Python loop with one or two kernels per tensor,
161 launches for a ResNet-50, most of them on BatchNorm vectors of 64-2048 elements that
leave the GPU idle. Here every tensor is cut into chunks of ``CHUNK`` elements and one
program handles one chunk of one tensor; two small device tables say which:

* ``target_ptrs``, ``online_ptrs``, ``numels``, ``first_chunk``: per tensor (int64 addresses,
  sizes, index of its first chunk),
* ``chunk_owner``: per chunk, the tensor it belongs to (int32).

Traffic per fp32 element: read 4 + 4 bytes, write 4 bytes -- the same as one ``lerp_`` on a
flat buffer; the tables add 4 bytes + a few cached scalars per 16 K-element chunk. They are
built once per set of tensors (keyed by their addresses) and cached on the device, so a
training loop that updates the same model every step pays no host-to-device copy.

The arithmetic is PyTorch's two-sided lerp with a single fma (``csrc/common/moco_math.h``):
``fma(w, o - t, t)`` for w < 0.5, ``fma(w - 1, o - t, o)`` otherwise.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from . import _library
from ._triton_utils import TL_DTYPE, TL_TYPE

# 16 K elements per program: 192 KiB of fp32 traffic, enough to hide the table loads; a
# ResNet-50 (25.6 M parameters, 161 tensors) becomes ~1.7 K programs, >12 waves on 132 SMs.
CHUNK = 16384
BLOCK = 2048  # 8 fp32 per thread at 8 warps: two 16-byte vector loads per operand
NUM_WARPS = 8



@triton.jit
def ema_multi_tensor_kernel(target_ptrs, online_ptrs, numels, first_chunk, chunk_owner, weight,
                            weight_lo, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                            TARGET: tl.constexpr, ONLINE: tl.constexpr, COMPUTE: tl.constexpr,
                            ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    # 1. Which tensor and which chunk of it: 1 int32 + 4 int64 scalar loads (L2-resident).
    k = tl.load(chunk_owner + pid)
    t_ptr = tl.load(target_ptrs + k).to(tl.pointer_type(TARGET))
    o_ptr = tl.load(online_ptrs + k).to(tl.pointer_type(ONLINE))
    if ALIGNED:
        # Addresses read from a table carry no alignment information; the launcher checked
        # that every base is 16-byte aligned, which (chunks start at multiples of CHUNK)
        # lets the full chunks use 16-byte vector loads and stores.
        t_ptr = tl.multiple_of(t_ptr, 16)
        o_ptr = tl.multiple_of(o_ptr, 16)
    n = tl.load(numels + k)
    begin = (pid - tl.load(first_chunk + k)) * CHUNK  # int64: tensors may exceed 2^31
    # 2. [PyTorch lerp, two-sided] pick the end the fma starts from once per program.
    # A Python float arrives as fp32: the weight travels as an fp32 pair (hi + lo), exact to
    # ~1e-15 once summed in fp64 (fp64 EMAs); for fp32 the low part changes nothing.
    w = tl.cast(weight, COMPUTE) + tl.cast(weight_lo, COMPUTE)
    small = w < 0.5
    coeff = tl.where(small, w, w - 1.0)
    # 3. Stream the chunk: read 2 x CHUNK elements, write CHUNK elements. Full chunks (all
    #    but each tensor's last) run without a mask, so the loads vectorise.
    if begin + CHUNK <= n:
        for off in tl.range(0, CHUNK, BLOCK):
            idx = begin + off + tl.arange(0, BLOCK)
            t = tl.load(t_ptr + idx).to(COMPUTE)
            o = tl.load(o_ptr + idx).to(COMPUTE)
            out = tl.fma(coeff, o - t, tl.where(small, t, o))
            tl.store(t_ptr + idx, out.to(TARGET))
    else:
        for off in tl.range(0, CHUNK, BLOCK):
            idx = begin + off + tl.arange(0, BLOCK)
            mask = idx < n
            t = tl.load(t_ptr + idx, mask=mask).to(COMPUTE)
            o = tl.load(o_ptr + idx, mask=mask).to(COMPUTE)
            out = tl.fma(coeff, o - t, tl.where(small, t, o))
            tl.store(t_ptr + idx, out.to(TARGET), mask=mask)


# Configurations the launcher uses, for `fastssl gpu-report` (compiled for sm_80 / sm_90).
def _aot(target: torch.dtype, online: torch.dtype, aligned: bool = True) -> dict:
    compute = torch.float64 if target == torch.float64 else torch.float32
    return {
        "name": f"ema_multi_tensor_kernel[{TL_TYPE[target]}<-{TL_TYPE[online]}"
                f"{'' if aligned else ',unaligned'}]",
        "fn": ema_multi_tensor_kernel,
        "signature": {"target_ptrs": "*i64", "online_ptrs": "*i64", "numels": "*i64",
                      "first_chunk": "*i64", "chunk_owner": "*i32", "weight": "fp32",
                      "weight_lo": "fp32",
                      "CHUNK": "constexpr", "BLOCK": "constexpr", "TARGET": "constexpr",
                      "ONLINE": "constexpr", "COMPUTE": "constexpr", "ALIGNED": "constexpr"},
        "constexprs": {"CHUNK": CHUNK, "BLOCK": BLOCK, "TARGET": TL_DTYPE[target],
                       "ONLINE": TL_DTYPE[online], "COMPUTE": TL_DTYPE[compute], "ALIGNED": aligned},
        "num_warps": NUM_WARPS,
        "tensor_cores": False,
    }


AOT_KERNELS = [_aot(torch.float32, torch.float32), _aot(torch.float32, torch.bfloat16),
               _aot(torch.bfloat16, torch.bfloat16), _aot(torch.float32, torch.float32, False)]

# Device tables per tensor set, keyed by the tensors' addresses, sizes and dtypes: a model
# updated every step hits the cache and the launch needs no host-to-device copy.
_TABLES: OrderedDict = OrderedDict()
_CACHE_SIZE = 16


def _tables(targets: list, onlines: list, device: torch.device):
    key = (device, tuple((t.data_ptr(), o.data_ptr(), t.numel()) for t, o in zip(targets, onlines)))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    numels = [t.numel() for t in targets]
    chunks = [triton.cdiv(n, CHUNK) for n in numels]
    first, acc = [], 0
    for c in chunks:
        first.append(acc)
        acc += c
    owner = torch.repeat_interleave(torch.arange(len(targets), dtype=torch.int32),
                                    torch.tensor(chunks, dtype=torch.int64))
    i64 = torch.tensor([[t.data_ptr() for t in targets], [o.data_ptr() for o in onlines],
                        numels, first], dtype=torch.int64)
    i64, owner = i64.to(device), owner.to(device)
    hit = (i64[0], i64[1], i64[2], i64[3], owner, acc)
    _TABLES[key] = hit
    if len(_TABLES) > _CACHE_SIZE:
        _TABLES.popitem(last=False)
    return hit


def ema_update_(targets: list, onlines: list, weight: float) -> None:
    """``target <- lerp(target, online, weight)`` for every pair, in one launch per (target
    dtype, online dtype) group (one launch for a model in one dtype).

    Args:
        targets: tensors updated in place (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        onlines: tensors of the same shapes, dtypes as checked by ``fastssl.ema_update_``.
        weight: ``1 - momentum`` in [0, 1].

    Tensors that are not dense, or whose strides differ between target and online, are
    updated with ``lerp_`` one by one (same math).
    """
    groups: dict = {}
    for t, o in zip(targets, onlines):
        if t.numel() == 0:
            continue
        if t.is_contiguous() and o.is_contiguous():
            aligned = (t.data_ptr() | o.data_ptr()) % 16 == 0
            g = groups.setdefault((t.dtype, o.dtype, aligned), ([], []))
            g[0].append(t)
            g[1].append(o)
        else:
            t.lerp_(o.to(t.dtype), weight)
    w_hi = float(torch.tensor(float(weight), dtype=torch.float32))
    w_lo = float(weight) - w_hi
    for (tdt, odt, aligned), (ts, os_) in groups.items():
        device = ts[0].device
        tp, op, numels, first, owner, n_chunks = _tables(ts, os_, device)
        compute = tl.float64 if tdt == torch.float64 else tl.float32
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            ema_multi_tensor_kernel[(n_chunks,)](
                tp, op, numels, first, owner, w_hi, w_lo, CHUNK=CHUNK, BLOCK=BLOCK,
                TARGET=TL_DTYPE[tdt], ONLINE=TL_DTYPE[odt], COMPUTE=compute, ALIGNED=aligned,
                num_warps=NUM_WARPS)


# ---------------------------------------------------------------------------------------
# The op ``fastssl::ema_update_``: CPU kernel csrc/cpu/ema.cpp, CUDA C++ kernel
# csrc/cuda/ema.cu (when built with CUDA). The Triton launcher above is the CUDA path that
# needs no compiled extension (backend "triton"). In place, no autograd (runs under no_grad).
# ---------------------------------------------------------------------------------------

_library.define("ema_update_", "(Tensor(a!)[] target, Tensor[] online, float weight) -> ()")


@torch.library.register_fake("fastssl::ema_update_")
def _ema_update_fake(target, online, weight) -> None:
    # A list that mixes devices dispatches here when one of them is "meta": say so, as the
    # device kernels do.
    devices = {t.device for t in target} | {o.device for o in online}
    if len(devices) > 1:
        raise RuntimeError(f"ema_update_: tensors on several devices: {sorted(map(str, devices))}")
    return None
