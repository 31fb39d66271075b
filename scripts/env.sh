#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment in .venv and builds fastssl into it.
#
# torch is installed first and pinned to the CPU wheel (torch==2.13.0); fastssl is then built
# with --no-build-isolation so that pip never resolves torch again (an unpinned request would
# pull a multi-GB CUDA build). Idempotent: re-running only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[env] creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
echo "[env] installing torch==2.13.0 (CPU wheel) and the other dependencies" >&2
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" setuptools wheel numpy pytest pytest-benchmark matplotlib triton==3.9.0
echo "[env] building fastssl and its C++ extension (a few minutes on 2 cores: the C++ build is serial)" >&2
"${PIP[@]}" --no-build-isolation -e .
