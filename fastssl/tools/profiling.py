"""``fastssl profile``: where the time and memory of an SSL training step go.

Builds the model of ``fastssl train`` (a small ResNet-style encoder + projector, plus the
predictor / momentum encoder / queue the method needs: :class:`fastssl.tools.training.SSLModel`),
runs ``--steps`` real training steps on synthetic uint8 images after ``--warmup`` untimed
steps, and reports per phase -- augmentation, encoder forward, loss forward, backward,
optimizer, EMA + queue -- the **median** milliseconds over the timed steps, their spread
(fastest and slowest step) and the median's share of the median step.

How it is measured:

* The phases are delimited by ``time.perf_counter`` boundaries that tile the step (each phase
  starts where the previous one ended; on CUDA every boundary synchronises the device), and
  every step's wall time is taken around the whole step, so the phases of one step sum to
  its wall time. The table's phase medians come from different steps, so their sum can differ
  from the median step by a few percent.
* ``--backend both`` builds both backends' models in this process and interleaves them
  phase by phase in this thread: the fused augmentation, then the reference augmentation, then
  both encoder forwards, and so on (which side goes first alternates from step to step;
  :meth:`SSLModel.step_phases` yields before each phase). A change of the machine's load then
  lands on both sides of a phase within milliseconds, and both sides share one allocator and
  one OpenMP thread team, so neither starts its phases from a sleeping process (two processes
  in lock-step, the previous design, made each side wake from a blocking wait before every
  phase: the same encoder forward then measured 0.51x and 1.15x between the sides on an idle
  machine). A step's wall time is the sum of its phases. The phases that run the same code on
  both sides (encoder forward, optimizer, and the backward through the encoder that dominates
  "backward") measure the noise of the comparison: the table prints the fused/reference ratio
  of every phase and flags same-code phases whose ratio is off by more than 10%.
* Python's cyclic garbage collector is off inside the steps and runs between them: a
  collection that starts inside a phase is charged to it (tens of milliseconds here); with it
  on, the same encoder forward measured 0.79x-1.09x between the two sides of ``--backend
  both`` on an idle machine, with it off 0.91x-1.03x.
* Peak memory, CPU: the peak resident set size (``VmHWM``, reset by writing ``5`` to
  ``/proc/self/clear_refs`` once model and data exist) minus the resident size at that moment,
  i.e. what the steps add: activations, gradients, optimiser state, workspaces, augmented views.
  CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated at the same moment. With
  ``--backend both`` each backend's figure is one step of it run alone after a first step of
  both (so the optimiser state and the libraries' one-time buffers are not in it: activations,
  gradients, workspaces, augmented views), with freed memory returned to the OS before it so
  that one side cannot reuse the other's pages. Two extra untimed steps per side.
* ``--trace out.json`` records 2 further steps with ``torch.profiler`` (phases appear as
  ``fastssl::<phase>`` ranges) and writes a Chrome trace (open in chrome://tracing or
  https://ui.perfetto.dev); those steps are not part of the timing. With ``--backend both``
  each backend writes its own file (``out.fused.json``, ``out.reference.json``).

Example:
    $ fastssl profile --method moco --batch 256 --steps 10 --backend both
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import time

import torch

from ._progress import Progress
from .bench.measure import PeakMemory, malloc_for_memory, malloc_steady
from .training import METHODS, PHASES, PhaseTimer, SSLModel

PHASE_LABELS = {"augmentation": "augmentation", "encoder_forward": "encoder forward",
                "loss_forward": "loss forward", "backward": "backward",
                "optimizer": "optimizer", "ema_queue": "EMA + queue"}
# Phases whose code does not depend on the backend: their fused/reference ratio is the noise
# floor of the comparison. "backward" is mostly the encoder's backward too, but it also holds
# the loss's backward (fused vs reference), so it is shown but not used as a noise check.
SAME_CODE_PHASES = ("encoder_forward", "optimizer")
NOISE_LIMIT = 0.10


def add_arguments(p) -> None:
    p.add_argument("--method", choices=METHODS, default="simclr",
                   help="the SSL method whose training step is profiled")
    p.add_argument("--batch", type=int, default=256, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps (per backend)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (per backend)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where it runs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a busy machine 1 "
                        "can be several times faster than oversubscribed threads)")
    p.add_argument("--backend", choices=("fused", "reference", "both"), default="fused",
                   help="fastssl's fused ops, their plain-PyTorch references, or both "
                        "interleaved phase by phase in one process")
    p.add_argument("--image-size", type=int, default=32,
                   help="side of the synthetic uint8 images (and of the views)")
    p.add_argument("--width", type=int, default=32, help="encoder width w (features: 4w)")
    p.add_argument("--queue", type=int, default=4096, help="MoCo queue size (keys)")
    p.add_argument("--trace", default=None, metavar="OUT.json",
                   help="write a Chrome trace of 2 extra steps (default: none)")
    p.add_argument("--json", action="store_true", help="last stdout line: a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------
# one backend, in this process
# ---------------------------------------------------------------------------------------

class StepRunner:
    """One backend's model, data and memory probe; :meth:`step` runs one training step and
    returns ``{"wall": s, "phases": {phase: s}}`` (timed) or None (``timed=False``)."""

    def __init__(self, method: str = "simclr", batch: int = 256, *, total_steps: int = 12,
                 device="cpu", backend: str = "fused", image_size: int = 32, width: int = 32,
                 queue: int = 4096):
        if batch < 2:
            raise ValueError(f"need batch >= 2, got {batch}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch.cuda.is_available() is False here")
        g = torch.Generator().manual_seed(0)
        self.pool = [torch.randint(0, 256, (batch, 3, image_size, image_size),
                                   dtype=torch.uint8, generator=g).to(self.device)
                     for _ in range(min(4, total_steps))]
        self.model = SSLModel(method, backend=backend, width=width, image_size=image_size,
                              queue_size=queue, total_steps=total_steps, device=self.device)
        self.backend = backend
        self.n = 0
        self.memory = PeakMemory(self.device)
        self.memory.start()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def next_images(self) -> torch.Tensor:
        images = self.pool[self.n % len(self.pool)]
        self.n += 1
        return images

    def step(self, timed: bool = True) -> dict | None:
        images = self.next_images()
        if not timed:
            self.model.step(images)
            return None
        timer = PhaseTimer(self.device)
        self._sync()
        t0 = time.perf_counter()
        self.model.step(images, timer)
        self._sync()
        return {"wall": time.perf_counter() - t0, "phases": dict(timer.totals)}

    def trace(self, path: str) -> None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile
        acts = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(ProfilerActivity.CUDA)
        with tprofile(activities=acts) as prof:
            for _ in range(2):
                self.model.step(self.pool[self.n % len(self.pool)],
                                PhaseTimer(self.device, annotate=True))
                self.n += 1
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        prof.export_chrome_trace(path)


def summarize(records: list[dict], *, batch: int) -> dict:
    """Medians and spreads (min, max) of per-step records from :meth:`StepRunner.step`."""
    walls = [r["wall"] for r in records]
    step_ms = 1e3 * statistics.median(walls)
    phases = {p: [1e3 * r["phases"][p] for r in records] for p in PHASES}
    return {"step_ms": round(step_ms, 3),
            "step_spread_ms": [round(1e3 * min(walls), 3), round(1e3 * max(walls), 3)],
            "phases_ms": {p: round(statistics.median(v), 3) for p, v in phases.items()},
            "phases_spread_ms": {p: [round(min(v), 3), round(max(v), 3)]
                                 for p, v in phases.items()},
            "images_per_s": round(batch * 1e3 / step_ms, 1),
            # how well the phases tile each step (the rest: loop overhead), median over steps
            "phases_share": round(statistics.median(
                sum(r["phases"].values()) / r["wall"] for r in records), 4)}


def profile(method: str = "simclr", batch: int = 256, steps: int = 10, *, warmup: int = 2,
            device="cpu", backend: str = "fused", image_size: int = 32, width: int = 32,
            queue: int = 4096, trace: str | None = None, progress: bool = True) -> dict:
    """Times ``steps`` training steps of ``method`` with one backend, in this process;
    returns the JSON summary as a dict."""
    _check_counts(steps, warmup)
    runner = StepRunner(method, batch, total_steps=warmup + steps, device=device,
                        backend=backend, image_size=image_size, width=width, queue=queue)
    bar = Progress(warmup + steps, f"profile {method}/{backend} b={batch}", enabled=progress)
    records = []
    with _collect_between_steps():
        for i in range(warmup + steps):
            if i < warmup:
                runner.step(timed=False)
            else:
                records.append(runner.step())
            gc.collect()
            bar.update()
    bar.close()
    peak = runner.memory.stop()
    if trace:
        runner.trace(trace)
    return _result(records, runner, method=method, batch=batch, backend=backend, steps=steps,
                   warmup=warmup, image_size=image_size, peak=peak)


def _check_counts(steps: int, warmup: int) -> None:
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0; got {steps}, {warmup}")


def _result(records, runner, *, method, batch, backend, steps, warmup, image_size, peak):
    return {"method": method, "batch": batch, **summarize(records, batch=batch),
            "peak_mb": None if peak is None else round(peak, 1),
            "backend": backend, "device": runner.device.type, "steps": steps,
            "warmup": warmup, "image_size": image_size, "threads": torch.get_num_threads(),
            "memory": runner.memory.kind}


# ---------------------------------------------------------------------------------------
# --backend both: the two backends interleaved phase by phase in this thread
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _collect_between_steps():
    """Python's cyclic garbage collector off inside the steps (a collection that starts in
    one side's phase would be charged to it); the loops collect between steps instead."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _interleaved_step(pair) -> dict:
    """One timed step of each runner, phase by phase: ``pair[0]`` runs a phase, then
    ``pair[1]`` runs the same phase, then the next phase; returns ``{backend: record}``."""
    steps = [rn.model.step_phases(rn.next_images()) for rn in pair]
    names = [next(s) for s in steps]  # each stops before its first phase
    totals = [dict.fromkeys(PHASES, 0.0) for _ in pair]
    while any(n is not None for n in names):
        for i, rn in enumerate(pair):
            if names[i] is None:
                continue
            rn._sync()
            t0 = time.perf_counter()
            try:
                nxt = next(steps[i])
            except StopIteration:
                nxt = None
            rn._sync()
            totals[i][names[i]] += time.perf_counter() - t0
            names[i] = nxt
    return {rn.backend: {"wall": sum(t.values()), "phases": t} for rn, t in zip(pair, totals)}


