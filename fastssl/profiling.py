"""``fastssl profile``: where the time and memory of an SSL training step go.

Builds the model of ``fastssl train`` (a small ResNet-style encoder + projector, plus the
predictor / momentum encoder / queue the method needs: :class:`fastssl.training.SSLModel`),
runs ``--steps`` real training steps on synthetic uint8 images after ``--warmup`` untimed
steps, and reports per phase -- augmentation, encoder forward, loss forward, backward,
optimizer, EMA + queue -- the mean milliseconds per step and their share of the step.

How it is measured:

* The phases are delimited by ``time.perf_counter`` boundaries that tile the step (each phase
  starts where the previous one ended; on CUDA every boundary synchronises the device).
  ``step_ms`` is the wall time of the whole timed loop divided by the steps, measured
  separately, so the phases' sum falls short of it by the loop's own overhead (batch
  selection, progress bar): typically 97-100%.
* Peak memory, CPU: the peak resident set size (``VmHWM``, reset by writing ``5`` to
  ``/proc/self/clear_refs`` once model and data exist) minus the resident size at that moment,
  i.e. what the steps add: activations, gradients, optimiser state, workspaces, augmented views.
  CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated at the same moment.
* ``--backend both`` runs fused and reference each in its own process (so neither inherits
  the other's allocator state) and prints them side by side.
* ``--trace out.json`` records 2 further steps with ``torch.profiler`` (phases appear as
  ``fastssl::<phase>`` ranges) and writes a Chrome trace (open in chrome://tracing or
  https://ui.perfetto.dev); those steps are not part of the timing.

Example:
    $ fastssl profile --method moco --batch 256 --steps 10 --backend both
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from ._progress import Progress
from .training import METHODS, PHASES, SSLModel

PHASE_LABELS = {"augmentation": "augmentation", "encoder_forward": "encoder forward",
                "loss_forward": "loss forward", "backward": "backward",
                "optimizer": "optimizer", "ema_queue": "EMA + queue"}


def add_arguments(p) -> None:
    p.add_argument("--method", choices=METHODS, default="simclr")
    p.add_argument("--batch", type=int, default=256, help="images per step (default 256)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a busy machine 1 "
                        "can be several times faster than oversubscribed threads)")
    p.add_argument("--backend", choices=("fused", "reference", "both"), default="fused")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=32, help="encoder width (features: 4w)")
    p.add_argument("--queue", type=int, default=4096, help="MoCo queue size")
    p.add_argument("--trace", default=None, metavar="OUT.json", help="write a Chrome trace")
    p.add_argument("--json", action="store_true", help="last stdout line: a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------
# memory probes
# ---------------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _PeakMemory:
    """Peak memory the code between ``start()`` and ``stop()`` adds, in MiB (see module doc).
    ``kind`` says what was measured."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.kind = "cuda max_memory_allocated delta"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            self.kind = "peak RSS delta (VmHWM after clear_refs)"
        except OSError:
            self.kind = "peak RSS (VmHWM, not resettable here) delta"
        self.base = _status_kb("VmRSS")

    def stop(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        peak = _status_kb("VmHWM")
        if peak is None or self.base is None:
            return None
        return (peak - self.base) / 1024


# ---------------------------------------------------------------------------------------
# one backend, in this process
# ---------------------------------------------------------------------------------------

def profile(method: str = "simclr", batch: int = 256, steps: int = 10, *, warmup: int = 2,
            device="cpu", backend: str = "fused", image_size: int = 32, width: int = 32,
            queue: int = 4096, trace: str | None = None, progress: bool = True) -> dict:
    """Times ``steps`` training steps of ``method``; returns the JSON summary as a dict."""
    if steps < 1 or batch < 2 or warmup < 0:
        raise ValueError(f"need steps >= 1, batch >= 2, warmup >= 0; got {steps}, {batch}, "
                         f"{warmup}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False here")
    g = torch.Generator().manual_seed(0)
    pool = [torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8,
                          generator=g).to(device) for _ in range(min(4, steps + warmup))]
    model = SSLModel(method, backend=backend, width=width, image_size=image_size,
                     queue_size=queue, total_steps=warmup + steps, device=device)
    mem = _PeakMemory(device)
    mem.start()
    bar = Progress(warmup + steps, f"profile {method}/{backend} b={batch}", enabled=progress)
    for i in range(warmup):
        model.step(pool[i % len(pool)])
        bar.update()
    timer = _Timer(device)
    timer.sync()
    t0 = time.perf_counter()
    for i in range(steps):
        model.step(pool[(warmup + i) % len(pool)], timer.phases)
        bar.update()
    timer.sync()
    wall = time.perf_counter() - t0
    bar.close()
    peak = mem.stop()
    if trace:
        _trace(model, pool, device, trace)
    step_ms = 1e3 * wall / steps
    phases = {k: round(1e3 * v / steps, 3) for k, v in timer.phases.totals.items()}
    return {"method": method, "batch": batch, "step_ms": round(step_ms, 3),
            "phases_ms": phases, "images_per_s": round(batch * steps / wall, 1),
            "peak_mb": None if peak is None else round(peak, 1),
            "backend": backend, "device": device.type, "steps": steps, "warmup": warmup,
            "image_size": image_size, "threads": torch.get_num_threads(),
            "memory": mem.kind}


