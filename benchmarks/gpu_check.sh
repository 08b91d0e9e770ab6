#!/usr/bin/env bash
# The GPU half of the checks, in one run on a CUDA machine (nothing installed: actfx from this tree):
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # about 9.5 minutes: give the run 590 s
# - CUDA tests (tests/test_cuda.py, the Triton kernels' cuda tests);
# - issue 11's table on the GPU (compile_table.py --device cuda), one process per model;
# - issue 12's largest batch under a T4-sized cap, predicted vs found (planner.py maxbatch --device cuda).
# The compile-heavy parts run side by side; the parts that time steps or fill the GPU take turns
# through one lock file (ACTFX_TIMING_LOCK). Each part's output lands in OUT_DIR/<part>.txt.
# On an H200 (torch 2.11) the tests took 120 s, GPT-2's table 130 s, maxbatch 88 s; ResNet-50's
# table did not finish in 420 s (actfx.compile's first step alone took 175 s beside the others).
set -u
out=${1:-${OUT:-/tmp/actfx_gpu}}
mkdir -p "$out"
lock=$(mktemp)
export ACTFX_TIMING_LOCK=$lock PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; nproc; } \
  > "$out/env.txt" 2>&1

part() {  # part NAME SECONDS [flock] COMMAND...: run COMMAND with a time limit, output to NAME.txt
  local name=$1 seconds=$2; shift 2
  local wrap=()
  if [ "$1" = flock ]; then wrap=(flock "$lock"); shift; fi
  local start=$SECONDS
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) "${wrap[@]}" timeout "$seconds" "$@" > "$out/$name.txt" 2>&1
  echo "[$name: exit $?, $((SECONDS - start)) s]" >> "$out/$name.txt"
}

part pytest 300 python3 -m pytest -q -p no:cacheprovider -rP tests/test_cuda.py tests/test_triton_kernels.py &
part table_gpt2 420 python3 benchmarks/compile_table.py --device cuda --models hf_gpt2 &
part table_resnet50 560 python3 benchmarks/compile_table.py --device cuda --models resnet50 &
part maxbatch 240 flock python3 benchmarks/planner.py maxbatch --device cuda --limit 15GiB --models resnet50 &
wait
for f in "$out"/*.txt; do echo "=== $(basename "$f")"; tail -n 60 "$f"; done
