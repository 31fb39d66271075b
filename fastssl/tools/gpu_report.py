"""``fastssl gpu-report``: what the compiler emits for real GPUs, on a machine without one.

* Every Triton kernel listed in the ``AOT_KERNELS`` of any ``fastssl/ops/*.py`` module is
  compiled ahead of time (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``)
  for sm_80 (A100) and sm_90 (H100), in the configurations its launcher uses. Registers and
  spills come from ``ptxas -v`` run on Triton's PTX with Triton's own ptxas and flags (so the
  cubin is the one Triton would load); shared memory is Triton's dynamic allocation, checked
  against the arch's per-block limit (``SHARED_LIMIT``); the tensor-core instruction is
  ``"wgmma"`` (``wgmma.mma_async`` in the PTX, Hopper), ``"mma"`` (``mma.sync``, Ampere-style)
  or ``"none"``. An entry with an ``"arch"`` key (a per-arch tile) compiles for that arch only.
  Rows carry the entry's ``"op"``, ``"dtype"`` and ``"D"``.
* Every ``csrc/cuda/*.cu`` is compiled with ``nvcc -cubin -arch=sm_80|sm_90 -Xptxas -v``
  (torch headers on the include path); none yet is fine.
* Roofline figures for an H100 SXM (989 TFLOP/s dense bf16, ~3.9e12 exp/s on the SFUs,
  3.35 TB/s HBM3), NT-Xent's fused kernels and eager reference:
  ``h100_lower_bound_ms = max(flops / 989e12, exps / 3.9e12, bytes / 3.35e12)``: a **lower
  bound**, not a prediction: it assumes tensor cores, exp units and HBM all at peak and fully
  overlapped. ``h100_expected_ms`` applies measured efficiencies per pass (``EXPECTED_EFF``):
  forward at 75% and backward at 50% of the tensor-core / exp peaks, the fractions
  FlashAttention-3 reaches on an H100 (Shah et al. 2024, arXiv:2407.08608: forward up to
  ~740 of 989 TFLOP/s in bf16; backward ~450-550 TFLOP/s at head dim 128), and 80% of HBM
  bandwidth (an assumption: the fraction a large streaming copy typically reaches), the
  three still overlapped within a pass, the passes summed.

Results are cached in ``~/.cache/fastssl/gpu_report/`` keyed by the kernel source, its
configuration and the Triton version (Triton also caches its compiles in ``~/.triton``), so a
second run takes seconds; a cold run prints one progress line per few compiles to stderr and
compiles in ``--jobs`` processes (identical configurations once). ``--json`` prints
``{"kernels": [...], "estimates": [...]}``.
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
import time
from concurrent.futures import ProcessPoolExecutor

ARCHS = (80, 90)
# Dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
ROW_FORMAT = 2  # bump when the cached row's keys change
H100 = dict(flops=989e12, exps=3.9e12, bytes=3.35e12)
# Fractions of the H100 peaks behind ``h100_expected_ms`` (see the module docstring):
# FlashAttention-3's measured forward / backward utilisation, 80% of HBM (assumed).
EXPECTED_EFF = dict(fwd=dict(flops=0.75, exps=0.75, bytes=0.8),
                    bwd=dict(flops=0.50, exps=0.50, bytes=0.8))
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
    parser.add_argument("--d", default=None, metavar="D[,D...]",
                        help="only entries at these embedding widths (and width-independent "
                             "ones), e.g. 128,1024")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="compile processes (default: min(2, cores))")


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
    payload = json.dumps([ROW_FORMAT, fn.cache_key, triton.__version__, cap, entry["signature"],
                          {k: str(v) for k, v in entry["constexprs"].items()},
                          entry.get("num_warps", 4), entry.get("num_stages", 3),
                          str(sorted(_attrs(entry).items()))], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _attrs(entry: dict) -> dict:
    """``ASTSource`` attrs: the entry's own, or every pointer 16-byte divisible (torch
    allocations are 256-byte aligned: what the launcher's JIT specialises on)."""
    if entry.get("attrs") is not None:
        return entry["attrs"]
    sig = entry["signature"]
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(entry["fn"].arg_names)
            if str(sig.get(name, "")).startswith("*")}


def entry_archs(entry: dict) -> tuple:
    """The archs an entry is compiled for: its own ``"arch"``, else all of ``ARCHS``."""
    return (entry["arch"],) if entry.get("arch") is not None else ARCHS


def _labels(entry: dict) -> dict:
    return dict(kernel=entry["name"], op=entry.get("op"), dtype=entry.get("dtype"),
                D=entry.get("D"))


