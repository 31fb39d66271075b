"""``fastssl bench``: every fused op against its eager reference and ``torch.compile`` of it,
side by side in one run, for time and peak memory; table on stdout, ``--json``, ``--plot``.

Each (op, provider, size) runs in its own worker process (:mod:`fastssl.tools.bench.worker`), so
peak memory is per case; progress goes to stderr, one line per case.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import torch

from . import discover
from .measure import MODES, matmul_gflops


def add_arguments(p) -> None:
    p.add_argument("--op", nargs="+", default=["nt_xent"],
                   help="ops to benchmark, or 'all'; see --list")
    p.add_argument("--list", action="store_true", help="list the benchmarkable ops and exit")
    p.add_argument("--sizes", type=int, nargs="+",
                   help="override the op's default sizes (default: the op's, see --list)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: all the op supports")
    p.add_argument("--providers", nargs="+",
                   help="subset of fused, reference, compiled and the op's extra providers "
                        "(default: all)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the op's inputs")
    p.add_argument("--repeat", type=int, default=5,
                   help="timed runs per case (fewer when --max-seconds runs out)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop repeating a case once its runs took this long")
    p.add_argument("--json", metavar="PATH", help="write all rows (and machine info) as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="PNG of time and peak memory against size (one file per op: "
                        "PATH gets the op name inserted when several ops run)")


def _machine(device: torch.device) -> dict:
    from ... import __version__, _ext
    return {"fastssl": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "cpp_extension": _ext.build_info(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _run_worker(job: dict) -> list[dict]:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed blocks go back to the OS: honest RSS peaks
    proc = subprocess.run([sys.executable, "-m", "fastssl.tools.bench.worker", json.dumps(job)],
                          capture_output=True, text=True, env=env)
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines()
            if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(rows) < len(job["modes"]):
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        done = {r["mode"] for r in rows}
        for mode in job["modes"]:
            if mode not in done:
                rows.append({"op": job["op"], "provider": job["provider"], "mode": mode,
                             "x": job["size"], "dtype": job["dtype"], "device": job["device"],
                             "error": f"worker exited with {proc.returncode}: {tail}"})
    return rows


NOISY_SPREAD = 1.3  # max/min of a case's timed runs above this: marked, re-run suggested
MARKS = {  # mark in the table -> what it means (printed under the table when used)
    "~": f"max/min of the timed runs > {NOISY_SPREAD}: a noisy case; re-run it (more "
         "--repeat, or a quieter machine) before quoting it",
    "!": "fused/floor below 1 is impossible at a steady GEMM rate: the load changed between "
         "the GEMM probes and the runs; do not quote this ratio, re-run",
    "<": "'both' (forward + backward) came out faster than one of its parts: noise; re-run",
}


def annotate(spec, rows: list[dict], gflops: float | None) -> None:
    """Adds ``spread`` (max/min), ``floor_ms`` / ``floor_ratio`` (mode both, ops with a FLOP
    count: fused median / the time of the op's FLOPs at the best GEMM rate probed beside the
    case, or ``gflops`` when the case has no probe) and ``flags`` to each measured row."""
    by = {(r["provider"], r["mode"], r["x"]): r for r in rows if "median_ms" in r}
    for (p, mode, x), r in by.items():
        flags = []
        r["spread"] = round(r["max_ms"] / r["min_ms"], 3) if r.get("min_ms") else None
        if r["spread"] is not None and r["spread"] > NOISY_SPREAD:
            flags.append("noisy")
        if mode == "both":
            parts = [by[(p, m, x)]["median_ms"] for m in ("forward", "backward")
                     if (p, m, x) in by]
            if parts and r["median_ms"] < max(parts):
                flags.append("both_faster_than_a_part")
        rate = r.get("gemm_gflops") or gflops
        if mode == "both" and p == "fused" and spec.flops and rate:
            r["floor_gflops"] = round(rate, 1)
            r["floor_ms"] = spec.flops(x) / (rate * 1e9) * 1e3
            r["floor_ratio"] = round(r["median_ms"] / r["floor_ms"], 3)
            if r["floor_ratio"] < 1:
                flags.append("below_floor")
        r["flags"] = flags


def _marks(row) -> str:
    flags = row.get("flags", [])
    return (("~" if "noisy" in flags else "") + ("<" if "both_faster_than_a_part" in flags
                                                  else ""))


def _fmt_one(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 1e3 else f"{ms:.1f} ms"


def _fmt_ms(row) -> str:
    """``median [min-max]`` and the row's marks."""
    if row is None:
        return "-"
    if "median_ms" in row:
        med, lo, hi = row["median_ms"], row.get("min_ms"), row.get("max_ms")
        if lo is None or hi is None or row.get("runs", 1) < 2:
            return _fmt_one(med) + _marks(row)
        unit, div = ("s", 1e3) if med >= 1e3 else ("ms", 1.0)
        digits = 2 if unit == "s" else 1
        return (f"{med / div:.{digits}f} [{lo / div:.{digits}f}-{hi / div:.{digits}f}] {unit}"
                + _marks(row))
    return "skip" if "skipped" in row else "error"


