#!/usr/bin/env bash
# The set-up step that the test and train commands share, for a fresh machine: creates .venv, installs the pinned
# versions of requirements-ci.txt and lmrt in editable mode. Sourced by scripts/test.sh and scripts/train.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-ci.txt
# --no-build-isolation: build against the torch just installed, never a fresh (CUDA, multi-GB) one. This compiles
# the extension lmrt._C (a minute or two on 2 cores; with nvcc and a CUDA torch, its CUDA kernels too).
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
