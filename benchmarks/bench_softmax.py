"""Softmax along the last dim: lmrt against PyTorch, forward, backward and both.

    python -m benchmarks.bench_softmax [--quick] [--modes ...] [--dtypes ...] [--rows M] [--cols N ...]
                                       [--no-compile] [--out DIR | --save] [--no-plot]

F.softmax(x, -1) on an (M, N) input; the inputs, what is checked and how it is timed are in benchmarks/rowwise.py
and benchmarks/harness.py. Providers: lmrt-triton, lmrt-cuda, lmrt-cpp, `torch` (F.softmax), `naive`
(lmrt.reference.softmax) and `compile` (torch.compile of it).

Bytes counted for GB/s (s = bytes per element of the dtype):
- fwd: read x, write y (2*M*N*s)
- bwd: read y and dy, write dx (3*M*N*s)
- fwd+bwd: the sum of the two.
"""

from __future__ import annotations

import torch

from benchmarks.rowwise import RowwiseBenchmark


class SoftmaxBenchmark(RowwiseBenchmark):
    name = "softmax"
    doc = __doc__
    has_weight = False

    def bytes_moved(self, mode: str, rows: int, cols: int, dtype: torch.dtype) -> int:
        return (2 if mode == "fwd" else 3) * rows * cols * dtype.itemsize


BENCHMARK = SoftmaxBenchmark()
main = BENCHMARK.main

if __name__ == "__main__":
    main()
