#!/usr/bin/env bash
# The set-up behind the README's commands: idempotent, and quick when everything is in place.
#
#   * graphviz (the `dot` program) through apt, only when `dot` is missing;
#   * a project virtual environment, .venv/ (TORCHGRAPH_VENV=DIR for another), made with python3
#     (PYTHON=... for another interpreter); the Python you run this with is never changed;
#   * in it: torch $TORCH_VERSION (2.13.0 by default; the local CPU wheel on this project's machines),
#     the demo and test dependencies (requirements-dev.txt) and torchgraph itself, editable, with
#     torch pinned so that no dependency can swap it;
#   * torchgraph's C++ kernels, compiled for this machine and that torch (`torchgraph build-kernels`;
#     a minute or more the first time, then cached in ~/.cache/torchgraph).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TORCHGRAPH_VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if ! command -v dot >/dev/null 2>&1; then
  echo "[setup] installing graphviz (apt)"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq graphviz >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating the virtual environment $VENV"
  if ! "${PYTHON:-python3}" -m venv "$VENV"; then
    rm -rf "$VENV"
    echo "[setup] error: '${PYTHON:-python3} -m venv' failed. On Debian/Ubuntu: apt-get install python3-venv." >&2
    exit 1
  fi
fi
PY="$VENV/bin/python"

pip_install() {
  # This machine's pip configuration lists local indexes that lack most packages; pip says so for
  # each one. Those lines are noise, every other line passes through.
  "$PY" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# What pip installs is fixed by the torch version, requirements-dev.txt, pyproject.toml and setup.py:
# when none of them changed since the last complete run, there is nothing to install.
stamp="$VENV/.torchgraph-setup"
want="torch==$TORCH_VERSION $(pwd -P) $(cat requirements-dev.txt pyproject.toml setup.py | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing torch $TORCH_VERSION, the demo and test dependencies and torchgraph (editable) into $VENV"
  rm -f "$stamp"
  echo "torch==$TORCH_VERSION" > "$VENV/torch-pin.txt"
  pip_install -c "$VENV/torch-pin.txt" "torch==$TORCH_VERSION"
  pip_install -c "$VENV/torch-pin.txt" -r requirements-dev.txt -e .
  echo "$want" > "$stamp"
fi

# Quick when the kernels are cached; fails (with the compiler's log) when they cannot be built.
"$VENV/bin/torchgraph" build-kernels >/dev/null
