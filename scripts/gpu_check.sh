#!/usr/bin/env bash
# The whole check on a lent GPU machine (../shared/GPU.md) in one command that ends well inside one 10-minute device
# call (9 minutes on an H100 at the most):
#   1. install lmrt against the machine's torch, without the network (this builds lmrt._C with its CUDA kernels);
#   2. versions and `python -m lmrt info`;
#   3. the test suite on CUDA, in parallel where pytest-xdist is installed, and compute-sanitizer's memcheck;
#   4. the benchmark suite (python -m benchmarks): every op and bench_model (GPT-2 small included), under a budget;
#   5. docs/BENCHMARKS.md of this run (python -m benchmarks.report);
#   6. OUT_DIR/gpu_check.tar.gz (results/<device>/ ready to commit under benchmarks/results/, BENCHMARKS.md, logs),
#      OUT_DIR/summary.log and OUT_DIR/benchmarks.log: three files, as the device machine lets eight come back.
#
#   bash scripts/gpu_check.sh OUT_DIR [--no-install] [--no-tests] [--quick] [NAME ...]
#        (on the device machine: bash scripts/gpu_check.sh "$OUT")
#
# NAME: the benchmarks to run (attention, layer_norm, rms_norm, softmax, model; default: all); --quick: their smoke
# grids. --no-install: lmrt as it is installed (or this source tree). --no-tests: skip step 3. On a machine without a
# GPU it says so, skips the CUDA tests (CI runs them on the CPU) and runs the benchmarks on the CPU, which is how
# tests/benchmarks/test_gpu_check.py tests this script (--no-install --no-tests --quick softmax).
#
# Time budget, in seconds from the start (limits enforced with `timeout`; each step starts whatever came before):
#   install     <= 150  setup.py compiles the extension's CPU and CUDA sources with ninja (1-2 minutes with nvcc);
#   tests       pytest -n 16 (the kernels compile across the 16 workers; LMRT_AUTOTUNE=0 there): until 240 the
#               tests only a GPU can check (`-k "cuda or extension_eager"`; those of tests/ops took 105 s on an
#               H100), then the rest until 300 (a quarter of the whole suite ran in 225 s there); a run cut short is
#               reported as such in summary.log; then scripts/cuda_memcheck.py under compute-sanitizer (~10 s);
#   benchmarks  what is left until BENCH_END (500): python -m benchmarks --budget gives each benchmark its share
#               (benchmarks/suite.py: attention 3, each norm 1, model 3) and each starts no new point of its grid
#               once its share is spent (its meta's "not_run" says what was left out); a hard limit 30 s after.
#               The default GPU grids are sized for about 4 minutes on an H100: attention 12 points (d 64 and 128,
#               L 1024, 4096, 16384, causal or not, bfloat16) x 3 modes x 8 providers of ~65 ms of do_bench each
#               plus 4 compilations and the Triton autotuning; each row-wise op 5 sizes x 3 modes x 5 providers plus
#               5 compilations; bench_model gpt-tiny and GPT-2 small (batch 8 x 1024), 5 providers each, 3 checked
#               steps, ~500 ms of timed steps, torch.compile of each and greedy generation of 64 tokens.
#   report, bundle: a few seconds. GPU_CHECK_BENCH_END moves BENCH_END (and with it the hard limit).
# Exits non-zero if the install, the tests or a benchmark failed (a WRONG provider included); every step runs either
# way, so that its figures come back.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [--no-install] [--no-tests] [--quick] [NAME ...]}
shift
install=1 tests=1 bench_args=()
for arg in "$@"; do
  case $arg in
    --no-install) install=0 ;;
    --no-tests) tests=0 ;;
    *) bench_args+=("$arg") ;;
  esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$SECONDS
BENCH_END=${GPU_CHECK_BENCH_END:-500}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/logs" "$work/results"
summary=$work/summary.log
status=0

say() { echo "gpu_check: $*" | tee -a "$summary"; }
# Seconds from now until second $1 of the run, at least 10 (timeout 0 would mean no limit at all).
until_second() { local left=$(($1 - (SECONDS - start))); echo $((left < 10 ? 10 : left)); }

