"""``fastssl info``: what this installation can run, and why not where it cannot."""
from __future__ import annotations

import json
import os
import platform

import torch

from . import __version__, _dispatch, _ext


def collect() -> dict:
    triton_ok, triton_why = _dispatch.triton_available()
    triton_version = None
    if triton_ok:
        import triton
        triton_version = triton.__version__
    return {
        "fastssl": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpp_extension": _ext.available(),
        "cpp_extension_build": _ext.build_info(),
        "cpp_extension_error": _ext.why_unavailable(),
        # CUDA C++ kernels (csrc/cuda): registered only by a build against a CUDA torch.
        "cuda_cpp_kernels": [op for op in ("ema_update_", "moco_enqueue_")
                             if _ext.has_kernel(op, "CUDA")],
        "triton": triton_version,
        "triton_error": triton_why,
        "triton_interpret": _dispatch.triton_interpret(),
        "cuda": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_cuda_build": torch.version.cuda,
        "backend_env": os.environ.get("FASTSSL_BACKEND"),
    }


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info))
        return 0
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    print(f"fastssl {info['fastssl']}  (python {info['python']}, {info['machine']}, "
          f"torch {info['torch']}, {info['threads']} threads)")
    print(f"  C++ extension (CPU kernels): {yes(info['cpp_extension'])}"
          + (f" -- {info['cpp_extension_build']}" if info["cpp_extension"] else ""))
    if not info["cpp_extension"]:
        print(f"      why not: {info['cpp_extension_error']}")
        print("      CPU ops run the pure-PyTorch reference (slow, O(N^2) memory).")
    if info["torch_cuda_build"]:
        print("  CUDA C++ kernels: " + (", ".join(info["cuda_cpp_kernels"]) or
                                         ("none (fastssl._C was built without CUDA)"
                                          if info["cpp_extension"] else "none")))
    print(f"  Triton (GPU kernels): {info['triton'] or 'no'}"
          + (" [TRITON_INTERPRET=1: kernels run on CPU tensors]" if info["triton_interpret"]
             else ""))
    if info["triton_error"]:
        print(f"      why not: {info['triton_error']}")
    print(f"  CUDA device: {info['cuda_device'] or 'none'}"
          + ("" if info["torch_cuda_build"] else " (this torch is a CPU build)"))
    if info["backend_env"]:
        print(f"  FASTSSL_BACKEND={info['backend_env']}")
    return 0
