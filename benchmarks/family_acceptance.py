"""The acceptance figures of the contrastive family, side by side in one run (fp32, fwd+bwd):

* info_nce at N = 256, K = 65,536, D = 128: fused vs eager reference vs torch.compile;
* clip_loss at B = 16,384, D = 256: the same, plus peak extra memory of each provider, each
  measured in its own fresh process (peak RSS delta: VmHWM reset through
  /proc/self/clear_refs after the inputs exist; MALLOC_MMAP_THRESHOLD_=65536 so freed blocks
  go back to the OS and do not hide a later peak).

    python benchmarks/family_acceptance.py            # both ops, time + memory
    python benchmarks/family_acceptance.py --op clip_loss --no-memory

Times: best of --repeat runs after one warm-up run (torch.compile's compilation happens in
the warm-up, outside the timed runs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastssl.tools.bench import op_clip, op_info_nce  # noqa: E402

CASES = {"info_nce": (op_info_nce.BENCHES[0], 65536), "clip_loss": (op_clip.BENCHES[0], 16384)}
PROVIDERS = ("fused", "reference", "compiled")


def provider_fn(spec, name):
    if name == "fused":
        return spec.fused
    if name == "reference":
        return spec.reference
    return torch.compile(spec.reference)


def time_case(op: str, provider: str, repeat: int) -> float:
    spec, size = CASES[op]
    fn = provider_fn(spec, provider)
    best = float("inf")
    for i in range(repeat + 1):
        x = spec.make_inputs(size, torch.float32, torch.device("cpu"))
        t0 = time.perf_counter()
        fn(x).backward()
        dt = time.perf_counter() - t0
        if i > 0:  # run 0 is the warm-up (and compilation)
            best = min(best, dt)
    return best


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_child(op: str, provider: str) -> None:
    """Runs in a fresh process: one warm-up (compilation, one-time allocations), then the peak
    RSS delta of one fwd+bwd over the RSS with the inputs alive."""
    spec, size = CASES[op]
    fn = provider_fn(spec, provider)
    fn(spec.make_inputs(size, torch.float32, torch.device("cpu"))).backward()
    x = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    fn(x).backward()
    peak = _status("VmHWM")
    print(json.dumps({"peak_extra_bytes": peak - base}))


def memory_case(op: str, provider: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--child", op, provider], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=list(CASES), action="append")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        memory_child(*args.child)
        return 0
    providers = args.providers.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, fwd+bwd, "
          f"best of {args.repeat}")
    for op in args.op or list(CASES):
        spec, size = CASES[op]
        print(f"\n{op}: {spec.describe}, {spec.x_label} = {size}")
        times = {p: time_case(op, p, args.repeat) for p in providers}
        mems = {} if args.no_memory else {p: memory_case(op, p) for p in providers}
        for p in providers:
            ratio = times["reference"] / times[p] if "reference" in times else float("nan")
            mem = f"{mems[p] / 2**20:9.1f} MiB" if p in mems else ""
            print(f"  {p:10s} {times[p] * 1e3:9.1f} ms   x{ratio:5.2f} vs eager   {mem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
