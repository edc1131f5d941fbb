#!/usr/bin/env bash
# One-shot, idempotent set-up for a fresh machine of this kind (and quick when already set up):
# graphviz (apt), torch 2.13.0 (only if torch is missing), the demo/test dependencies, and torchgraph
# itself as an editable install with its C++ extension built in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! command -v dot >/dev/null 2>&1; then
  echo "[setup] installing graphviz (apt)"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq graphviz >/dev/null
fi

if ! $PY -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch 2.13.0"
  $PY -m pip install -q torch==2.13.0
fi

if ! $PY -c "import graphviz, onnx, onnxscript, onnxruntime, safetensors, tqdm, pytest, hypothesis, sklearn, torchmetrics, tensorboard, ipykernel, ipywidgets, jupyter_client" >/dev/null 2>&1; then
  echo "[setup] installing demo and test dependencies"
  $PY -m pip install -q -r requirements-dev.txt
fi

# Editable install pointing at *this* checkout (a clone elsewhere must not shadow it).
here=$(pwd -P)
installed=$(cd /tmp && $PY -c "import torchgraph, os; print(os.path.dirname(os.path.dirname(os.path.realpath(torchgraph.__file__))))" 2>/dev/null || true)
if [ "$installed" != "$here" ]; then
  echo "[setup] installing torchgraph (editable) from $here"
  $PY -m pip install -q --no-build-isolation --no-deps -e .
fi

# (Re)build the C++ extension in place when it is missing or older than its sources.
if [ -z "${TORCHGRAPH_NO_EXT:-}" ] && [ -d csrc ]; then
  lib=$(ls torchgraph/_C*.so 2>/dev/null | head -n 1 || true)
  if [ -z "$lib" ] || [ -n "$(find csrc setup.py -newer "$lib" -type f 2>/dev/null | head -n 1)" ]; then
    echo "[setup] building the C++ extension"
    $PY setup.py -q build_ext --inplace >/dev/null || echo "[setup] C++ extension build failed: torchgraph will use its pure-PyTorch reference ops"
  fi
fi
