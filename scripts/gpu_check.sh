#!/usr/bin/env bash
# The one command for a lent GPU machine (../shared/GPU.md): installs lmrt against that machine's torch without
# touching the network, runs the whole test suite on CUDA (bfloat16 included), the benchmarks and the GPT-2 small
# check (scripts/gpt2_small_check.py), and writes logs, results (JSON with device, versions, date and commit) and
# plots into OUT_DIR. The whole run takes longer than one 10-minute device call: split it there.
#   bash scripts/gpu_check.sh OUT_DIR        (on the device machine: bash scripts/gpu_check.sh "$OUT")
# Exits non-zero if the tests or a benchmark failed; every step runs either way so that its figures come back.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

python3 -m pip install --quiet --no-index --no-build-isolation --no-deps -e . \
  || { echo "gpu_check: editable install failed; running from the source tree"; export PYTHONPATH=$PWD; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      torch.cuda.get_device_name())" | tee "$out/versions.txt"

status=0
# The suite compiles hundreds of kernel variants: in parallel where pytest-xdist is installed (one GPU suffices).
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 16 -p no:benchmark")
python3 -m pytest -q -ra $parallel tests 2>&1 | tee "$out/tests.log" || status=1
python3 -m benchmarks.bench_norms --out "$out" 2>&1 | tee "$out/bench_norms.log" || status=1
python3 -m benchmarks.bench_attention --out "$out" 2>&1 | tee "$out/bench_attention.log" || status=1
python3 scripts/gpt2_small_check.py "$out" 2>&1 | tee "$out/gpt2_small_check.log" || status=1
exit $status
