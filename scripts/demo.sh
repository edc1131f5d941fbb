#!/usr/bin/env bash
# Set up (idempotent, see setup.sh) and run the main demo, examples/quickstart.py, in the project's
# virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${TORCHGRAPH_VENV:-.venv}/bin/python" examples/quickstart.py "$@"
