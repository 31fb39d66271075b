#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment in .venv and builds fastssl into it
# (editable install: Python edits need no rebuild).
#
# torch is pinned to the CPU wheel (torch==2.13.0) and installed first; fastssl is then built
# with --no-build-isolation so that pip never resolves torch again (an unpinned request would
# pull a multi-GB CUDA build).
#
# Re-running is cheap:
# * pip runs only for packages that are missing or at another version than pinned here;
# * the build is skipped when nothing it depends on changed since the last successful one
#   (a stamp in .venv keyed on csrc/, setup.py, pyproject.toml, torch, python and the
#   FASTSSL_* / TORCH_CUDA_ARCH_LIST switches);
# * otherwise ninja recompiles only the changed translation units (objects are kept in
#   build/temp-*), MAX_JOBS (default: every core) at a time, a progress line per file.
# Full build log: build/env-build.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_PIN=2.13.0
TRITON_PIN=3.9.0
start=$SECONDS

if [ ! -x .venv/bin/python ]; then
  echo "[env] creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
PIP=("$PY" -m pip install --disable-pip-version-check)

# 1. Dependencies: ask pip only for what is missing or at another version (a no-op pip run
#    costs seconds per call on a loaded machine; importlib.metadata costs milliseconds).
need_torch=$("$PY" - "$TORCH_PIN" <<'EOF'
import importlib.metadata as md, sys
try:
    ok = md.version("torch").split("+")[0] == sys.argv[1]
except md.PackageNotFoundError:
    ok = False
print("" if ok else "torch==" + sys.argv[1])
EOF
)
if [ -n "$need_torch" ]; then
  echo "[env] installing $need_torch (the CPU wheel)" >&2
  "${PIP[@]}" --quiet "$need_torch"
fi
need_other=$("$PY" - "triton==$TRITON_PIN" setuptools wheel numpy pytest pytest-benchmark matplotlib <<'EOF'
import importlib.metadata as md, sys
missing = []
for spec in sys.argv[1:]:
    name, _, pin = spec.partition("==")
    try:
        have = md.version(name)
        if pin and have != pin:
            missing.append(spec)
    except md.PackageNotFoundError:
        missing.append(spec)
print(" ".join(missing))
EOF
)
if [ -n "$need_other" ]; then
  echo "[env] installing $need_other" >&2
  # shellcheck disable=SC2086  # a list of requirement specs
  "${PIP[@]}" --quiet $need_other
fi

# 2. fastssl itself.
stamp_file=.venv/.fastssl-build-stamp
stamp=$( {
  find csrc setup.py pyproject.toml -type f -print0 | sort -z | xargs -0 sha256sum
  "$PY" -c 'import importlib.metadata as md, sys; print(md.version("torch"), sys.version)'
  echo "NO_EXT=${FASTSSL_NO_EXT:-} NO_CUDA=${FASTSSL_NO_CUDA:-} ARCH=${TORCH_CUDA_ARCH_LIST:-}"
} | sha256sum | cut -d' ' -f1)
built_ok() {
  # The stamp alone is not enough: the editable install or the compiled module may have been
  # removed since (pip uninstall, git clean).
  "$PY" -c 'import importlib.metadata as md; md.version("fastssl")' 2>/dev/null || return 1
  [ "${FASTSSL_NO_EXT:-0}" = "1" ] && return 0
  compgen -G "fastssl/_C*.so" >/dev/null
}
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && built_ok; then
  echo "[env] fastssl is up to date (no change in csrc/, setup.py, torch or build switches" \
       "since the last build; $((SECONDS - start)) s)" >&2
  exit 0
fi
rm -f "$stamp_file"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
mkdir -p build
log=build/env-build.log
build_start=$SECONDS
echo "[env] building fastssl and its C++ extension with ninja, $MAX_JOBS jobs (unchanged" \
     "objects in build/ are reused; a cold build takes minutes; full log: $log)" >&2
# pip -v streams the build; the terminal gets a line per compiled file and the link. (A shell
# loop, not awk: mawk reads a pipe in large blocks, which would hold the lines back.)
progress() {
  local line step src
  local step_re='^ *(\[[0-9]+/[0-9]+\]) ' src_re='/(csrc/[^ ]+\.(cpp|cu)) -o '
  while IFS= read -r line; do
    if [[ $line =~ $step_re ]]; then
      step=${BASH_REMATCH[1]}
      src="..."
      if [[ $line =~ $src_re ]]; then src=${BASH_REMATCH[1]}; fi
      echo "[env]   $step $src" >&2
    elif [[ $line == *" -shared "*"_C"* ]]; then
      echo "[env]   linking fastssl/_C" >&2
    fi
  done
}
set +e
"${PIP[@]}" -v --no-build-isolation -e . </dev/null 2>&1 | tee "$log" | progress
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "[env] the build failed (pip exit status $status); the end of $log:" >&2
  tail -n 40 "$log" >&2
  exit "$status"
fi
echo "$stamp" > "$stamp_file"
echo "[env] fastssl built and installed: build $((SECONDS - build_start)) s, env.sh" \
     "$((SECONDS - start)) s in all" >&2