def tensor_core_instruction(ptx: str) -> str:
    """"wgmma" / "mma" / "none": the tensor-core instruction family in Triton's PTX."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    return "none"


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
            return dict(json.load(f), **_labels(entry))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = entry["fn"]
    sig = dict(entry["signature"])
    for k in entry["constexprs"]:
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=entry["constexprs"], attrs=_attrs(entry))
    target = GPUTarget("cuda", cap, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": entry.get("num_warps", 4),
                                     "num_stages": entry.get("num_stages", 3)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(src, target=target, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    regs, spills = _ptxas_stats(ptx, cap)
    row = dict(_labels(entry), arch=f"sm_{cap}", source="triton", registers=regs,
               shared_bytes=int(compiled.metadata.shared), shared_limit=SHARED_LIMIT[cap],
               spill_bytes=spills, tensor_cores=tensor_core_instruction(ptx))
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
        key = hashlib.sha256(f.read() + f"{cap}-v2".encode()).hexdigest()[:24]
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
                           op=None, dtype=None, D=None, arch=f"sm_{cap}", source="cuda",
                           registers=0, shared_bytes=0, shared_limit=SHARED_LIMIT[cap],
                           spill_bytes=0, tensor_cores="none")
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
        uses = ("wgmma" if re.search(r"\bHGMMA\b", fn_sass) else
                "mma" if re.search(r"\b(HMMA|IMMA|BMMA)\b", fn_sass) else "none")
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


def roofline_lower_bound_ms(flops: float, exps: float, nbytes: float) -> float:
    """A lower bound on H100 time: every unit at its peak, all fully overlapped."""
    return 1e3 * max(flops / H100["flops"], exps / H100["exps"], nbytes / H100["bytes"])


def expected_ms(passes: dict) -> float:
    """H100 time at ``EXPECTED_EFF``: per pass, each unit at its measured fraction of peak
    (overlapped within the pass), the passes one after the other."""
    total = 0.0
    for name, work in passes.items():
        eff = EXPECTED_EFF[name]
        total += max(work["flops"] / (eff["flops"] * H100["flops"]),
                     work["exps"] / (eff["exps"] * H100["exps"]),
                     work["bytes"] / (eff["bytes"] * H100["bytes"]))
    return 1e3 * total


def estimates() -> list:
    """H100 rows for NT-Xent fwd + bwd (bf16) at each of ``ntxent.ESTIMATE_SHAPES``: fused vs
    eager reference, a lower bound and an expected time (module docstring)."""
    from fastssl.ops import nt_xent as ntxent

    rows = []
    for m, d in ntxent.ESTIMATE_SHAPES:
        shape = f"2N={m},D={d},bf16,fwd+bwd"
        for op, work in (("nt_xent fused (triton)", ntxent.work_fused(m, d)),
                         ("nt_xent eager reference", ntxent.work_eager_reference(m, d))):
            rows.append(dict(
                op=op, shape=shape, flops=int(work["flops"]), exps=int(work["exps"]),
                bytes=int(work["bytes"]),
                h100_lower_bound_ms=round(roofline_lower_bound_ms(
                    work["flops"], work["exps"], work["bytes"]), 3),
                h100_expected_ms=round(expected_ms(work["passes"]), 3)))
    return rows


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _compile_job(job: tuple) -> dict:
    """Worker: (module name, index in its AOT_KERNELS, cap, use_cache) -> report row. Entries
    hold kernel objects, which do not pickle: the worker re-imports the module."""
    mod_name, index, cap, use_cache = job
    entry = importlib.import_module(mod_name).AOT_KERNELS[index]
    return compile_triton(entry, cap, use_cache)


def collect(use_cache: bool = True, only: str | None = None,
            cuda_dir: str | None = None, jobs: int = 2, select=None,
            progress: bool = True, ds=None) -> dict:
    """The whole report as the ``--json`` dict.

    Args:
        use_cache: reuse ``~/.cache/fastssl/gpu_report`` rows.
        only: keep kernels whose name contains this string.
        cuda_dir: folder of ``.cu`` files (default: this checkout's ``csrc/cuda``).
        jobs: compile processes (identical configurations are compiled once).
        select: optional predicate on an AOT entry (not across the interpreter subprocess).
        progress: print a progress line to stderr every few compiles.
        ds: only entries whose ``"D"`` is in ``ds`` (and those without a D).

    Under ``TRITON_INTERPRET=1`` (e.g. inside the test suite) ``@triton.jit`` functions are
    interpreter objects that cannot be compiled, so the report then runs in a subprocess
    without that variable, importing this same checkout (``select`` is not available there:
    use ``only`` / ``ds``).
    """
    from fastssl.ops._triton_utils import INTERPRET

    if INTERPRET:
        if select is not None:
            raise ValueError("select= cannot cross into the report subprocess; use only=")
        return _collect_in_subprocess(use_cache, only, cuda_dir, jobs, ds)
    found = discover_aot_kernels()
    index_in_module: dict = {}
    work = []
    for mod, entry in found:
        i = index_in_module.get(mod, 0)
        index_in_module[mod] = i + 1
        if only is not None and only not in entry["name"]:
            continue
        if select is not None and not select(entry):
            continue
        if ds is not None and entry.get("D") is not None and entry["D"] not in ds:
            continue
        for cap in entry_archs(entry):
            work.append((mod, i, cap, entry))
    # One compile per distinct configuration; cached ones are read here, not in a worker.
    rows: list = [None] * len(work)
    todo: dict = {}
    for pos, (mod, i, cap, entry) in enumerate(work):
        key = _entry_key(entry, cap)
        if use_cache and os.path.exists(os.path.join(CACHE_DIR, f"{key}.json")):
            rows[pos] = compile_triton(entry, cap, use_cache=True)
        else:
            todo.setdefault(key, []).append(pos)
    t0 = time.time()
    if todo:
        if progress:
            print(f"gpu-report: {len(work)} kernel rows, {len(work) - sum(map(len, todo.values()))}"
                  f" cached, compiling {len(todo)} configurations in {max(1, jobs)} process(es)",
                  file=sys.stderr, flush=True)
        keys = list(todo)
        job_args = [(work[todo[k][0]][0], work[todo[k][0]][1], work[todo[k][0]][2], use_cache)
                    for k in keys]
        step = max(1, len(keys) // 20)
        if jobs > 1 and len(keys) > 1:
            pool = ProcessPoolExecutor(max_workers=jobs)
            results = pool.map(_compile_job, job_args)
        else:
            pool, results = None, map(_compile_job, job_args)
        try:
            for done, (key, row) in enumerate(zip(keys, results), 1):
                for pos in todo[key]:
                    rows[pos] = dict(row, **_labels(work[pos][3]))
                if progress and (done % step == 0 or done == len(keys)):
                    print(f"gpu-report: compiled {done}/{len(keys)} "
                          f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        finally:
            if pool is not None:
                pool.shutdown()
    kernels = rows
    cuda_dir = cuda_dir or os.path.join(REPO, "csrc", "cuda")
    for path in sorted(glob.glob(os.path.join(cuda_dir, "*.cu"))):
        if only is not None and only not in os.path.basename(path):
            continue
        for cap in ARCHS:
            kernels.extend(compile_cuda(path, cap, use_cache))
    return {"kernels": kernels, "estimates": estimates()}


def _collect_in_subprocess(use_cache: bool, only: str | None, cuda_dir: str | None,
                           jobs: int = 2, ds=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "fastssl.tools.gpu_report", "--json"]
    cmd += ["--no-cache"] if not use_cache else []
    cmd += ["--only", only] if only is not None else []
    cmd += ["--cuda-dir", cuda_dir] if cuda_dir is not None else []
    cmd += ["--jobs", str(jobs)]
    cmd += ["--d", ",".join(str(d) for d in ds)] if ds is not None else []
    # stderr passes through: the progress lines of a cold run appear as they happen
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"gpu-report subprocess failed (exit {proc.returncode}); its "
                           "stderr is above")
    return json.loads(proc.stdout)


def format_table(report: dict) -> str:
    lines = [f"{'kernel':<58} {'arch':<6} {'source':<7} {'regs':>5} {'shared/limit':>15} "
             f"{'spills':>7} {'tensor cores':>12}"]
    for k in report["kernels"]:
        shared = f"{k['shared_bytes']}/{k['shared_limit']}"
        lines.append(f"{k['kernel']:<58} {k['arch']:<6} {k['source']:<7} {k['registers']:>5} "
                     f"{shared:>15} {k['spill_bytes']:>7} {k['tensor_cores']:>12}")
    lines.append("")
    lines.append("H100 (989 TFLOP/s bf16 dense, 3.9e12 exp/s, 3.35 TB/s). lower bound = max of "
                 "the three at peak, fully overlapped;")
    lines.append("expected = per pass at FlashAttention-3's measured fraction of peak (fwd 75%, "
                 "bwd 50%; HBM 80%, assumed), passes summed:")
    lines.append(f"{'op':<26} {'shape':<30} {'FLOPs':>10} {'exps':>10} {'bytes':>10} "
                 f"{'lower bound ms':>15} {'expected ms':>12}")
    for e in report["estimates"]:
        lines.append(f"{e['op']:<26} {e['shape']:<30} {e['flops']:>10.3g} {e['exps']:>10.3g} "
                     f"{e['bytes']:>10.3g} {e['h100_lower_bound_ms']:>15.3f} "
                     f"{e['h100_expected_ms']:>12.3f}")
    return "\n".join(lines)


def run(args) -> int:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton is a dependency
        print(f"gpu-report needs Triton: {exc}", file=sys.stderr)
        return 1
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    ds = None
    if getattr(args, "d", None):
        try:
            ds = tuple(int(v) for v in args.d.split(","))
        except ValueError:
            print(f"gpu-report: --d takes comma-separated integers, got {args.d!r}",
                  file=sys.stderr)
            return 2
    report = collect(use_cache=not args.no_cache, only=args.only, cuda_dir=args.cuda_dir,
                     jobs=getattr(args, "jobs", 2), ds=ds)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_table(report))
    return 0


if __name__ == "__main__":  # python -m fastssl.tools.gpu_report [--json]
    _parser = argparse.ArgumentParser(prog="fastssl gpu-report", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
