"""Acceptance measurement of the SSL augmentation on this machine's CPU: SimCLR recipe, two
views at 224^2 from 256^2 uint8, batch 64, fp32 ImageNet-normalised.

    python benchmarks/augment_throughput.py [--batch 64] [--reps 7] [--tv-reps 3] [--threads 2]
        [--providers fused,reference,torchvision_v2,torchvision_v2_batched]

Providers (images/s counts both views of each image; parameters drawn inside the timed call):
  fused                   fastssl.SSLAugment, C++ kernel (per-sample parameters)
  reference               the same, backend="reference" (the pure-PyTorch spec)
  torchvision_v2          one torchvision v2 Compose call per image and view (what a
                          DataLoader with per-sample transforms does)
  torchvision_v2_batched  one v2 Compose call per view on the whole batch: ONE parameter set
                          for all images (not per-sample augmentation; a speed bound only)
The first call of each provider is untimed. Prints the median images/s over the repetitions,
min..max, and the process CPU time per image (robust to other load on a shared machine).

Side by side with a torchvision that lives in another Python environment (torchvision is not
a dependency of fastssl, and its torch differs from the one the extension was built for):

    python benchmarks/augment_throughput.py --interleave /path/to/venv-tv/bin/python --rounds 5

runs the providers in alternating child processes, fastssl under this interpreter and
torchvision under the other, `--rounds` times each, and prints per provider the median of the
round medians with their min..max, and the ratio fused / torchvision_v2 of each adjacent pair
of rounds (median and min..max), so a shift in machine load lands on both sides.
`--tv-isa avx2` runs torchvision's torch with ATEN_CPU_CAPABILITY=avx2 (its AVX2 kernels), to
compare against fastssl's AVX2 clone on an AVX-512 machine (see `fastssl info`).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

IN_SIZE, OUT_SIZE = 256, 224
FASTSSL_PROVIDERS = ("fused", "reference")
TV_PROVIDERS = ("torchvision_v2", "torchvision_v2_batched")


def make_provider(name: str):
    if name in FASTSSL_PROVIDERS:
        from fastssl import SSLAugment

        backend = "cpp" if name == "fused" else "reference"
        return SSLAugment(OUT_SIZE, "simclr", backend=backend,
                          generator=torch.Generator().manual_seed(1))
    from fastssl.tools.bench.op_augment import torchvision_v2_compose

    t = torchvision_v2_compose()
    if name == "torchvision_v2":
        return lambda images: tuple(torch.stack([t(im) for im in images]) for _ in range(2))
    if name == "torchvision_v2_batched":
        return lambda images: tuple(t(images) for _ in range(2))
    raise ValueError(f"unknown provider {name!r}")


def measure(fn, images, reps: int) -> dict:
    fn(images)  # untimed warm-up
    walls, cpus = [], []
    for _ in range(reps):
        c, w = time.process_time(), time.perf_counter()
        fn(images)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    b = images.shape[0]
    return {"img_s": b / statistics.median(walls), "img_s_min": b / max(walls),
            "img_s_max": b / min(walls), "cpu_ms_per_img": statistics.median(cpus) / b * 1e3}


def run_here(providers, batch: int, reps: int, ref_reps: int, tv_reps: int) -> dict:
    images = torch.randint(0, 256, (batch, 3, IN_SIZE, IN_SIZE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    out = {}
    for name in providers:
        n = ref_reps if name == "reference" else tv_reps if name in TV_PROVIDERS else reps
        out[name] = measure(make_provider(name), images, n)
    return out


def _clone() -> str:
    try:
        from fastssl.tools import info
        return info.collect()["cpu_simd_clone"] or "no C++ extension"
    except Exception as exc:  # the report line only; the measurement itself raises
        return f"unknown ({exc})"


def interleave(a) -> None:
    me = os.path.abspath(__file__)
    fast = [p for p in a.providers if p in FASTSSL_PROVIDERS]
    tv = [p for p in a.providers if p in TV_PROVIDERS]
    common = ["--batch", str(a.batch), "--reps", str(a.reps), "--ref-reps", str(a.ref_reps),
              "--tv-reps", str(a.tv_reps),
              "--threads", str(a.threads), "--json"]
    env_tv = dict(os.environ)
    if a.tv_isa:
        env_tv["ATEN_CPU_CAPABILITY"] = a.tv_isa
    rounds = {p: [] for p in fast + tv}
    ratios = []
    print(f"SimCLR two views, batch {a.batch}, {IN_SIZE}^2 uint8 -> {OUT_SIZE}^2 fp32, "
          f"{a.threads} threads; {a.rounds} rounds alternating processes "
          f"(fastssl: {sys.executable}, clone {_clone()}; torchvision: {a.interleave}"
          f"{', ATEN_CPU_CAPABILITY=' + a.tv_isa if a.tv_isa else ''}); "
          f"load before: {os.getloadavg()[0]:.1f}", flush=True)
    for r in range(a.rounds):
        sides = [(sys.executable, fast, os.environ), (a.interleave, tv, env_tv)]
        if r % 2:
            sides.reverse()  # neither side always runs first
        got = {}
        for py, provs, env in sides:
            if not provs:
                continue
            res = subprocess.run([py, me, "--providers", ",".join(provs)] + common, env=env,
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{py} {' '.join(provs)} failed:\n{res.stderr[-3000:]}")
            got.update(json.loads(res.stdout.strip().splitlines()[-1]))
        for p, v in got.items():
            rounds[p].append(v)
        if "fused" in got and "torchvision_v2" in got:
            ratios.append(got["fused"]["img_s"] / got["torchvision_v2"]["img_s"])
        print(f"round {r + 1}: " + "  ".join(f"{p} {v['img_s']:.1f}" for p, v in got.items())
              + f"  (load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"{'provider':<24} {'median img/s':>12} {'min..max of rounds':>20} {'CPU ms/img':>11}")
    for p, vs in rounds.items():
        if not vs:
            continue
        med = [v["img_s"] for v in vs]
        cpu = statistics.median(v["cpu_ms_per_img"] for v in vs)
        print(f"{p:<24} {statistics.median(med):12.1f} {min(med):9.1f}..{max(med):<9.1f} "
              f"{cpu:11.2f}")
    if ratios:
        print(f"fused / torchvision_v2 (per image), per round pair: median "
              f"{statistics.median(ratios):.1f}x, min..max {min(ratios):.1f}..{max(ratios):.1f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--ref-reps", type=int, default=3)
    p.add_argument("--tv-reps", type=int, default=3, help="repetitions of torchvision providers")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--providers", default=None,
                   help="comma-separated (default: fused,reference here; with --interleave "
                        "fused,torchvision_v2,torchvision_v2_batched)")
    p.add_argument("--interleave", metavar="PYTHON", default=None,
                   help="interpreter with torchvision: alternate child processes")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tv-isa", default=None, choices=["avx2", "avx512", "default"],
                   help="ATEN_CPU_CAPABILITY for the torchvision process (default: unset)")
    p.add_argument("--json", action="store_true", help="one JSON line (used by --interleave)")
    a = p.parse_args()
    default = ("fused,torchvision_v2,torchvision_v2_batched" if a.interleave
               else "fused,reference")
    a.providers = (a.providers or default).split(",")
    for name in a.providers:
        if name not in FASTSSL_PROVIDERS + TV_PROVIDERS:
            p.error(f"unknown provider {name!r}")
    torch.set_num_threads(a.threads)
    if a.interleave:
        interleave(a)
        return
    res = run_here(a.providers, a.batch, a.reps, a.ref_reps, a.tv_reps)
    if a.json:
        print(json.dumps(res))
        return
    print(f"SimCLR two views, batch {a.batch}, {IN_SIZE}^2 uint8 -> {OUT_SIZE}^2 fp32, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}, clone {_clone()}")
    print(f"{'provider':<24} {'median img/s':>12} {'min..max img/s':>16} {'CPU ms/img':>11}")
    for name, v in res.items():
        print(f"{name:<24} {v['img_s']:12.1f} {v['img_s_min']:8.1f}..{v['img_s_max']:<7.1f} "
              f"{v['cpu_ms_per_img']:11.2f}")


if __name__ == "__main__":
    main()