def _fmt_mb(row) -> str:
    if row is None or row.get("peak_mb") is None:
        return "-"
    mb = row["peak_mb"]
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


PROVIDER_LEGEND = ("fused = fastssl's op; reference = the eager PyTorch reference "
                   "(fastssl.reference); compiled = torch.compile(reference)")


def print_table(spec, rows: list[dict], gflops: float | None, out=sys.stdout) -> None:
    """One table per mode: time as median [min-max] of the timed runs, peak extra memory,
    ratios of medians, and (mode both) fused/floor; marks explained under the tables."""
    annotate(spec, rows, gflops)
    providers = [p for p in spec.providers() if any(r["provider"] == p for r in rows)]
    print(f"\n## {spec.name}: {spec.describe}", file=out)
    print(f"time: median [min-max] of the timed runs; {PROVIDER_LEGEND}", file=out)
    used = set()
    for mode in [m for m in MODES if any(r["mode"] == m for r in rows)]:
        by = {(r["provider"], r["x"]): r for r in rows if r["mode"] == mode}
        sizes = sorted({r["x"] for r in rows if r["mode"] == mode})
        head = [spec.x_label] + [f"{p} time" for p in providers] + [f"{p} peak" for p in providers]
        ratio_cols = [p for p in providers if p != "fused"]
        head += [f"{p}/fused" for p in ratio_cols]
        floor = bool(spec.flops) and mode == "both" and (
            gflops or any(r.get("floor_ratio") is not None for r in by.values()))
        if floor:
            head.append("fused/floor")
        print(f"\n{mode}:", file=out)
        table = [head]
        for x in sizes:
            cells = [by.get((p, x)) for p in providers]
            for r in cells:
                used.update(_marks(r) if r else "")
            line = [str(x)] + [_fmt_ms(r) for r in cells]
            line += [_fmt_mb(r) for r in cells]
            fused = by.get(("fused", x), {}).get("median_ms")
            for p in ratio_cols:
                other = by.get((p, x), {}).get("median_ms")
                line.append(f"{other / fused:.2f}x" if fused and other else "-")
            if floor:
                fr = by.get(("fused", x), {}).get("floor_ratio")
                mark = "!" if fr is not None and fr < 1 else ""
                used.update(mark)
                line.append(f"{fr:.2f}x{mark}" if fr is not None else "-")
            table.append(line)
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        for i, r in enumerate(table):
            print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |", file=out)
            if i == 0:
                print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for m in "~!<":
        if m in used:
            print(f"  {m} {MARKS[m]}", file=out)
    notes = sorted({f"{r['provider']} at {spec.x_label}={r['x']}: {r.get('skipped') or r.get('error')}"
                    for r in rows if "skipped" in r or "error" in r})
    for n in notes:
        print(f"  note: {n}", file=out)
    if spec.flops:
        rates = sorted(r["floor_gflops"] for r in rows if r.get("floor_gflops"))
        where = (f"the best fp32 2048x128x2048 GEMM rate probed beside each case "
                 f"({rates[0]:.0f}-{rates[-1]:.0f} GFLOP/s)" if rates else
                 f"this machine's GEMM rate ({gflops:.0f} GFLOP/s, fp32 2048x128x2048)"
                 if gflops else None)
        if where:
            print(f"  floor = {spec.name} FLOPs at {where}; fused/floor = fused median / "
                  "floor time", file=out)


