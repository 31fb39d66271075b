"""MoCo enqueue on this CPU: fused MoCoQueue.enqueue vs the device-index reference
(index_copy_) vs the official index-assignment style (int(ptr) + slices), interleaved.

    python benchmarks/enqueue_compare.py [--reps 200]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastssl.tools.bench import op_queue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    spec = op_queue.BENCHES[0]
    providers = {"fused": spec.fused, "reference": spec.reference, "official": op_queue.official}
    print(f"enqueue into K = {op_queue.QUEUE} x D = {op_queue.DIM} fp32 (wrapping), "
          f"{args.reps} interleaved reps; times in us: best / median")
    for size in spec.sizes:
        inp = spec.make_inputs(size, torch.float32, torch.device("cpu"))
        times = {k: [] for k in providers}
        for fn in providers.values():
            fn(inp)
        for _ in range(args.reps):
            for name, fn in providers.items():
                t0 = time.perf_counter()
                fn(inp)
                times[name].append((time.perf_counter() - t0) * 1e6)
        row = "  ".join(f"{k} {min(v):7.1f} / {statistics.median(v):7.1f}" for k, v in times.items())
        print(f"B = {size:5d}: {row}")


if __name__ == "__main__":
    main()
