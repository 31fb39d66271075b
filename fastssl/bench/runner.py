"""``fastssl bench``: every fused op against its eager reference and ``torch.compile`` of it,
side by side in one run, for time and peak memory; table on stdout, ``--json``, ``--plot``.

Each (op, provider, size) runs in its own worker process (:mod:`fastssl.bench.worker`), so
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
                   help="ops to benchmark, or 'all' (default: nt_xent); see --list")
    p.add_argument("--list", action="store_true", help="list the benchmarkable ops and exit")
    p.add_argument("--sizes", type=int, nargs="+", help="override the op's default sizes")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: all the op supports")
    p.add_argument("--providers", nargs="+",
                   help="subset of fused, reference, compiled and the op's extra providers")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeat", type=int, default=3, help="timed runs per case (default 3)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop repeating a case once its runs took this long (default 60)")
    p.add_argument("--json", metavar="PATH", help="write all rows (and machine info) as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="PNG of time and peak memory against size (one file per op: "
                        "PATH gets the op name inserted when several ops run)")


def _machine(device: torch.device) -> dict:
    from .. import __version__, _ext
    return {"fastssl": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "cpp_extension": _ext.build_info(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _run_worker(job: dict) -> list[dict]:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed blocks go back to the OS: honest RSS peaks
    proc = subprocess.run([sys.executable, "-m", "fastssl.bench.worker", json.dumps(job)],
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


def _fmt_ms(row) -> str:
    if row is None:
        return "-"
    if "median_ms" in row:
        ms = row["median_ms"]
        return f"{ms / 1e3:.2f} s" if ms >= 1e3 else f"{ms:.1f} ms"
    return "skip" if "skipped" in row else "error"


def _fmt_mb(row) -> str:
    if row is None or row.get("peak_mb") is None:
        return "-"
    mb = row["peak_mb"]
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def print_table(spec, rows: list[dict], gflops: float | None, out=sys.stdout) -> None:
    providers = [p for p in spec.providers() if any(r["provider"] == p for r in rows)]
    print(f"\n## {spec.name}: {spec.describe}", file=out)
    for mode in [m for m in MODES if any(r["mode"] == m for r in rows)]:
        by = {(r["provider"], r["x"]): r for r in rows if r["mode"] == mode}
        sizes = sorted({r["x"] for r in rows if r["mode"] == mode})
        head = [spec.x_label] + [f"{p} time" for p in providers] + [f"{p} peak" for p in providers]
        ratio_cols = [p for p in providers if p != "fused"]
        head += [f"{p}/fused" for p in ratio_cols]
        floor = gflops and spec.flops and mode == "both"
        if floor:
            head.append("fused/floor")
        print(f"\n{mode}:", file=out)
        table = [head]
        for x in sizes:
            line = [str(x)] + [_fmt_ms(by.get((p, x))) for p in providers]
            line += [_fmt_mb(by.get((p, x))) for p in providers]
            fused = by.get(("fused", x), {}).get("median_ms")
            for p in ratio_cols:
                other = by.get((p, x), {}).get("median_ms")
                line.append(f"{other / fused:.2f}x" if fused and other else "-")
            if floor:
                fl = spec.flops(x) / (gflops * 1e9) * 1e3
                line.append(f"{fused / fl:.2f}x" if fused else "-")
            table.append(line)
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        for i, r in enumerate(table):
            print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |", file=out)
            if i == 0:
                print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    notes = sorted({f"{r['provider']} at {spec.x_label}={r['x']}: {r.get('skipped') or r.get('error')}"
                    for r in rows if "skipped" in r or "error" in r})
    for n in notes:
        print(f"  note: {n}", file=out)
    if gflops and spec.flops:
        print(f"  floor = {spec.name} FLOPs at this machine's GEMM rate ({gflops:.0f} GFLOP/s, "
              "fp32 2048x128x2048); fused/floor = fused time / floor time", file=out)


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
          f"{machine['torch']}, {args.dtype}); fp32 GEMM {gflops:.0f} GFLOP/s", flush=True)
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
            json.dump({"machine": machine, "matmul_gflops": gflops, "rows": all_rows}, f, indent=1)
        print(f"\njson: {args.json}")
    return 0
