"""Ahead-of-time tile sweep of the contrastive core (fastssl/ops/contrastive_core.py).

Compiles the register-heaviest flag variant ("all") of ``_row_lse_kernel`` and
``_softmax_grad_kernel`` for sm_80 and sm_90 with each candidate tile, and prints one JSON row
per compile: registers and spill bytes (ptxas -v, Triton's ptxas and flags, as
``fastssl gpu-report``), shared memory (Triton's allocation), ``cuobjdump -res-usage`` of the
cubin (REG / STACK / LOCAL), and the tensor-core instruction in the PTX (wgmma / mma).
The table in the module header was picked from its output. Run without TRITON_INTERPRET:

    nice python scripts/sweep_contrastive_core.py [--tiles current] [--d 128 1024] > sweep.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from fastssl.tools.gpu_report import _cuobjdump, _ptxas_stats
from fastssl.ops import contrastive_core as cc

SHARED_LIMIT = {80: 166_912, 90: 232_448}  # max dynamic shared memory per block (opt-in)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (kernel, dtype class, D) -> candidate (BLOCK_M, BLOCK_N, BLOCK_D, warps, stages)
CANDIDATES = {
    ("lse", "half", 64): [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3)],
    ("lse", "half", 128): [(64, 64, 128, 4, 3), (128, 64, 128, 8, 3)],
    ("lse", "half", 256): [(64, 64, 256, 4, 2), (64, 64, 256, 8, 2)],
    ("lse", "half", 1024): [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3)],
    ("grad", "half", 64): [(64, 64, 64, 4, 3), (64, 32, 64, 4, 3)],
    ("grad", "half", 128): [(64, 64, 128, 4, 2), (64, 32, 128, 4, 3), (64, 64, 128, 8, 2)],
    ("grad", "half", 256): [(64, 32, 256, 8, 2), (64, 64, 256, 8, 2)],
    ("grad", "half", 1024): [(64, 64, 64, 4, 3), (64, 64, 64, 8, 3), (64, 128, 64, 8, 3)],
    ("lse", "fp32", 64): [(64, 32, 64, 4, 2), (64, 64, 64, 8, 2)],
    ("lse", "fp32", 128): [(64, 32, 128, 4, 2), (64, 32, 128, 8, 2)],
    ("lse", "fp32", 256): [(64, 32, 256, 8, 2)],
    ("lse", "fp32", 1024): [(64, 32, 32, 4, 2), (64, 64, 32, 4, 2), (64, 64, 32, 8, 2)],
    ("grad", "fp32", 64): [(64, 16, 64, 8, 2), (64, 32, 64, 8, 2)],
    ("grad", "fp32", 128): [(64, 16, 128, 8, 2), (64, 32, 128, 8, 2)],
    ("grad", "fp32", 256): [(64, 16, 256, 8, 2)],
    ("grad", "fp32", 1024): [(64, 32, 32, 4, 2), (64, 32, 32, 8, 2), (64, 64, 32, 8, 2)],
}


def _res_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def compile_one(entry: dict, cap: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=entry["fn"], signature=entry["signature"],
                    constexprs=entry["constexprs"], attrs=entry["attrs"])
    target = GPUTarget("cuda", cap, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": entry["num_warps"],
                                     "num_stages": entry["num_stages"]})
    row = dict(kernel=entry["name"], arch=cap, dtype=entry["dtype"], D=entry["D"],
               triton=triton.__version__)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # a candidate that does not compile is a result, not a crash
        row["error"] = f"{type(exc).__name__}: {str(exc)[-300:]}"
        return row
    ptx = compiled.asm["ptx"]
    regs, spills = _ptxas_stats(ptx, cap)
    shared = int(compiled.metadata.shared)
    row.update(registers=regs, spill_bytes=spills, shared_bytes=shared,
               shared_ok=shared <= SHARED_LIMIT[cap],
               wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx,
               res_usage=_res_usage(compiled.asm["cubin"]))
    return row


def jobs(which: str, widths=(64, 128, 256, 1024)) -> list:
    out = []
    for dname, dtype in DTYPES.items():
        klass = "fp32" if dtype == torch.float32 else "half"
        for cap in (80, 90):
            if which == "current":
                for kernel in ("lse", "grad"):
                    for d in widths:
                        tile = cc.tiles(kernel, dtype, d, cap)
                        out.append((cc.kernel_entry("all", kernel, dtype, d, tile,
                                                    dict(cc.VARIANTS["all"])[kernel], cap),
                                    cap))
                continue
            if dname == "fp16" and which == "candidates":
                continue  # fp16 compiles like bf16 (plus the P scale); checked with "current"
            for (kernel, k_class, d), tiles in CANDIDATES.items():
                if k_class != klass or d not in widths:
                    continue
                for tile in tiles:
                    out.append((cc.kernel_entry("all", kernel, dtype, d, tile,
                                                dict(cc.VARIANTS["all"])[kernel], cap), cap))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", choices=("candidates", "current"), default="candidates")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128, 256, 1024],
                        help="widths to compile (a subset re-checks the worst buckets)")
    args = parser.parse_args()
    todo = jobs(args.tiles, tuple(args.d))
    print(f"# {len(todo)} compiles", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for row in pool.map(lambda job: compile_one(*job), todo):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1 (the sweep compiles for real GPUs)")
    sys.exit(main())