def profile_both(args) -> list[dict]:
    """Fused and reference interleaved phase by phase in this process (module docstring):
    the fused encoder forward, then the reference encoder forward, then both backwards, and
    so on; which side goes first alternates from step to step."""
    _check_counts(args.steps, args.warmup)
    runners = [StepRunner(args.method, args.batch, total_steps=args.warmup + args.steps + 2,
                          device=args.device, backend=backend, image_size=args.image_size,
                          width=args.width, queue=args.queue) for backend in ("fused", "reference")]
    bar = Progress(args.warmup + args.steps + 2,
                   f"profile {args.method} fused+reference b={args.batch}",
                   enabled=not args.quiet)
    # Peak memory: a second step of each side alone (the first one, of both, allocated the
    # optimiser state and the libraries' one-time buffers), from a heap that returned its
    # free pages to the OS first.
    for rn in runners:
        rn.step(timed=False)
    bar.update()
    peaks = {}
    for rn in runners:
        malloc_for_memory()
        rn.memory.start()
        rn.step(timed=False)
        peaks[rn.backend] = rn.memory.stop()
    malloc_steady()
    bar.update()
    records = {rn.backend: [] for rn in runners}
    with _collect_between_steps():
        for r in range(args.warmup + args.steps):
            pair = runners if r % 2 == 0 else runners[::-1]
            if r < args.warmup:
                for rn in pair:
                    rn.step(timed=False)
            else:
                for backend, rec in _interleaved_step(pair).items():
                    records[backend].append(rec)
            gc.collect()
            bar.update()
    bar.close()
    results = []
    for rn in runners:
        if args.trace:
            root, ext = os.path.splitext(args.trace)
            rn.trace(f"{root}.{rn.backend}{ext or '.json'}")
        peak = peaks[rn.backend]
        results.append({"method": args.method, "batch": args.batch,
                        **summarize(records[rn.backend], batch=args.batch),
                        "peak_mb": None if peak is None else round(peak, 1),
                        "backend": rn.backend, "device": rn.device.type, "steps": args.steps,
                        "warmup": args.warmup, "image_size": args.image_size,
                        "threads": torch.get_num_threads(),
                        "memory": f"{rn.memory.kind}, one step of each side alone after a "
                                  f"first step of both (optimiser state not included)",
                        "interleaved": "phase by phase, one process"})
    return results


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------

