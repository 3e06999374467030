#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its dev tools into it.
# Safe to run again: pip only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch's x86_64 build with its CUDA libraries takes about 5.5 GB in the venv; say so up
# front rather than letting pip die half-way with "No space left on device".
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "${free_kb:-0}" -lt 7000000 ]; then
    echo "install.sh: only $((free_kb / 1024)) MB free here; torch and torchvision need about 6,000 MB" >&2
  fi
fi
# torch and torchvision first, pinned together: mixing builds breaks torchvision's C++ ops.
# --no-cache-dir: a downloaded CUDA build would otherwise sit twice on disk (cache + venv).
.venv/bin/python -m pip install --quiet --no-cache-dir "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[dev]"
