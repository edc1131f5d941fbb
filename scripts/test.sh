#!/usr/bin/env bash
# Set up (idempotent, see setup.sh) and run the test suite in the project's virtual environment.
# Arguments go to pytest (e.g. `bash scripts/test.sh tests/test_ops.py -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${TORCHGRAPH_VENV:-.venv}/bin/python" -m pytest -q "$@"
