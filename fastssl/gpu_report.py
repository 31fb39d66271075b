"""``fastssl gpu-report``: what the compiler emits for real GPUs, on a machine without one.

* Every Triton kernel listed in the ``AOT_KERNELS`` of any ``fastssl/ops/*.py`` module is
  compiled ahead of time (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``)
  for sm_80 (A100) and sm_90 (H100), in the configurations its launcher uses. Registers and
  spills come from ``ptxas -v`` run on Triton's PTX with Triton's own ptxas and flags (so the
  cubin is the one Triton would load); shared memory is Triton's dynamic allocation; tensor
  cores = ``wgmma.mma_async`` (sm_90) / ``mma.sync`` (sm_80) in the PTX.
* Every ``csrc/cuda/*.cu`` is compiled with ``nvcc -cubin -arch=sm_80|sm_90 -Xptxas -v``
  (torch headers on the include path); none yet is fine.
* Roofline estimates for an H100 SXM (989 TFLOP/s dense bf16, ~3.9e12 exp/s on the SFUs,
  3.35 TB/s HBM3): ``h100_ms = max(flops / 989e12, exps / 3.9e12, bytes / 3.35e12)`` in ms, for
  each op module's ``ESTIMATES`` / NT-Xent's fused kernels and eager reference.

Results are cached in ``~/.cache/fastssl/gpu_report/`` keyed by the kernel source, its
configuration and the Triton version (Triton also caches its compiles in ``~/.triton``), so a
second run takes seconds. ``--json`` prints ``{"kernels": [...], "estimates": [...]}``.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor

ARCHS = (80, 90)
H100 = dict(flops=989e12, exps=3.9e12, bytes=3.35e12)
CACHE_DIR = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")),
                         "fastssl", "gpu_report")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompile everything (ignore ~/.cache/fastssl/gpu_report)")
    parser.add_argument("--only", default=None,
                        help="only kernels whose name contains this string")
    parser.add_argument("--cuda-dir", default=None,
                        help="folder of .cu sources (default: csrc/cuda of this checkout)")


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------


def discover_aot_kernels() -> list:
    """``(module, entry)`` for every entry of every ``fastssl.ops.*`` module's AOT_KERNELS."""
    import fastssl.ops as ops_pkg

    found = []
    for info in sorted(pkgutil.iter_modules(ops_pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"fastssl.ops.{info.name}")
        for entry in getattr(mod, "AOT_KERNELS", []):
            found.append((mod.__name__, entry))
    return found


def _entry_key(entry: dict, cap: int) -> str:
    import triton

    fn = entry["fn"]
    # fn.cache_key hashes the kernel source and the jit functions it calls.
    payload = json.dumps([fn.cache_key, triton.__version__, cap, entry["signature"],
                          {k: str(v) for k, v in entry["constexprs"].items()},
                          entry.get("num_warps", 4), entry.get("num_stages", 3)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _ptxas_stats(ptx: str, cap: int) -> tuple[int, int]:
    """(registers, spill store + load bytes) from Triton's ptxas with Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    arch = sm_arch_from_capability(cap)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(cap).path, "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    regs = max(int(r) for r in _PTXAS_REGS.findall(log))
    spills = sum(int(a) + int(b) for a, b in _PTXAS_SPILL.findall(log))
    return regs, spills


def compile_triton(entry: dict, cap: int, use_cache: bool = True) -> dict:
    """Compiles one AOT entry for ``sm_<cap>``; returns the report row."""
    key = _entry_key(entry, cap)
    path = os.path.join(CACHE_DIR, f"{key}.json")
    if use_cache and os.path.exists(path):
        # The key is the compiled configuration, not the report name: entries of different
        # ops can share one compile (e.g. info_nce's and clip's identical LSE kernels), so the
        # cached row is re-labelled with this entry's name.
        with open(path) as f:
            return dict(json.load(f), kernel=entry["name"])
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = entry["fn"]
    sig = dict(entry["signature"])
    for k in entry["constexprs"]:
        sig[k] = "constexpr"
    # torch allocations are 256-byte aligned: the launcher's JIT specialises pointers as
    # 16-divisible, so the AOT build says so too.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if str(sig.get(name, "")).startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=entry["constexprs"], attrs=attrs)
    target = GPUTarget("cuda", cap, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": entry.get("num_warps", 4),
                                     "num_stages": entry.get("num_stages", 3)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(src, target=target, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    regs, spills = _ptxas_stats(ptx, cap)
    tc = ("wgmma.mma_async" in ptx) if cap >= 90 else ("mma.sync" in ptx)
    row = dict(kernel=entry["name"], arch=f"sm_{cap}", source="triton", registers=regs,
               shared_bytes=int(compiled.metadata.shared), spill_bytes=spills,
               tensor_cores=bool(tc))
    os.makedirs(CACHE_DIR, exist_ok=True)
    # Atomic: two workers may compile the same configuration under different names.
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(row, f)
    os.replace(tmp, path)
    return row


# ---------------------------------------------------------------------------------------
# CUDA C++ sources
# ---------------------------------------------------------------------------------------


def _nvcc() -> str | None:
    return shutil.which("nvcc") or (os.path.exists("/usr/local/bin/nvcc") and
                                    "/usr/local/bin/nvcc") or None


_NVCC_FN = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_NVCC_SHARED = re.compile(r"(\d+) bytes smem")


def _demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return name
    out = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip()
    return out.split("(")[0] or name


def compile_cuda(path: str, cap: int, use_cache: bool = True) -> list:
    """nvcc -cubin for ``sm_<cap>`` with ``-Xptxas -v``; one row per kernel in the file."""
    with open(path, "rb") as f:
        key = hashlib.sha256(f.read() + f"{cap}".encode()).hexdigest()[:24]
    cache = os.path.join(CACHE_DIR, f"cu-{key}.json")
    if use_cache and os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (needed for csrc/cuda/*.cu)")
    text = open(path, encoding="utf-8", errors="replace").read()
    includes = []
    if re.search(r"#include\s*[<\"](torch|ATen|c10)/", text):
        import torch.utils.cpp_extension as ce
        for inc in ce.include_paths():
            includes += ["-I", inc]
        import sysconfig
        includes += ["-I", sysconfig.get_paths()["include"]]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        cmd = [nvcc, "-cubin", f"-arch=sm_{cap}", "-O3", "-std=c++20", "-Xptxas", "-v",
               "-I", os.path.join(REPO, "csrc"), *includes, path, "-o", cubin]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {path} for sm_{cap}:\n{proc.stderr[-2000:]}")
        # tensor cores: HGMMA (sm_90 wgmma) / HMMA, IMMA (mma) in the SASS
        sass = subprocess.run([_cuobjdump(), "-sass", cubin], capture_output=True,
                              text=True).stdout
    rows, current = [], None
    for line in (proc.stdout + proc.stderr).splitlines():
        m = _NVCC_FN.search(line)
        if m:
            current = dict(kernel=f"{os.path.basename(path)}:{_demangle(m.group(1))}",
                           arch=f"sm_{cap}", source="cuda", registers=0, shared_bytes=0,
                           spill_bytes=0, tensor_cores=False)
            rows.append(current)
            continue
        if current is None:
            continue
        s = _PTXAS_SPILL.search(line)
        if s:
            current["spill_bytes"] = int(s.group(1)) + int(s.group(2))
        r = _PTXAS_REGS.search(line)
        if r:
            current["registers"] = int(r.group(1))
            sh = _NVCC_SHARED.search(line)
            current["shared_bytes"] = int(sh.group(1)) if sh else 0
    for fn_sass in re.split(r"\n\s*Function : ", sass)[1:]:
        name = _demangle(fn_sass.split("\n", 1)[0].strip())
        uses = bool(re.search(r"\b(HGMMA|HMMA|IMMA|BMMA)\b", fn_sass))
        for row in rows:
            if row["kernel"].endswith(":" + name):
                row["tensor_cores"] = uses
    os.makedirs(CACHE_DIR, exist_ok=True)
    with open(cache, "w") as f:
        json.dump(rows, f)
    return rows


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


# ---------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------


def roofline_ms(flops: float, exps: float, nbytes: float) -> float:
    return 1e3 * max(flops / H100["flops"], exps / H100["exps"], nbytes / H100["bytes"])


def estimates() -> list:
    """H100 roofline rows: NT-Xent fwd + bwd at 2N = 65,536, D = 128 (bf16), fused vs eager."""
    from fastssl.ops import ntxent

    m, d = ntxent.ESTIMATE_SHAPE["m"], ntxent.ESTIMATE_SHAPE["d"]
    shape = f"2N={m},D={d},bf16,fwd+bwd"
    rows = []
    for op, work in (("nt_xent fused (triton)", ntxent.work_fused(m, d)),
                     ("nt_xent eager reference", ntxent.work_eager_reference(m, d))):
        rows.append(dict(op=op, shape=shape, flops=int(work["flops"]), exps=int(work["exps"]),
                         bytes=int(work["bytes"]),
                         h100_ms=round(roofline_ms(work["flops"], work["exps"],
                                                   work["bytes"]), 3)))
    return rows


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def collect(use_cache: bool = True, only: str | None = None,
            cuda_dir: str | None = None) -> dict:
    """The whole report as the ``--json`` dict.

    Under ``TRITON_INTERPRET=1`` (e.g. inside the test suite) ``@triton.jit`` functions are
    interpreter objects that cannot be compiled, so the report then runs in a subprocess
    without that variable, importing this same checkout.
    """
    from fastssl.ops._triton_utils import INTERPRET

    if INTERPRET:
        return _collect_in_subprocess(use_cache, only, cuda_dir)
    jobs = [(entry, cap) for _mod, entry in discover_aot_kernels() for cap in ARCHS
            if only is None or only in entry["name"]]
    # Two workers: compiles are mostly ptxas/LLVM in C++, and this box is shared.
    with ThreadPoolExecutor(max_workers=2) as pool:
        kernels = list(pool.map(lambda job: compile_triton(job[0], job[1], use_cache), jobs))
    cuda_dir = cuda_dir or os.path.join(REPO, "csrc", "cuda")
    for path in sorted(glob.glob(os.path.join(cuda_dir, "*.cu"))):
        if only is not None and only not in os.path.basename(path):
            continue
        for cap in ARCHS:
            kernels.extend(compile_cuda(path, cap, use_cache))
    return {"kernels": kernels, "estimates": estimates()}


def _collect_in_subprocess(use_cache: bool, only: str | None, cuda_dir: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "fastssl.gpu_report", "--json"]
    cmd += ["--no-cache"] if not use_cache else []
    cmd += ["--only", only] if only is not None else []
    cmd += ["--cuda-dir", cuda_dir] if cuda_dir is not None else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"gpu-report subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def format_table(report: dict) -> str:
    lines = [f"{'kernel':<44} {'arch':<6} {'source':<7} {'regs':>5} {'shared':>8} "
             f"{'spills':>7} {'tensor cores':>12}"]
    for k in report["kernels"]:
        lines.append(f"{k['kernel']:<44} {k['arch']:<6} {k['source']:<7} {k['registers']:>5} "
                     f"{k['shared_bytes']:>8} {k['spill_bytes']:>7} "
                     f"{'yes' if k['tensor_cores'] else 'no':>12}")
    lines.append("")
    lines.append("H100 roofline (989 TFLOP/s bf16 dense, 3.9e12 exp/s, 3.35 TB/s; "
                 "ms = max of the three):")
    lines.append(f"{'op':<26} {'shape':<28} {'FLOPs':>10} {'exps':>10} {'bytes':>10} "
                 f"{'ms':>8}")
    for e in report["estimates"]:
        lines.append(f"{e['op']:<26} {e['shape']:<28} {e['flops']:>10.3g} {e['exps']:>10.3g} "
                     f"{e['bytes']:>10.3g} {e['h100_ms']:>8.3f}")
    return "\n".join(lines)


def run(args) -> int:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton is a dependency
        print(f"gpu-report needs Triton: {exc}", file=sys.stderr)
        return 1
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    report = collect(use_cache=not args.no_cache, only=args.only, cuda_dir=args.cuda_dir)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_table(report))
    return 0


if __name__ == "__main__":  # python -m fastssl.gpu_report [--json]
    _parser = argparse.ArgumentParser(prog="fastssl gpu-report", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
