"""``fastssl info``: what this installation can run, and why not where it cannot."""
from __future__ import annotations

import json
import os
import platform

import torch

from .. import __version__, _dispatch, _ext


def op_kernels() -> dict:
    """``torch.ops.fastssl`` op -> {"cpu": "C++" | None, "cuda": "Triton" | "CUDA C++" | None}:
    the kernel each device runs (fastssl/ops/_library.py: schemas in Python, C++ CPU kernels
    from fastssl._C, Triton CUDA kernels from fastssl/ops, CUDA C++ ones from a CUDA build)."""
    from ..ops import _library
    names = sorted(_library.TRITON_KERNELS) + ["ema_update_", "moco_enqueue_"]
    _ext.available()  # the C++ registrations, when the extension loads
    out = {}
    for name in names:
        qual = f"{_library.NAMESPACE}::{name}"
        has = lambda key: torch._C._dispatch_has_kernel_for_dispatch_key(qual, key)  # noqa: E731
        cuda = None
        if name in _library.TRITON_KERNELS:
            cuda = "Triton"
        elif has("CUDA"):
            cuda = "CUDA C++"
        out[name] = {"cpu": "C++" if has("CPU") else None, "cuda": cuda}
    return out
def _simd_clone() -> str | None:
    """The ISA clone (AVX-512 / AVX2 / baseline) that the C++ CPU kernels run on this CPU, as
    GCC's dispatcher picks it; None without the extension."""
    if not _ext.available():
        return None
    if not _ext.has_op("simd_clone"):
        return "unknown (this build of the extension predates the report: rebuild it)"
    return torch.ops.fastssl.simd_clone()


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
        "cpu_simd_clone": _simd_clone(),
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
        "ops": op_kernels(),
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
    if info["cpu_simd_clone"]:
        print(f"      ISA clone on this CPU: {info['cpu_simd_clone']}")
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
    print("  ops (kernel per device; '-': that device runs the pure-PyTorch reference):")
    for name, k in info["ops"].items():
        print(f"      {name:<20} CPU: {k['cpu'] or '-':<4}  CUDA: {k['cuda'] or '-'}")
    if info["backend_env"]:
        print(f"  FASTSSL_BACKEND={info['backend_env']}")
    return 0
