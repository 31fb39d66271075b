#!/usr/bin/env bash
# CI check: fastssl installs against a CUDA build of torch on a machine with no GPU, the way a
# GPU user installs it (README, "Install on a GPU machine"), and its CUDA C++ kernels end up
# registered; also that FASTSSL_NO_EXT=1 gives a package that imports and runs its Triton path
# with no C++ at all.
#
# Needs nvcc (CUDA_HOME or PATH) and torch==$TORCH_CUDA_PIN (the CUDA wheel, ~5.5 GB with its
# nvidia-* wheels; here pip takes them from local disk). The venv is cached between runs at
# $FASTSSL_CUDA_VENV (default: ~/.cache/fastssl/venv-torch<pin>-cuda, the pin in the name):
# only the first run pays for pip. Objects are kept in build/temp-*-cuda, so an unchanged
# tree rebuilds in seconds. Every step fails loudly: there is no "skipped" exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_CUDA_PIN=2.14.1
PYTHON="${PYTHON:-python3}"
VENV="${FASTSSL_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fastssl/venv-torch${TORCH_CUDA_PIN}-cuda}"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)
start=$SECONDS
say() { echo "[cuda-check] $*" >&2; }

# 1. The venv: torch (CUDA build) and the build/test dependencies.
if ! "$PY" - "$TORCH_CUDA_PIN" 2>/dev/null <<'EOF'
import importlib.metadata as md, sys
sys.exit(0 if md.version("torch").split("+")[0] == sys.argv[1] else 1)
EOF
then
  say "creating $VENV with torch==$TORCH_CUDA_PIN (CUDA build; a few minutes, once)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
  "${PIP[@]}" --quiet "torch==$TORCH_CUDA_PIN" setuptools wheel numpy pytest
fi
"$PY" -c 'import torch, sys
sys.exit(None if torch.version.cuda else
         f"torch {torch.__version__} in this venv is a CPU build: the check needs a CUDA build")'
say "venv ready: $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')" \
    "($((SECONDS - start)) s)"

# 2. The install a GPU user runs: no GPU visible, TORCH_CUDA_ARCH_LIST unset (the default
#    architectures), not editable. Unchanged objects come from build/temp-*-cuda.
if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null; then
  say "FAILED: no CUDA toolkit (no nvcc on PATH, CUDA_HOME unset): the CUDA kernels cannot build"
  exit 1
fi
mkdir -p build
log=build/cuda-check-build.log
build_start=$SECONDS
say "pip install --no-build-isolation . (CUDA build; log: $log)"
if ! env -u TORCH_CUDA_ARCH_LIST -u FASTSSL_NO_EXT -u FASTSSL_NO_CUDA CUDA_VISIBLE_DEVICES= \
     MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
     "${PIP[@]}" -v --no-build-isolation --no-deps . >"$log" 2>&1 </dev/null; then
  say "FAILED: the build; the end of $log:"
  tail -n 40 "$log" >&2
  exit 1
fi
say "built and installed in $((SECONDS - build_start)) s"

# 3. What was installed: run from outside the tree so `import fastssl` is the installed copy.
cd "$(mktemp -d)"
"$PY" - "$ROOT" <<'EOF'
import os, subprocess, sys

import torch

import fastssl
from fastssl import _ext

root = sys.argv[1]
problems = []
if os.path.realpath(fastssl.__file__).startswith(os.path.realpath(root) + os.sep):
    problems.append(f"imported the source tree ({fastssl.__file__}), not the installed package")
try:
    import fastssl._C  # noqa: F401
except ImportError as exc:
    problems.append(f"fastssl._C does not load: {exc}")
for op in ("ema_update_", "moco_enqueue_"):
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastssl::{op}", "CUDA")
    except RuntimeError as exc:  # the op itself is not defined
        has, why = False, str(exc).splitlines()[0]
    else:
        why = "no CUDA kernel registered"
    if not has:
        problems.append(f"fastssl::{op}: {why}")
        continue
    # The CUDA kernel must be the compiled one (csrc/cuda), not some Python registration.
    dump = torch._C._dispatch_dump(f"fastssl::{op}")
    cuda_lines = [line for line in dump.splitlines() if line.startswith("CUDA:")]
    if not any("csrc/cuda/" in line for line in cuda_lines):
        problems.append(f"fastssl::{op}: the CUDA kernel does not come from csrc/cuda: {cuda_lines}")
build = _ext.build_info() or ""
if "cuda" not in build:
    problems.append(f"build_info() does not mention cuda: {build!r}")
info = subprocess.run([sys.executable, "-m", "fastssl", "info"], capture_output=True, text=True)
print(info.stdout, end="", file=sys.stderr)
if info.returncode != 0 or "CUDA C++ kernels: ema_update_, moco_enqueue_" not in info.stdout:
    problems.append(f"`fastssl info` does not report the CUDA C++ kernels (rc {info.returncode}, "
                    f"stderr: {info.stderr.strip()[-500:]})")
if problems:
    sys.exit("[cuda-check] FAILED:\n  " + "\n  ".join(problems))
print(f"[cuda-check] ok: fastssl._C ({fastssl._C.__file__}) has CUDA kernels for ema_update_ "
      f"and moco_enqueue_; build: {build}", file=sys.stderr)
EOF

# 4. FASTSSL_NO_EXT=1: no C++ compiled, the package imports, the Triton path runs (under the
#    interpreter on CPU tensors, as the tests do) and agrees with the reference.
target=$(mktemp -d)
FASTSSL_NO_EXT=1 "${PIP[@]}" --quiet --no-build-isolation --no-deps --target "$target" "$ROOT" \
  </dev/null >/dev/null
if compgen -G "$target/fastssl/_C*" >/dev/null; then
  say "FAILED: FASTSSL_NO_EXT=1 still built fastssl._C"; exit 1
fi
PYTHONPATH="$target" TRITON_INTERPRET=1 "$PY" - <<'EOF'
import sys

import torch

import fastssl
from fastssl import _dispatch, _ext, reference

if _ext.available():
    sys.exit("[cuda-check] FAILED: the FASTSSL_NO_EXT=1 install still loads fastssl._C")
torch.manual_seed(0)
z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
with _dispatch.triton_on_cpu():  # the ops' CUDA (Triton) kernels, run by the interpreter
    got = fastssl.nt_xent(z1, z2, temperature=0.5, backend="triton")
want = reference.nt_xent(z1.double(), z2.double(), temperature=0.5)
if not torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5):
    sys.exit(f"[cuda-check] FAILED: Triton nt_xent without _C gave {got.item()} vs {want.item()}")
print(f"[cuda-check] ok: FASTSSL_NO_EXT=1 builds no C++; the package imports and Triton nt_xent "
      f"(interpreter) equals the fp64 reference ({got.item():.6f})", file=sys.stderr)
EOF
rm -rf "$target"
say "passed in $((SECONDS - start)) s"