def noise_check(results: list[dict]) -> dict:
    """fused/reference ratio of the median of each phase that runs the same code on both
    sides (:data:`SAME_CODE_PHASES`): ``{phase: ratio}``."""
    fused, ref = results
    out = {}
    for p in SAME_CODE_PHASES:
        a, b = fused["phases_ms"][p], ref["phases_ms"][p]
        if b > 0:
            out[p] = round(a / b, 3)
    return out


def _load_text(load) -> str:
    if not load:
        return ""
    return (f"; load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end, "
            f"on {os.cpu_count()} CPUs")


def format_table(results: list[dict], load=None) -> str:
    r0 = results[0]
    how = ("fused and reference interleaved phase by phase in one process"
           if len(results) == 2 else f"{r0['backend']} backend")
    head = (f"fastssl profile: {r0['method']}, batch {r0['batch']}, {r0['image_size']}x"
            f"{r0['image_size']} uint8 images, {r0['steps']} timed steps after {r0['warmup']} "
            f"warm-up ({how}), {r0['device']}, {r0['threads']} threads{_load_text(load)}")
    lines = [head, "time per step: median [fastest - slowest] of the timed steps, in ms; "
                   "share = median / median step"]
    cell_w = 28
    cols = "".join(f"{r['backend'] + ' ms [min - max]':>{cell_w}}{'share':>7}" for r in results)
    ratio = len(results) == 2
    lines.append(f"{'phase':<16}{cols}" + (f"{'fused/ref':>11}" if ratio else ""))

    def cell(med, spread):
        return f"{med:>9.2f} [{spread[0]:.2f} - {spread[1]:.2f}]".rjust(cell_w)

    noise = noise_check(results) if ratio else {}
    for ph in PHASES:
        row = "".join(cell(r["phases_ms"][ph], r["phases_spread_ms"][ph])
                      + f"{100 * r['phases_ms'][ph] / r['step_ms']:>6.1f}%" for r in results)
        if ratio:
            b = results[1]["phases_ms"][ph]
            mark = " !" if ph in noise and abs(noise[ph] - 1) > NOISE_LIMIT else ""
            row += (f"{results[0]['phases_ms'][ph] / b:>9.2f}x" if b > 0 else f"{'-':>10}") + mark
        lines.append(f"{PHASE_LABELS[ph]:<16}{row}")
    lines.append(f"{'sum of medians':<16}" + "".join(
        f"{sum(r['phases_ms'].values()):>{cell_w}.2f}"
        f"{100 * sum(r['phases_ms'].values()) / r['step_ms']:>6.1f}%" for r in results))
    row = "".join(cell(r["step_ms"], r["step_spread_ms"]) + f"{'':>7}" for r in results)
    if ratio:
        row += f"{results[0]['step_ms'] / results[1]['step_ms']:>9.2f}x"
    lines.append(f"{'step (wall)':<16}{row}")
    lines.append(f"{'images/s':<16}" + "".join(f"{r['images_per_s']:>{cell_w}.1f}{'':>7}"
                                            for r in results))
    lines.append(f"{'peak memory MB':<16}" + "".join(
        f"{'n/a' if r['peak_mb'] is None else format(r['peak_mb'], '.1f'):>{cell_w}}{'':>7}"
        for r in results))
    if ratio:
        lines.append(f"speed-up of fused over reference (median step): "
                     f"{results[1]['step_ms'] / results[0]['step_ms']:.2f}x")
        same = ", ".join(f"{PHASE_LABELS[p]} {v:.2f}x" for p, v in noise.items())
        bad = [p for p, v in noise.items() if abs(v - 1) > NOISE_LIMIT]
        if bad:
            lines.append(f"! noise: phases that run the same code on both sides differ by more "
                         f"than {100 * NOISE_LIMIT:.0f}% ({same}): the machine's load changed "
                         f"faster than the phases alternate; re-run, or raise --steps")
        else:
            lines.append(f"noise check: phases that run the same code on both sides agree "
                         f"within {100 * NOISE_LIMIT:.0f}% ({same})")
    lines.append(f"peak memory: {r0['memory']}")
    return "\n".join(lines)


