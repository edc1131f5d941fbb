#!/usr/bin/env bash
# Installs torchgraph the ways a user does and checks each one (slow: run by hand, not in CI).
#
# For each torch version (default: 2.13.0 and 2.14.1) and each of the built sdist, the built wheel and
# the source tree, in a fresh virtual environment with that torch installed first:
#   * `pip install <it>` leaves torch as it was (version and files);
#   * the first `import torchgraph` compiles the kernels (one line on stderr, no warning) or, after
#     the first install of that torch, loads them from the check's kernel cache: the cache key hashes
#     the installed sources, so a hit proves they are the same files; the second import prints nothing;
#   * `torchgraph build-kernels` (the script on PATH) finds them, and tg.optimize runs them;
#   * installing an extra afterwards ([all]) keeps them.
# Usage: bash scripts/check_installs.sh [WORKDIR] [TORCH_VERSION...]   (WORKDIR is deleted first)
#        KINDS="wheel source" bash scripts/check_installs.sh ...            (a subset of the installs)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd -P)
work=${1:-/tmp/torchgraph-install-check}
shift || true
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(2.13.0 2.14.1)
rm -rf "$work" && mkdir -p "$work"
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }

echo "== python -m build (isolated, as pip and build do it)"
python3 -m venv "$work/build-env"
"$work/build-env/bin/pip" install -q build 2>&1 | quiet
"$work/build-env/bin/python" -m build --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1
sdist=$(ls "$work"/dist/*.tar.gz) && wheel=$(ls "$work"/dist/*.whl)
echo "   $(basename "$sdist") $(basename "$wheel")"
rm -rf "$work/build-env"

check_optimize='
import torch, torch.nn as nn, torchgraph as tg
from torchgraph import _extension
assert _extension.HAS_C_OPS, _extension.LOAD_ERROR
x = tg.Input(shape=(8, 6, 6))
h = nn.Conv2d(8, 8, 3, padding=1)(x)
model = tg.Model(x, nn.MaxPool2d(2)(torch.relu(nn.Conv2d(8, 8, 3, padding=1)(h) + h))).eval()
fast = tg.optimize(model)
with torch.no_grad(), torch.autograd.profiler.profile() as prof:
    out = fast(torch.randn(2, 8, 6, 6))
ops = sorted({e.name for e in prof.function_events if e.name.startswith("torchgraph::")})
assert ops, "no torchgraph kernel ran"
print("kernels run by tg.optimize:", ", ".join(ops))
'

failures=0
for version in "${versions[@]}"; do
  for kind in ${KINDS:-sdist wheel source}; do
    case $kind in sdist) target=$sdist ;; wheel) target=$wheel ;; source) target=$repo ;; esac
    env="$work/venv-$version-$kind"
    echo "== torch $version, $kind"
    start=$SECONDS
    python3 -m venv "$env"
    "$env/bin/pip" install -q "torch==$version" numpy 2>&1 | quiet
    torch_state() { "$env/bin/python" -c "import torch; print(torch.__version__)"; \
                    (cd "$env" && find lib/python3*/site-packages/torch -name '*.py' -newer "$env/pyvenv.cfg" | wc -l); }
    touch "$env/pyvenv.cfg"
    before=$(torch_state)
    echo "   torch installed in $((SECONDS - start)) s: $(echo $before | cut -d' ' -f1)"
    "$env/bin/pip" install -q "$target" 2>&1 | quiet
    after=$(torch_state)
    if [ "$before" != "$after" ]; then echo "   FAIL: torch changed: $before -> $after"; failures=$((failures + 1)); fi
    export TORCHGRAPH_CACHE_DIR="$work/kernel-cache"
    first=$(cd /tmp && "$env/bin/python" -W error -c "import torchgraph" 2>&1) || {
      echo "   FAIL: first import: $first"; failures=$((failures + 1)); continue; }
    echo "   first import: $first"
    second=$(cd /tmp && "$env/bin/python" -W error -c "import torchgraph" 2>&1)
    if [ -n "$second" ]; then echo "   FAIL: second import printed: $second"; failures=$((failures + 1)); fi
    echo "   $(cd /tmp && PATH="$env/bin:$PATH" command -v torchgraph): $(cd /tmp && "$env/bin/torchgraph" build-kernels)"
    (cd /tmp && "$env/bin/python" -W error -c "$check_optimize" | sed 's/^/   /') || failures=$((failures + 1))
    if [ $kind = wheel ]; then
      "$env/bin/pip" install -q "$target[all]" 2>&1 | quiet
      again=$(cd /tmp && "$env/bin/python" -W error -c "import torchgraph, torchgraph._extension as e; print(e.HAS_C_OPS)" 2>&1)
      echo "   after installing the [all] extra: kernels loaded = $again"
      [ "$again" = "True" ] || failures=$((failures + 1))
    fi
    [ "$(torch_state)" = "$before" ] || { echo "   FAIL: torch changed"; failures=$((failures + 1)); }
    unset TORCHGRAPH_CACHE_DIR
    echo "   done in $((SECONDS - start)) s"
    rm -rf "$env"
  done
done
echo "== $failures failure(s)"
[ $failures -eq 0 ]
