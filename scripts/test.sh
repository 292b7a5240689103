#!/usr/bin/env bash
# Set up a fresh machine (scripts/setup.sh) and run the test suite; extra arguments go to pytest.
# Without a GPU the Triton kernels run on the CPU through the Triton interpreter.
set -euo pipefail
source "$(dirname "$0")/setup.sh"

if [ ! -e /dev/nvidiactl ]; then
  export TRITON_INTERPRET=1
fi
exec .venv/bin/python -m pytest "$@"
