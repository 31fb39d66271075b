"""One benchmark case group in its own process: ``python -m fastssl.tools.bench.worker '<json>'``.

Input JSON: {"op", "provider", "size", "modes", "dtype", "device", "repeat", "max_seconds"}.
Output: one JSON line per mode on stdout, prefixed with ``RESULT `` (anything else the op
prints is ignored by the parent).
"""
from __future__ import annotations

import json
import sys
import traceback

import torch


def main(argv=None) -> int:
    job = json.loads((argv or sys.argv[1:])[0])
    from . import discover
    from .measure import measure, run_mode

    spec = discover()[job["op"]]
    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    provider = job["provider"]
    if provider == "fused":
        fn = spec.fused
    elif provider == "reference":
        fn = spec.reference
    elif provider == "compiled":
        fn = torch.compile(spec.reference)
    else:
        fn = spec.extra_providers[provider]
    make = lambda: spec.make_inputs(job["size"], dtype, device)  # noqa: E731
    if provider == "compiled":
        # Compile every graph the modes will use (forward and backward) before any measurement.
        run_mode(fn, make(), "both" if spec.differentiable else "forward", device)
    for mode in job["modes"]:
        row = {"op": spec.name, "provider": provider, "mode": mode, "x": job["size"],
               "dtype": job["dtype"], "device": job["device"]}
        try:
            row.update(measure(fn, make, mode, device, job["repeat"], job["max_seconds"],
                               gemm_probe=spec.flops is not None and device.type == "cpu"))
        except torch.OutOfMemoryError as exc:  # pragma: no cover - depends on the machine
            row["skipped"] = f"out of memory: {str(exc).splitlines()[0]}"
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc(file=sys.stderr)
        print("RESULT " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
