#!/usr/bin/env bash
# The GPU checks of a session that is lent a device machine (the `device` tool's `run`), as one
# prepared pass that fits its 15-minute budget: build with CUDA, the CUDA/Triton tests, then the
# GPU benchmarks. Each step has a time limit and the pass goes on after a failure; logs and JSON
# go to OUT (the run tool's $OUT comes back). Run from the repo root on the device machine:
#
#   bash scripts/gpu_check.sh                 # OUT defaults to $OUT, else /tmp/npr_gpu
#   MODEL_DIR=path bash scripts/gpu_check.sh  # also `npr bench speedup` on an HF folder (e.g. made
#                                             # by scripts/smollm2_random.py: no GGUF travels)
#
# Learned on the lent H100 (2026-11-25): the machine has torch (CUDA build) but no package index,
# so nothing can be pip-installed there; build with the system compilers.
set -uo pipefail
OUT=${OUT:-/tmp/npr_gpu}
mkdir -p "$OUT"
PY=${PY:-python}
status=0
step() {  # step NAME LIMIT_S CMD...: run CMD with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "[gpu_check +${SECONDS}s] $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -4 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || { echo "[gpu_check] $name FAILED (rc $rc)"; status=1; }
  return "$rc"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  "$PY" -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1
  date -u +%FT%TZ
} | tee "$OUT/machine.txt"

step build 420 env CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS="$(nproc)" \
  "$PY" -m pip install -e . --no-build-isolation --no-deps || exit 1
"$PY" -c "from npr import _ext; print('npr._C built:', _ext.available(), 'with CUDA:', _ext.with_cuda())"

step tests 300 "$PY" -m pytest -q -rs tests/test_tree_attention.py tests/test_kv_ops.py \
  tests/test_engine.py tests/test_decode_graphs.py
# decode steps with and without CUDA graphs (npr.engine.decode_graphs): host ms per step
step bench_graphs 120 "$PY" -m npr.cli bench throughput --device cuda --models tiny \
  --modes plain --temperatures 0 --rows 1,64 --repeat 2 --no-hf --decode-graphs \
  --json "$OUT/throughput_graphs_cuda.json"
step bench_eager 120 "$PY" -m npr.cli bench throughput --device cuda --models tiny \
  --modes plain --temperatures 0 --rows 1,64 --repeat 2 --no-hf \
  --json "$OUT/throughput_eager_cuda.json"
step bench_attention 240 "$PY" -m npr.cli bench attention --device cuda \
  --json "$OUT/attention_cuda.json"
step bench_kv 120 "$PY" -m npr.cli bench kv --device cuda --json "$OUT/kv_cuda.json"
if [ -n "${MODEL_DIR:-}" ]; then
  step bench_speedup 300 "$PY" -m npr.cli bench speedup --device cuda --model "$MODEL_DIR" \
    --json "$OUT/speedup_cuda.json"
fi
echo "[gpu_check +${SECONDS}s] done, status $status; logs and JSON in $OUT"
exit "$status"
