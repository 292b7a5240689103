"""lmrt's benchmark suite: `python -m benchmarks --help` (or `lmrt bench`), one module per op plus bench_model.

On a machine without an NVIDIA GPU the Triton kernels can only run through the Triton interpreter, which must be
chosen before triton is imported: as in the tests, the benchmarks turn it on there (unless TRITON_INTERPRET is
set), so that `lmrt-triton` is checked for correctness, though never timed, on the CPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.path.exists("/dev/nvidiactl") else "1")
