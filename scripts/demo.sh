#!/usr/bin/env bash
# Set up (idempotent) and run the main demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ${PYTHON:-python3} examples/quickstart.py "$@"
