#!/usr/bin/env bash
# Install fedpeft and its stack. torch goes in first and pinned: on a CPU-only machine whose pip
# finds the local CPU wheel this avoids GBs of CUDA wheels; elsewhere PyPI's default (CUDA) build
# of the same version is what a GPU user wants. TORCH_SPEC overrides (e.g. an existing install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
"$PY" -m pip install -q -e ".[dev]"