JSON_KEYS = ("method", "batch", "step_ms", "phases_ms", "images_per_s", "peak_mb")
SPREAD_KEYS = ("step_spread_ms", "phases_spread_ms", "phases_share")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args.backend == "both":
        results = profile_both(args)
    else:
        results = [profile(args.method, args.batch, args.steps, warmup=args.warmup,
                           device=args.device, backend=args.backend,
                           image_size=args.image_size, width=args.width, queue=args.queue,
                           trace=args.trace, progress=not args.quiet)]
    load = (load0, os.getloadavg()[0]) if load0 is not None else None
    print(format_table(results, load))
    if args.trace:
        names = ([args.trace] if args.backend != "both" else
                 [f"{os.path.splitext(args.trace)[0]}.{b}{os.path.splitext(args.trace)[1] or '.json'}"
                  for b in ("fused", "reference")])
        print("Chrome trace: " + ", ".join(names))
    if args.json:
        # The summary keys first, then the spreads and the context (backend, device, sizes).
        line = dict(results[0])
        if load:
            line["loadavg_1min"] = [round(v, 2) for v in load]
        if len(results) == 2:
            line["reference"] = {k: results[1][k] for k in JSON_KEYS[2:] + SPREAD_KEYS}
            line["same_code_ratio"] = noise_check(results)
        print(json.dumps(line))
    sys.stdout.flush()
    return 0
