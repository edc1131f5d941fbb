#!/usr/bin/env bash
# The CUDA check, for a machine with a GPU and torch already installed (no network needed): builds the kernels
# with their CUDA part, runs the CUDA tests, then the CUDA benchmarks (kernels alone, then bench_peers), each
# stage under a time limit so that the whole check fits a short lease. Logs: $OUT (default /tmp/cuda_check),
# one file per stage and summary.log with each stage's exit status and time.
#
#   bash scripts/cuda_check.sh                  # PYTHON=... for another interpreter than python3
#   STAGES="build tests" bash scripts/cuda_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/cuda_check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHGRAPH_USE_CUDA=1 PYTHONUNBUFFERED=1
export TORCHGRAPH_CACHE_DIR=${TORCHGRAPH_CACHE_DIR:-/tmp/torchgraph-kernels}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# torch takes the folder above the first nvcc on PATH as the toolkit; a wrapper script there (/usr/local/bin/nvcc)
# misleads it, and linking then misses libcudart: name the first folder that has it
if [ -z "${CUDA_HOME:-}" ]; then
  for home in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
    if [ -e "$home/lib64/libcudart.so" ]; then export CUDA_HOME=$home; break; fi
  done
fi
# only this GPU's architecture: every architecture torch supports would multiply nvcc's time
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export TORCH_CUDA_ARCH_LIST
stages=${STAGES:-"build tests kernels peers compile community"}

{
  nvidia-smi -L
  $py -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())'
  lscpu | grep -E "Model name|^CPU\(s\)"
  $py -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-}"
} > "$out/env.log" 2>&1

stage() {  # stage NAME SECONDS COMMAND...: runs COMMAND unless NAME is left out of $STAGES
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  case " $stages " in *" $name "*) ;; *) return 0 ;; esac
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  status=$?
  echo "[$name] exit $status in $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/summary.log"
}

stage build 240 $py -m torchgraph build-kernels
cat "$TORCHGRAPH_CACHE_DIR"/*/build.log >> "$out/build.log" 2>/dev/null  # a failed build's compiler output
stage tests 150 $py -m pytest -q -p no:cacheprovider tests/test_optimize_cuda.py tests/test_ops.py -k "cuda or gpu"
stage kernels 60 $py benchmarks/bench_kernels.py --device cuda --quick --no-compile
stage peers 120 $py benchmarks/bench_peers.py --device cuda --no-compile --no-onnx --no-openvino --reps 11 --iters 20
stage compile 200 $py benchmarks/bench_peers.py --device cuda --only resnet50_b8 --only gpt --only vit_s \
  --no-onnx --no-openvino --reps 7 --iters 20
stage community 120 $py benchmarks/bench_peers.py --device cuda --community all --reps 7 --iters 10
exit 0
