#!/usr/bin/env bash
# Compiles npr._C with its CUDA sources for sm_90a against torch 2.14.1 (a CUDA build that lies on
# this machine's disk) in a separate venv, so the main environment keeps the CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-2}" PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv-cuda/bin/python ] || python3 -m venv .venv-cuda
PY=.venv-cuda/bin/python
$PY -m pip install -q torch==2.14.1 ninja numpy setuptools wheel
# The nvcc on PATH is a wrapper: take the toolkit root from its dry run.
CUDA_HOME="$(nvcc --dryrun -x cu -c /dev/null 2>&1 | sed -n 's|^#\$ TOP=\(.*\)/bin/\.\.$|\1|p' | head -1)"
export CUDA_HOME
[ -n "$CUDA_HOME" ] || { echo "cannot locate the CUDA toolkit from nvcc" >&2; exit 1; }
extra_inc=$(ls -d "$($PY -c 'import site;print(site.getsitepackages()[0])')"/nvidia/*/include 2>/dev/null | tr '\n' ':')
export CPATH="${extra_inc}${CPATH:-}"
export TORCH_CUDA_ARCH_LIST=9.0a NPR_FORCE_CUDA=1
rm -rf build/cuda-check
$PY setup.py -q build_ext --build-temp build/cuda-check/tmp --build-lib build/cuda-check/lib
so=$(ls build/cuda-check/lib/npr/_C*.so)
echo "CUDA build ok: $so ($(du -h "$so" | cut -f1))"
