#!/usr/bin/env bash
# Install, then run the default `hospitals` simulation (extra args go to `fedpeft simulate`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec fedpeft simulate --preset hospitals "$@"
