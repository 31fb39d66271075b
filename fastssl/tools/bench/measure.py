"""Measuring one benchmark case: time (median of repeats, warm) and peak extra memory.

Runs inside a fresh worker process per (op, provider, size) (see :mod:`fastssl.tools.bench.worker`),
so one case's allocations and caches never colour another's memory figure.

* Time: ``time.perf_counter`` around the mode (forward / backward / both), after one untimed
  run of that mode (``torch.compile`` compiles there, outside every timed region); CUDA is
  synchronised before reading the clock. Every timed run is kept: min / p20 / median / p80 /
  max, so the reader sees the spread, not only a best or a median.
* GEMM rate (for the floor): probed in the same process beside the case, see :func:`measure`.
* Peak extra memory: CPU -- the process' resident-set high-water mark (VmHWM) minus the
  resident set just before the run, after resetting the mark (``/proc/self/clear_refs`` = 5);
  the worker runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed blocks return to the OS and
  the baseline is honest. CUDA -- ``torch.cuda.max_memory_allocated`` minus the allocation
  before the run.
* The timed runs do not run under that setting: a fixed 64 KiB mmap threshold makes every
  allocation above it page-fault afresh on every call (measured: a 2048 x 2048 fp32 GEMM at
  85-101 GFLOP/s instead of 177), which a user's process does not pay -- glibc's default
  threshold rises to the size of the blocks a program frees (up to 32 MiB). After the memory
  run, :func:`malloc_steady` sets that steady state (threshold 32 MiB, trim 64 MiB) for the
  timed runs; :func:`malloc_for_memory` restores the 64 KiB threshold and trims before the
  next memory run. Elsewhere than glibc both are no-ops.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time

import torch

MODES = ("forward", "backward", "both")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def malloc_for_memory() -> None:
    """Freed blocks above 64 KiB go back to the OS (so an RSS delta is an honest peak)."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 65536)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 131072)
        _LIBC.malloc_trim(0)


def malloc_steady() -> None:
    """glibc's own steady state in a long-running program: blocks up to 32 MiB are reused."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


class PeakMemory:
    """Peak extra memory (MiB) between :meth:`start` and :meth:`stop`, or inside a ``with``
    block (``.mb``; None where the CPU high-water mark cannot be reset, since the delta could
    then be an earlier peak's). ``.kind`` says what was measured (the profile prints it)."""

    def __init__(self, device: torch.device):
        self.device, self.mb, self.kind = device, None, None
        self._base, self._resettable = None, False

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda max_memory_allocated delta"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            self._resettable = True
            self.kind = "peak RSS delta (VmHWM after clear_refs)"
        except OSError:
            self._resettable = False
            self.kind = "peak RSS (VmHWM, not resettable here) delta"
        self._base = _status_kb("VmRSS")

    def stop(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        peak = _status_kb("VmHWM")
        if peak is None or self._base is None:
            return None
        return max(0, peak - self._base) / 1024

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        mb = self.stop()
        self.mb = mb if self.device.type == "cuda" or self._resettable else None
        return False


def run_mode(fn, inputs: dict, mode: str, device: torch.device) -> float:
    """Runs one mode once and returns its seconds (backward: the forward is not timed)."""
    if mode == "forward":
        _sync(device)
        t0 = time.perf_counter()
        out = fn(inputs)
        _sync(device)
        dt = time.perf_counter() - t0
        del out
        return dt
    if mode == "backward":
        out = fn(inputs)
        loss = out if out.dim() == 0 else out.sum()
        _sync(device)
        t0 = time.perf_counter()
        loss.backward()
        _sync(device)
        dt = time.perf_counter() - t0
    else:  # both
        _sync(device)
        t0 = time.perf_counter()
        out = fn(inputs)
        loss = out if out.dim() == 0 else out.sum()
        loss.backward()
        _sync(device)
        dt = time.perf_counter() - t0
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.grad is not None:
            v.grad = None
    return dt


def measure(fn, make_inputs, mode: str, device: torch.device, repeat: int,
            max_seconds: float = 60.0, gemm_probe: bool = False) -> dict:
    """Peak memory of the first run of ``mode`` (the warm-up: cold for eager providers,
    post-compile for torch.compile providers whose compile ran earlier), then ``repeat`` timed
    runs (fewer if the total would pass ``max_seconds``): min / p20 / median / p80 / max.

    With ``gemm_probe``, a short GEMM probe (:func:`matmul_gflops`) runs right after the
    warm-up and right after every timed run, and the best rate seen is returned as
    ``gemm_gflops``: the yardstick of the case's floor, taken beside the case rather than
    once per benchmark, so a change of the machine's load between cases cannot make a floor
    ratio fall below 1 (the best probe is the least loaded one; a case slowed by load only
    raises its ratio)."""
    inputs = make_inputs()
    if device.type == "cpu":
        malloc_for_memory()
    with PeakMemory(device) as pm:
        first = run_mode(fn, inputs, mode, device)
    if device.type == "cpu":
        malloc_steady()
    rates = [matmul_gflops(device, reps=3)] if gemm_probe else []
    times = []
    budget = max_seconds - first
    for _ in range(max(1, repeat)):
        times.append(run_mode(fn, inputs, mode, device))
        budget -= times[-1]
        if gemm_probe:
            rates.append(matmul_gflops(device, reps=3))
        if budget <= 0:
            break
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    out = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * times[0],
           "p20_ms": 1e3 * q(0.2), "p80_ms": 1e3 * q(0.8), "max_ms": 1e3 * times[-1],
           "runs": len(times), "peak_mb": pm.mb}
    if rates:
        out["gemm_gflops"] = max(rates)
        out["gemm_gflops_min"] = min(rates)
    return out


def matmul_gflops(device: torch.device, n: int = 2048, k: int = 128, reps: int = 10) -> float:
    """FP32 GEMM throughput of this machine at NT-Xent's tile shape (n x k times k x n), best
    of ``reps``: the yardstick of the "fraction of the floor" figures. Into a preallocated
    output, so that it times the GEMM and not the allocator (see the module docstring)."""
    a = torch.randn(n, k, device=device)
    b = torch.randn(n, k, device=device)
    c = torch.empty(n, n, device=device)
    for _ in range(2):
        torch.mm(a, b.T, out=c)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b.T, out=c)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n * n * k / best / 1e9
