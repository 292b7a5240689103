"""RMSNorm: lmrt against PyTorch, forward, backward and both.

    python -m benchmarks.bench_rms_norm [--quick] [--modes ...] [--dtypes ...] [--rows M] [--cols N ...]
                                        [--no-compile] [--out DIR | --save] [--no-plot]

F.rms_norm(x, (N,), weight, 1e-5) on an (M, N) input; the inputs, what is checked and how it is timed are in
benchmarks/rowwise.py and benchmarks/harness.py. Providers: lmrt-triton, lmrt-cuda, lmrt-cpp, `torch`
(F.rms_norm), `naive` (lmrt.reference.rms_norm) and `compile` (torch.compile of it).

Bytes counted for GB/s (s = bytes per element of the dtype; the weight has the input's dtype; the per-row rstd is
float32, 4 bytes):
- fwd: read x, write y (2*M*N*s) + read weight (N*s) + write rstd (M*4)
- bwd: read x and dy, write dx (3*M*N*s) + read rstd (M*4) + read weight, write grad_weight (2*N*s)
- fwd+bwd: the sum of the two.
"""

from __future__ import annotations

import torch

from benchmarks.rowwise import RowwiseBenchmark


class RMSNormBenchmark(RowwiseBenchmark):
    name = "rms_norm"
    doc = __doc__

    def bytes_moved(self, mode: str, rows: int, cols: int, dtype: torch.dtype) -> int:
        size = dtype.itemsize
        if mode == "fwd":
            return 2 * rows * cols * size + cols * size + rows * 4
        return 3 * rows * cols * size + rows * 4 + 2 * cols * size


BENCHMARK = RMSNormBenchmark()
main = BENCHMARK.main

if __name__ == "__main__":
    main()
