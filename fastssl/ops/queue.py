"""Fused MoCo key-queue enqueue in Triton: one launch, no host sync.

Naive version (official MoCo, ``moco/builder.py``)::

    ptr = int(self.queue_ptr)                      # device -> host copy: a sync per step
    assert self.K % batch_size == 0                # wrap-around unsupported
    self.queue[:, ptr:ptr + batch_size] = keys.T
    self.queue_ptr[0] = (ptr + batch_size) % self.K

Here the pointer stays on the device. Each program reads it, writes its ``BLOCK_R`` key rows
to slots ``(ptr + i) mod size`` (wrap-around loses nothing; with B > size only the newest
``size`` rows are written, each once), then takes a ticket from an int32 counter; the
program that draws the last ticket has seen every other program's read of ``ptr`` and
advances it, then resets the counter for the next call ("last block done" pattern). The
index math is the one of ``csrc/common/moco_math.h``.

Traffic: read and write min(B, size) x dim elements; 3 scalars per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _library
from ._triton_utils import TL_TYPE

BLOCK_R = 8  # key rows per program: 8 x 128 = 8 elements per thread at 4 warps (32 rows: 240+ registers)
MAX_BLOCK_D = 128
NUM_WARPS = 4



@triton.jit
def moco_enqueue_kernel(buffer, ptr, counter, keys, batch, size, first,
                        DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    # 1. Read the write pointer (every program, before any program can advance it).
    p = tl.load(ptr)
    rows = (first + pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < batch
    slots = (p + rows) % size
    # 2. Copy the rows: read BLOCK_R x DIM keys, write them to their ring-buffer slots. The
    #    queue's dim is a constexpr (one compile per queue), so when BLOCK_D divides it the
    #    mask is per row only and stays constant along a row: with the 16-byte alignment that
    #    Triton specialises pointer arguments on, the copies use 16-byte vectors.
    for d0 in tl.range(0, DIM, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        if DIM % BLOCK_D == 0:
            m = row_ok[:, None]
        else:
            m = row_ok[:, None] & (cols[None, :] < DIM)
        k = tl.load(keys + rows[:, None] * DIM + cols[None, :], mask=m)
        tl.store(buffer + slots[:, None] * DIM + cols[None, :], k, mask=m)
    # 3. Last program done advances the pointer: all reads of `ptr` happened before the
    #    tickets were taken (barrier + acq_rel atomic).
    tl.debug_barrier()
    ticket = tl.atomic_add(counter, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        tl.store(ptr, (p + batch % size) % size)
        tl.store(counter, 0)


def _aot(buf: torch.dtype, key: torch.dtype, dim: int = 128, aligned: bool = True) -> dict:
    name = TL_TYPE
    return {
        "name": f"moco_enqueue_kernel[{name[buf]}<-{name[key]},D={dim}"
                f"{'' if aligned else ',unaligned'}]",
        "fn": moco_enqueue_kernel,
        "signature": {"buffer": f"*{name[buf]}", "ptr": "*i64", "counter": "*i32",
                      "keys": f"*{name[key]}", "batch": "i32", "size": "i32", "first": "i32",
                      "DIM": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
        "constexprs": {"DIM": dim, "BLOCK_R": BLOCK_R,
                       "BLOCK_D": min(MAX_BLOCK_D, triton.next_power_of_2(dim))},
        # What the JIT specialises a launch on: 16-byte aligned buffer and keys (torch's
        # allocations are). ASTSource(attrs=...) format, keyed by argument index.
        "attrs": ({(0,): [["tt.divisibility", 16]], (3,): [["tt.divisibility", 16]]}
                  if aligned else {}),
        "num_warps": NUM_WARPS,
        "tensor_cores": False,
    }


AOT_KERNELS = [_aot(torch.float32, torch.float32), _aot(torch.bfloat16, torch.bfloat16),
               _aot(torch.float32, torch.float32, dim=130, aligned=False)]


def moco_enqueue(buffer: torch.Tensor, ptr: torch.Tensor, counter: torch.Tensor,
                 keys: torch.Tensor) -> None:
    """Launches the enqueue. ``buffer`` (size, dim) contiguous, ``ptr`` 0-dim int64,
    ``counter`` (1,) int32 holding 0, ``keys`` (B, dim), all on one device (CUDA, or CPU under
    the interpreter)."""
    batch, dim = keys.shape
    size = buffer.shape[0]
    if batch == 0:
        return
    keys = keys.contiguous()
    first = batch - size if batch > size else 0
    grid = (triton.cdiv(batch - first, BLOCK_R),)
    moco_enqueue_kernel[grid](buffer, ptr, counter, keys, batch, size, first, DIM=dim,
                              BLOCK_R=BLOCK_R, BLOCK_D=min(MAX_BLOCK_D, triton.next_power_of_2(dim)),
                              num_warps=NUM_WARPS)


# An opaque custom op around the launch, so a torch.compile(fullgraph=True) step that
# enqueues on CUDA keeps the kernel (and its in-place writes) in the graph.
@torch.library.custom_op("fastssl::moco_enqueue_triton_", mutates_args=("buffer", "ptr", "counter"))
def moco_enqueue_triton_(buffer: torch.Tensor, ptr: torch.Tensor, counter: torch.Tensor,
                         keys: torch.Tensor) -> None:
    if buffer.device.type == "cuda":
        with torch.cuda.device(buffer.device):
            moco_enqueue(buffer, ptr, counter, keys)
    else:
        moco_enqueue(buffer, ptr, counter, keys)


@moco_enqueue_triton_.register_fake
def _(buffer, ptr, counter, keys) -> None:
    return None


# The op ``fastssl::moco_enqueue_``: CPU kernel csrc/cpu/queue.cpp, CUDA C++ kernel
# csrc/cuda/queue.cu. It writes the queue buffer, its pointer and (on CUDA) a scratch counter
# in place and returns nothing, so it traces into torch.compile graphs as one node.
_library.define("moco_enqueue_", "(Tensor(a!) buffer, Tensor(b!) ptr, Tensor(c!) counter, "
                "Tensor keys) -> ()")


@torch.library.register_fake("fastssl::moco_enqueue_")
def _moco_enqueue_fake(buffer, ptr, counter, keys) -> None:
    return None
