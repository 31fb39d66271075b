"""EMA acceptance check: fused ema_update_ vs torch._foreach_lerp_ vs one flat lerp_ (the
bandwidth floor), side by side in one process, providers interleaved rep by rep so that
load from other processes hits all of them alike.

    python benchmarks/ema_floor.py [--reps 60] [--width 100] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastssl.tools.bench import op_ema


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--width", type=int, default=100, help="ResNet-50 width in percent")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = op_ema.BENCHES[0]
    inp = spec.make_inputs(args.width, torch.float32, torch.device("cpu"))
    providers = {"fused": spec.fused, "foreach_lerp": op_ema.foreach_lerp,
                 "flat_lerp": op_ema.flat_lerp, "reference": spec.reference}
    times = {k: [] for k in providers}
    for fn in providers.values():  # warm-up: page faults, thread pool, dispatch caches
        fn(inp)
        fn(inp)
    for _ in range(args.reps):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn(inp)
            times[name].append(time.perf_counter() - t0)
    n = sum(t.numel() for t in inp["target"])
    print(f"EMA of {len(inp['target'])} tensors, {n:,} fp32 params, {args.reps} interleaved reps, "
          f"{torch.get_num_threads()} threads")
    # Paired ratios: providers run back to back within a rep, so the ratio of two times of one
    # rep cancels most of the load the other processes put on the machine at that moment.
    def paired(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"{'provider':<14}{'best ms':>9}{'median ms':>11}{'GB/s(best)':>12}"
          f"{'best/flat':>11}{'med/flat':>10}{'best/fe':>9}{'med/fe':>8}")
    fb, fm = min(times["flat_lerp"]), statistics.median(times["flat_lerp"])
    eb, em = min(times["foreach_lerp"]), statistics.median(times["foreach_lerp"])
    for name, ts in times.items():
        b, m = min(ts), statistics.median(ts)
        print(f"{name:<14}{b * 1e3:9.2f}{m * 1e3:11.2f}{12 * n / b / 1e9:12.1f}"
              f"{b / fb:11.3f}{m / fm:10.3f}{b / eb:9.3f}{m / em:8.3f}")
    print(f"paired median ratios: fused/flat_lerp {paired('fused', 'flat_lerp'):.3f}, "
          f"fused/foreach_lerp {paired('fused', 'foreach_lerp'):.3f}, "
          f"foreach_lerp/flat_lerp {paired('foreach_lerp', 'flat_lerp'):.3f}")


if __name__ == "__main__":
    main()