class _Timer:
    def __init__(self, device):
        from .training import PhaseTimer
        self.device = device
        self.phases = PhaseTimer(device)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _trace(model, pool, device, path) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from .training import PhaseTimer
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for i in range(2):
            model.step(pool[i % len(pool)], PhaseTimer(device, annotate=True))
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    prof.export_chrome_trace(path)


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------

def _child(args, backend: str) -> dict:
    """Runs one backend in a fresh process (clean peak memory) and parses its JSON line."""
    cmd = [sys.executable, "-m", "fastssl", "profile", "--method", args.method,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--backend", backend, "--image-size", str(args.image_size),
           "--width", str(args.width), "--queue", str(args.queue), "--json"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.quiet:
        cmd.append("--quiet")
    if args.trace:
        root, ext = os.path.splitext(args.trace)
        cmd += ["--trace", f"{root}.{backend}{ext or '.json'}"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True,
                         cwd=os.getcwd(), env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_table(results: list[dict]) -> str:
    r0 = results[0]
    head = (f"fastssl profile: {r0['method']}, batch {r0['batch']}, {r0['image_size']}x"
            f"{r0['image_size']} uint8 images, {r0['steps']} timed steps after {r0['warmup']} "
            f"warm-up, {r0['device']}, {r0['threads']} threads")
    cols = "".join(f"{r['backend'] + ' ms':>14}{'share':>7}" for r in results)
    lines = [head, f"{'phase':<18}{cols}"]
    for ph in PHASES:
        row = "".join(f"{r['phases_ms'][ph]:>14.2f}{100 * r['phases_ms'][ph] / r['step_ms']:>6.1f}%"
                      for r in results)
        lines.append(f"{PHASE_LABELS[ph]:<18}{row}")
    row = "".join(f"{sum(r['phases_ms'].values()):>14.2f}"
                  f"{100 * sum(r['phases_ms'].values()) / r['step_ms']:>6.1f}%" for r in results)
    lines.append(f"{'sum of phases':<18}{row}")
    lines.append(f"{'step (wall)':<18}" + "".join(f"{r['step_ms']:>14.2f}{'':>7}" for r in results))
    lines.append(f"{'images/s':<18}" + "".join(f"{r['images_per_s']:>14.1f}{'':>7}"
                                              for r in results))
    lines.append(f"{'peak memory MB':<18}" + "".join(
        f"{'n/a' if r['peak_mb'] is None else format(r['peak_mb'], '.1f'):>14}{'':>7}"
        for r in results))
    if len(results) == 2 and results[1]["step_ms"] > 0:
        lines.append(f"speed-up of fused over reference (step time): "
                     f"{results[1]['step_ms'] / results[0]['step_ms']:.2f}x; peak memory: "
                     f"{r0['memory']}")
    else:
        lines.append(f"peak memory: {r0['memory']}")
    return "\n".join(lines)


JSON_KEYS = ("method", "batch", "step_ms", "phases_ms", "images_per_s", "peak_mb")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend == "both":
        results = [_child(args, "fused"), _child(args, "reference")]
    else:
        results = [profile(args.method, args.batch, args.steps, warmup=args.warmup,
                           device=args.device, backend=args.backend,
                           image_size=args.image_size, width=args.width, queue=args.queue,
                           trace=args.trace, progress=not args.quiet)]
    print(format_table(results))
    if args.trace and args.backend != "both":
        print(f"Chrome trace: {args.trace}")
    if args.json:
        # The summary keys first, then the context (backend, device, threads, sizes).
        line = dict(results[0])
        if len(results) == 2:
            line["reference"] = {k: results[1][k] for k in JSON_KEYS[2:]}
        print(json.dumps(line))
    sys.stdout.flush()
    return 0
