#!/usr/bin/env bash
# Install, then run the whole test suite (CPU; the slow end-to-end Flower runs included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1
exec "${PYTHON:-python3}" -m pytest -q "$@"
