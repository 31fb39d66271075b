"""Acceptance measurement of the SSL augmentation on this machine's CPU, side by side in one
run: SimCLR recipe, two views at 224^2 from 256^2 uint8, batch 64, fp32 ImageNet-normalised.

    python benchmarks/augment_throughput.py [--batch 64] [--reps 7] [--ref-reps 3]

Prints, per provider, the median images/s (both views of each image; parameters drawn on the
host inside the timed call) over the repetitions, the spread, and the process CPU time per image
(robust to other load on a shared machine). The first call of each provider is untimed.
"""
import argparse
import statistics
import time

import torch

from fastssl import SSLAugment


def measure(aug, images, reps):
    aug(images)  # untimed warm-up
    walls, cpus = [], []
    for _ in range(reps):
        c, w = time.process_time(), time.perf_counter()
        aug(images)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    b = images.shape[0]
    return (b / statistics.median(walls), b / max(walls), b / min(walls),
            statistics.median(cpus) / b * 1e3)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--ref-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    images = torch.randint(0, 256, (a.batch, 3, 256, 256), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    print(f"SimCLR two views, batch {a.batch}, 256^2 uint8 -> 224^2 fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"{'provider':<10} {'median img/s':>12} {'min..max img/s':>16} {'CPU ms/img':>11}")
    for name, backend, reps in (("fused", "cpp", a.reps), ("reference", "reference", a.ref_reps)):
        if reps < 1:
            continue
        aug = SSLAugment(224, "simclr", backend=backend, generator=torch.Generator().manual_seed(1))
        med, lo, hi, cpu = measure(aug, images, reps)
        print(f"{name:<10} {med:12.1f} {lo:8.1f}..{hi:<7.1f} {cpu:11.2f}", flush=True)


if __name__ == "__main__":
    main()