def plot(spec, rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = "both" if any(r["mode"] == "both" for r in rows) else "forward"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for p in spec.providers():
        pts = sorted((r["x"], r) for r in rows if r["provider"] == p and r["mode"] == mode
                     and "median_ms" in r)
        if not pts:
            continue
        xs = [x for x, _ in pts]
        axes[0].plot(xs, [r["median_ms"] / 1e3 for _, r in pts], "o-", label=p)
        mem = [(x, r["peak_mb"]) for x, r in pts if r.get("peak_mb") is not None]
        if mem:
            axes[1].plot([x for x, _ in mem], [m for _, m in mem], "o-", label=p)
    for ax, ylab in zip(axes, ["time (s)", "peak extra memory (MB)"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(spec.x_label)
        ax.set_ylabel(ylab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{spec.name} ({mode}): {spec.describe}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    specs = discover()
    if args.list:
        for name, s in specs.items():
            print(f"{name}: {s.describe} (sizes {s.sizes}, providers {s.providers()})")
        return 0
    names = list(specs) if args.op == ["all"] else args.op
    unknown = [n for n in names if n not in specs]
    if unknown:
        print(f"unknown op(s) {unknown}; available: {list(specs)}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here (this torch: "
              f"{torch.__version__}); nothing to run", file=sys.stderr)
        return 0
    gflops = matmul_gflops(device)
    machine = _machine(device)
    print(f"fastssl bench on {machine['device']} ({machine['threads']} threads, torch "
          f"{machine['torch']}, {args.dtype}); fp32 GEMM {gflops:.0f} GFLOP/s at the start "
          "(each case probes its own)", flush=True)
    all_rows = []
    for name in names:
        spec = specs[name]
        sizes = args.sizes or spec.sizes
        modes = [m for m in (args.modes or spec.modes) if m in spec.modes]
        providers = [p for p in (args.providers or spec.providers()) if p in spec.providers()]
        jobs = [(p, s) for s in sizes for p in providers]
        rows = []
        for i, (p, s) in enumerate(jobs, 1):
            reason = spec.skip(p, s, device) if spec.skip else None
            if reason:
                rows += [{"op": name, "provider": p, "mode": m, "x": s, "dtype": args.dtype,
                          "device": device.type, "skipped": reason} for m in modes]
                print(f"[{name} {i}/{len(jobs)}] {spec.x_label}={s} {p}: skipped ({reason})",
                      file=sys.stderr, flush=True)
                continue
            t0 = time.perf_counter()
            got = _run_worker({"op": name, "provider": p, "size": s, "modes": modes,
                               "dtype": args.dtype, "device": device.type,
                               "repeat": args.repeat, "max_seconds": args.max_seconds})
            rows += got
            summary = ", ".join(f"{r['mode']} {_fmt_ms(r)} / {_fmt_mb(r)}" for r in got)
            print(f"[{name} {i}/{len(jobs)}] {spec.x_label}={s} {p}: {summary} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        print_table(spec, rows, gflops if device.type == "cpu" else None)
        if args.plot:
            path = args.plot if len(names) == 1 else args.plot.replace(".png", f"_{name}.png")
            plot(spec, rows, path)
            print(f"  plot: {path}")
        all_rows += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "matmul_gflops": gflops, "noisy_spread": NOISY_SPREAD,
                       "marks": MARKS, "rows": all_rows}, f, indent=1)
        print(f"\njson: {args.json}")
    return 0
