#!/usr/bin/env bash
# Install, then lint (ruff), type-check (mypy) and run the whole test suite (CPU; the slow
# end-to-end Flower runs included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY="${PYTHON:-python3}"
"$PY" -m ruff check fedpeft clients server simulations tests
"$PY" -m mypy
export FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1
# Every Ray worker and end-to-end subprocess imports torch, transformers and peft afresh: share their
# compiled bytecode (a cache outside the tree; 13.5 s -> 5.8 s per import here), even where the
# environment turns writing it off.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-${TMPDIR:-/tmp}/fedpeft-pycache}"
# Two workers, one test file each at a time: most of the end-to-end tests wait (round timeouts,
# process start-up), so the second core runs the unit tests meanwhile (~9 -> ~7 min here).
exec "$PY" -m pytest -q -n 2 --dist loadfile "$@"
