"""What the row-wise ops' benchmarks (bench_layer_norm, bench_rms_norm, bench_softmax) share: an (M, N) input
normalized along its last dim, the grids, the providers and the table; each module adds its op's call and bytes.

Inputs, seeded and the same for every provider and run: x ~ N(0, 1) of shape (M, N), requiring grad; a weight
~ N(1, 0.5) and a bias ~ N(0, 0.5) of shape (N,) where the op has them, requiring grad; the output gradient
~ N(0, 1). eps is 1e-5 for every provider. Only x's gradient is checked: weight and bias gradients are sums over M
rows, which PyTorch's own CPU kernels accumulate in bfloat16/float16 with errors far beyond the check's
tolerances (tests/ops holds every backend's gradients to the 2x-PyTorch-error rule instead); they are timed.

Bytes count the least traffic of a fused kernel (each op's module gives its formula); partial sums that a kernel
spills to memory are not counted. fwd+bwd moves the bytes of both. On the CPU, caches are not flushed between
calls, so the small inputs can beat the copy ceiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import lmrt
from benchmarks import common, harness
from benchmarks.harness import Case, Point, Provider
from lmrt import reference

EPS = 1e-5
CHECKED = ("output", "grad_input")


@dataclass(frozen=True)
class Grid:
    rows: int
    cols: tuple[int, ...]
    dtypes: tuple[str, ...]


QUICK_GRID = Grid(128, (256, 1024), ("float32",))
CPU_GRID = Grid(1024, (768, 1024, 2048, 4096, 8192), ("float32", "bfloat16"))
# The target: forward at >= 90% of the copy bandwidth, backward at >= 70%. bfloat16 only, so that the GPU check
# finishes in its budget; --dtypes bfloat16 float32 for both.
CUDA_GRID = Grid(4096, (1024, 2048, 4096, 8192, 16384), ("bfloat16",))


class RowwiseBenchmark(harness.OpBenchmark):
    """A row-wise op: a subclass sets `name` (the op's name in lmrt.ops, lmrt.reference and torch.nn.functional),
    `doc`, whether the op has a weight and a bias, and implements `bytes_moved`."""

    metric = common.BANDWIDTH
    shape_headers = ("dtype", "M x N")
    x = "N"
    panel_rows = ("dtype",)
    panel_cols = ("mode",)
    quick_help = f"M={QUICK_GRID.rows}, N in {set(QUICK_GRID.cols)}, float32"
    has_weight = True
    has_bias = False

    def __init__(self) -> None:
        self.reference = getattr(reference, self.name)
        self.torch_op = getattr(F, self.name)
        self.lmrt_op = getattr(lmrt.ops, self.name)

    def arguments(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Any, ...]:
        """The op's positional arguments, torch.nn.functional's: softmax(x, -1), rms_norm(x, (N,), weight, eps) or
        layer_norm(x, (N,), weight, bias, eps)."""
        if not self.has_weight:
            return x, -1
        return (x, (x.shape[-1],), weight, *([bias] if self.has_bias else []), EPS)

    def bytes_moved(self, mode: str, rows: int, cols: int, dtype: torch.dtype) -> int:
        """Bytes a fused kernel must read and write in `mode` on a (rows, cols) input."""
        raise NotImplementedError

    def add_grid_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--rows", type=common.positive_int, metavar="M",
                            help="default: the grid's (1024 on the CPU, 4096 on CUDA)")
        parser.add_argument("--cols", nargs="+", type=common.positive_int, metavar="N", help="default: the grid's")

    def providers(self, device: torch.device, compile_skip: str | None) -> tuple[list[Provider], dict[str, str]]:
        found, skipped = harness.lmrt_providers(self.lmrt_op, device)
        found += [Provider("torch", self.torch_op, pytorch=True), Provider("naive", self.reference)]
        compiled, not_compiled = harness.compiled_provider(self.reference, compile_skip, dynamic=False)
        return found + compiled, {**skipped, **not_compiled}

    def make_case(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Case:
        """Seeded random inputs (see the module doc); the same for every provider and every run."""
        generator = torch.Generator(device=device).manual_seed(0)

        def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
            return (torch.randn(shape, generator=generator, device=device) * scale + shift).to(dtype)

        x = randn(rows, cols).requires_grad_(True)
        weight = randn(cols, scale=0.5, shift=1.0).requires_grad_(True) if self.has_weight else None
        bias = randn(cols, scale=0.5).requires_grad_(True) if self.has_bias else None
        return Case(self.arguments(x, weight, bias), randn(rows, cols), CHECKED)

    def total_bytes(self, mode: str, rows: int, cols: int, dtype: torch.dtype) -> int:
        """bytes_moved, with fwd+bwd as the sum of the two."""
        if mode == "fwd+bwd":
            return sum(self.bytes_moved(part, rows, cols, dtype) for part in ("fwd", "bwd"))
        return self.bytes_moved(mode, rows, cols, dtype)

    def points(self, args: argparse.Namespace, device: torch.device) -> list[Point]:
        grid = QUICK_GRID if args.quick else CUDA_GRID if device.type == "cuda" else CPU_GRID
        grid = dataclasses.replace(grid, rows=args.rows or grid.rows, cols=tuple(args.cols or grid.cols),
                                   dtypes=tuple(args.dtypes or grid.dtypes))
        points = []
        for dtype_name in grid.dtypes:
            dtype = common.DTYPES[dtype_name]
            for cols in grid.cols:
                make: Callable[[], Case] = functools.partial(self.make_case, grid.rows, cols, dtype, device)
                work = functools.partial(self.total_bytes, rows=grid.rows, cols=cols, dtype=dtype)
                # Each shape compiles afresh: a specialized graph, never dynamo's automatic dynamic shapes.
                points.append(Point({"dtype": dtype_name, "M": grid.rows, "N": cols}, make, work,
                                    compile_group=(dtype_name, cols)))
        return points

    def shape_cells(self, row: dict[str, Any]) -> list[str]:
        return [row["dtype"], f"{row['M']}x{row['N']}"]
