#!/usr/bin/env bash
# Set up a fresh machine and run the test suite: creates .venv, installs the pinned versions of
# requirements-ci.txt, installs lmrt in editable mode, and runs pytest (extra arguments go to pytest).
# Without a GPU the Triton kernels run on the CPU through the Triton interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-ci.txt
# --no-build-isolation: build against the torch just installed, never a fresh (CUDA, multi-GB) one.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .

if [ ! -e /dev/nvidiactl ]; then
  export TRITON_INTERPRET=1
fi
exec .venv/bin/python -m pytest "$@"
