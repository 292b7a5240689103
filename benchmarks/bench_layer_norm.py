"""LayerNorm: lmrt against PyTorch, forward, backward and both.

    python -m benchmarks.bench_layer_norm [--quick] [--modes ...] [--dtypes ...] [--rows M] [--cols N ...]
                                          [--no-compile] [--out DIR | --save] [--no-plot]

F.layer_norm(x, (N,), weight, bias, 1e-5) on an (M, N) input; the inputs, what is checked and how it is timed are
in benchmarks/rowwise.py and benchmarks/harness.py. Providers: lmrt-triton, lmrt-cuda, lmrt-cpp, `torch`
(F.layer_norm), `naive` (lmrt.reference.layer_norm) and `compile` (torch.compile of it).

Bytes counted for GB/s (s = bytes per element of the dtype; weight and bias have the input's dtype; the per-row
mean and rstd are float32, 4 bytes each):
- fwd: read x, write y (2*M*N*s) + read weight and bias (2*N*s) + write mean and rstd (2*M*4)
- bwd: read x and dy, write dx (3*M*N*s) + read mean and rstd (2*M*4) + read weight, write grad_weight and
  grad_bias (3*N*s)
- fwd+bwd: the sum of the two.
"""

from __future__ import annotations

import torch

from benchmarks.rowwise import RowwiseBenchmark


class LayerNormBenchmark(RowwiseBenchmark):
    name = "layer_norm"
    doc = __doc__
    has_bias = True

    def bytes_moved(self, mode: str, rows: int, cols: int, dtype: torch.dtype) -> int:
        size = dtype.itemsize
        if mode == "fwd":
            return 2 * rows * cols * size + 2 * cols * size + 2 * rows * 4
        return 3 * rows * cols * size + 2 * rows * 4 + 3 * cols * size


BENCHMARK = LayerNormBenchmark()
main = BENCHMARK.main

if __name__ == "__main__":
    main()
