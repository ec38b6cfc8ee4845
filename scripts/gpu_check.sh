#!/usr/bin/env bash
# The GPU checks of a session that is lent a device machine (the `device` tool's `run`), as one
# prepared pass that fits one command (600 s) of its 15-minute budget: build with CUDA, the CUDA
# tests, then the GPU benchmarks, most needed first. Each step has a time limit, cut to what is
# left of BUDGET_S (default 540), and the pass goes on after a failure; a step with under 20 s
# left is skipped. Logs and JSON go to OUT (the run tool's $OUT comes back). From the repo root:
#
#   bash scripts/gpu_check.sh                 # OUT defaults to $OUT, else /tmp/npr_gpu
#   MODEL_DIR=path bash scripts/gpu_check.sh  # also SmolLM2-shaped steps on an HF folder
#
# No GGUF travels to the device (no package index there, 64 MiB carry limit), so SmolLM2 runs on
# random weights of its shapes (step times are real, the text is noise). Here, once:
#   .venv/bin/python scripts/smollm2_random.py export gpu_smollm2   # config + tokenizer, ~3 MB
# then run with carry ["gpu_smollm2"] (ignored by .gitignore) and the command
#   python scripts/smollm2_random.py random gpu_smollm2 /tmp/smollm2 && \
#     MODEL_DIR=/tmp/smollm2 bash scripts/gpu_check.sh
#
# Learned on the lent H100 (2026-11-25): the machine has torch (CUDA build) but no package index,
# so nothing can be pip-installed there; build with the system compilers.
set -uo pipefail
OUT=${OUT:-/tmp/npr_gpu}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
PY=${PY:-python}
status=0
step() {  # step NAME LIMIT_S CMD...: run CMD with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "[gpu_check +${SECONDS}s] $name SKIPPED (budget spent)"
    status=1
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "[gpu_check +${SECONDS}s] $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -4 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || { echo "[gpu_check] $name FAILED (rc $rc)"; status=1; }
  return "$rc"
}
throughput() {  # throughput NAME ARGS...: `npr bench throughput` on cuda, JSON to OUT/NAME.json
  local name=$1
  shift
  step "$name" 120 "$PY" -m npr.cli bench throughput --device cuda --modes plain --rows 1,64 \
    --repeat 2 --json "$OUT/$name.json" "$@"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  "$PY" -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1
  date -u +%FT%TZ
} | tee "$OUT/machine.txt"

step build 300 env CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS="$(nproc)" \
  "$PY" -m pip install -e . --no-build-isolation --no-deps || exit 1
"$PY" -c "from npr import _ext; print('npr._C built:', _ext.available(), 'with CUDA:', _ext.with_cuda())"

# every CUDA-marked test: kernels, the engine and its decode graphs vs the naive decoder,
# sampling at temperature > 0
step tests 180 "$PY" -m pytest -q -rs -m cuda tests/test_tree_attention.py tests/test_kv_ops.py \
  tests/test_engine.py tests/test_decode_graphs.py tests/test_sampling.py
# decode steps with and without CUDA graphs (npr.engine.decode_graphs); each row's
# npr_device_share (the GPU's busy time over the step, from a profiled run) says whether a step
# is device-bound (near 1) or host-bound
throughput tiny_graphs --models tiny --temperatures 0 --no-hf --decode-graphs
throughput tiny_eager --models tiny --temperatures 0,1
if [ -n "${MODEL_DIR:-}" ]; then
  throughput smollm2_eager --models smollm2 --smollm2 "$MODEL_DIR" --temperatures 0,1
  throughput smollm2_graphs --models smollm2 --smollm2 "$MODEL_DIR" --temperatures 0 --no-hf \
    --decode-graphs
fi
step bench_attention 120 "$PY" -m npr.cli bench attention --device cuda \
  --json "$OUT/attention_cuda.json"
step bench_kv 60 "$PY" -m npr.cli bench kv --device cuda --json "$OUT/kv_cuda.json"
if [ -n "${MODEL_DIR:-}" ]; then
  step bench_speedup 180 "$PY" -m npr.cli bench speedup --device cuda --model "$MODEL_DIR" \
    --json "$OUT/speedup_cuda.json"
fi
echo "[gpu_check +${SECONDS}s] done, status $status; logs and JSON in $OUT"
exit "$status"