if [ "$install" = 1 ]; then
  if timeout 150 "$python" -m pip install --no-index --no-build-isolation --no-deps -e . >"$work/logs/install.log" 2>&1
  then say "installed lmrt (editable) in $((SECONDS - start)) s"
  else say "the editable install failed (logs/install.log); running from the source tree"; status=1
       export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
"$python" -m lmrt info 2>&1 | tee -a "$summary"
# The results folder of this device (benchmarks/results/<device>/: cpu-xeon-avx512, h100, ...) and whether it has a GPU.
read -r device gpu _ < <("$python" -c "from benchmarks import common; import torch; d = common.default_device()
folder = common.results_folder(d)
print(folder, int(d.type == 'cuda'), f'(results folder {folder}; torch CUDA {torch.version.cuda})')" | tee -a "$summary")

if [ "${gpu:-0}" != 1 ]; then
  say "no CUDA GPU here: the CUDA tests are skipped (CI runs the suite on the CPU); the benchmarks run on the CPU"
elif [ "$tests" = 1 ]; then
  export TRITON_INTERPRET=0
  parallel=$("$python" -c "import xdist" 2>/dev/null && echo "-n 16 -p no:benchmark")
  # run_tests NAME UNTIL SELECTION: the tests that `pytest -k SELECTION` picks, until second UNTIL of the run.
  run_tests() {
    local limit rc
    limit=$(until_second "$2")
    # SIGINT, so that pytest still reports the failures it saw before the limit. tests/csrc (nvcc over the CUDA
    # sources and the glue, without a GPU) is CI's: the install step here has just compiled them all for real.
    # shellcheck disable=SC2086  # $parallel is two options or none
    timeout -s INT -k 20 "$limit" "$python" -m pytest -q -ra $parallel --ignore=tests/csrc -k "$3" tests \
      >"$work/logs/$1.log" 2>&1
    rc=$?
    case $rc in
      0) ;;
      124) say "$1: cut short by the ${limit} s limit (logs/$1.log)"; status=1 ;;
      *) status=1 ;;
    esac
    say "$1: exit $rc in $((SECONDS - start)) s; their summary:"
    grep -E "^(FAILED|ERROR)|passed|failed" "$work/logs/$1.log" | tail -n 40 | tee -a "$summary"
  }
  # First what only a GPU can check: the cuda backend's tests, the extension's eager calls and the tests marked
  # cuda (long sequences, compiled Triton kernels); then the rest, which CI also runs on the CPU, as time allows.
  gpu_tests="cuda or extension_eager"
  run_tests tests_gpu 240 "$gpu_tests"
  run_tests tests_rest 300 "not ($gpu_tests)"
  # Every CUDA kernel's code paths under compute-sanitizer's memcheck (about 10 s on an H100).
  if command -v compute-sanitizer >/dev/null; then
    timeout 60 compute-sanitizer --tool memcheck --error-exitcode 1 "$python" scripts/cuda_memcheck.py \
      >"$work/logs/memcheck.log" 2>&1
    rc=$?
    [ "$rc" = 0 ] || status=1
    say "memcheck: exit $rc; $(grep -E "ERROR SUMMARY" "$work/logs/memcheck.log" | tail -n 1)"
  else
    say "memcheck skipped: compute-sanitizer is not on the PATH"
  fi
else
  say "tests skipped (--no-tests)"
fi

results=$work/results/${device:-unknown}
budget=$(until_second "$BENCH_END")
say "benchmarks ${bench_args[*]:-(all)} into results/$device with a budget of $budget s"
hard_limit=$(until_second $((BENCH_END + 30)))
timeout "$hard_limit" "$python" -m benchmarks --out "$results" --budget "$budget" "${bench_args[@]}" \
  >"$work/logs/benchmarks.log" 2>&1 || status=1
grep -E "WRONG|not run|benchmark seconds|Traceback|Error" "$work/logs/benchmarks.log" | grep -v "^[│┃]" \
  | tail -n 40 | tee -a "$summary"
"$python" -m benchmarks.report --results "$work/results" --out "$work/BENCHMARKS.md" >>"$summary" 2>&1 || status=1

say "done in $((SECONDS - start)) s, exit status $status"
cp "$summary" "$out/summary.log"
cp "$work/logs/benchmarks.log" "$out/benchmarks.log"
tar -czf "$out/gpu_check.tar.gz" -C "$work" .
exit $status
