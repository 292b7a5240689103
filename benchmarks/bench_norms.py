"""LayerNorm, RMSNorm and softmax: lmrt against PyTorch, forward and backward, side by side in one run.

    python -m benchmarks.bench_norms [--quick] [--ops ...] [--modes fwd bwd] [--dtypes ...] [--out DIR]

What is timed, per (op, mode, dtype, M x N input, provider):
- fwd: one call of the op on an (M, N) input whose leaves (x, weight, bias) require grad, i.e. a training forward.
- bwd: `y.backward(dy, retain_graph=True)` alone. The forward runs once beforehand, outside the timed region, and
  the leaves' gradients are reset to None before every timed call, so no gradient-accumulation kernel is timed.

Providers: `lmrt-triton` (lmrt ops under lmrt.backend("triton"); CUDA only, the Triton interpreter on the CPU says
nothing about speed), `lmrt` (lmrt ops on the default backend), `torch` (F.layer_norm, F.rms_norm, F.softmax),
`naive` (lmrt.reference, plain PyTorch ops) and `compile` (torch.compile of lmrt.reference; CUDA only, compiling
takes too long on a small CPU). Before it is timed, each provider's output (fwd), or output and gradient with
respect to x (bwd), are compared with lmrt.reference run in float64; a provider that disagrees, or raises, is
reported WRONG with the reason and is not timed. Weight and bias gradients are timed but not checked here: they
are sums over M rows, which PyTorch's own CPU kernels accumulate in bfloat16/float16 with errors far beyond these
tolerances; tests/ops holds every backend's gradients to the 2x-PyTorch-error rule instead.

Timing: on CUDA triton.testing.do_bench, which flushes L2 before every call (median, 20th and 80th percentiles);
on the CPU a perf_counter loop after warm-up calls, caches not flushed (small inputs can beat the copy ceiling).

Bytes counted for GB/s (s = bytes per element of the dtype; weight and bias have the input's dtype; the per-row
statistics are float32, 4 bytes each). This is the least traffic of a fused kernel; partial sums a kernel spills
to memory are not counted.
- layer_norm fwd: read x, write y (2*M*N*s) + read weight and bias (2*N*s) + write mean and rstd (2*M*4)
- layer_norm bwd: read x and dy, write dx (3*M*N*s) + read mean and rstd (2*M*4)
  + read weight, write grad_weight and grad_bias (3*N*s)
- rms_norm fwd: read x, write y (2*M*N*s) + read weight (N*s) + write rstd (M*4)
- rms_norm bwd: read x and dy, write dx (3*M*N*s) + read rstd (M*4) + read weight, write grad_weight (2*N*s)
- softmax fwd: read x, write y (2*M*N*s); softmax bwd: read y and dy, write dx (3*M*N*s)
The ceiling these are compared with is a device-to-device copy measured at the start of the run, GB/s =
2 * bytes / time. Peak memory (CUDA only) is what one call allocates at its peak beyond what was allocated before
it (its outputs, saved tensors and workspace), from torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import lmrt
from benchmarks import common
from lmrt import reference

OPS = ("layer_norm", "rms_norm", "softmax")
MODES = ("fwd", "bwd")
# Passed explicitly so that every provider normalizes with the same eps.
EPS = 1e-5
CHECKED = ("output", "grad_input")
PROVIDER_COLORS = {"lmrt-triton": "tab:red", "lmrt": "tab:orange", "torch": "tab:blue", "naive": "tab:gray",
                   "compile": "tab:green"}


@dataclass(frozen=True)
class Grid:
    rows: int
    cols: tuple[int, ...]
    dtypes: tuple[str, ...]


QUICK_GRID = Grid(256, (512, 1024), ("float32",))
CPU_GRID = Grid(1024, (256, 1024, 4096), ("float32",))
# The target grid: forward at >= 90% of the copy bandwidth, backward at >= 70%.
CUDA_GRID = Grid(4096, (1024, 2048, 4096, 8192, 16384), ("bfloat16", "float32"))

@dataclass(frozen=True)
class Provider:
    """Functions with the torch.nn.functional signatures of OPS, run under lmrt backend `backend` when given."""

    name: str
    functions: Any
    backend: str | None = None


@dataclass
class Case:
    """The inputs of one op: x of shape (M, N), weight and bias where the op has them (leaves requiring grad), dy."""

    op: str
    x: Tensor
    weight: Tensor | None
    bias: Tensor | None
    dy: Tensor

    @property
    def leaves(self) -> list[Tensor]:
        return [t for t in (self.x, self.weight, self.bias) if t is not None]

    def as_float64(self) -> Case:
        def widen(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().double().requires_grad_(True)

        return Case(self.op, widen(self.x), widen(self.weight), widen(self.bias), self.dy.double())


def make_case(op: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Case:
    """Seeded random inputs for `op`; the same for every provider and every run."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        t = torch.randn(shape, generator=generator, device=device) * scale + shift
        return t.to(dtype)

    x = randn(rows, cols).requires_grad_(True)
    weight = randn(cols, scale=0.5, shift=1.0).requires_grad_(True) if op != "softmax" else None
    bias = randn(cols, scale=0.5).requires_grad_(True) if op == "layer_norm" else None
    return Case(op, x, weight, bias, randn(rows, cols))


def providers(device: torch.device) -> list[Provider]:
    """The providers measured on `device`, in the order they are reported."""
    on_cuda = device.type == "cuda"
    found = []
    if on_cuda and "triton" in lmrt.available_backends(device):
        found.append(Provider("lmrt-triton", lmrt.ops, backend="triton"))
    found += [Provider("lmrt", lmrt.ops), Provider("torch", F), Provider("naive", reference)]
    if on_cuda:
        compiled = {op: common.compile_for_timing(getattr(reference, op), dynamic=False) for op in OPS}
        found.append(Provider("compile", SimpleNamespace(**compiled)))
    return found


@contextlib.contextmanager
def _backend_of(provider: Provider) -> Iterator[None]:
    # The lmrt choice is process-wide, so it also holds in autograd's backward threads.
    with lmrt.backend(provider.backend) if provider.backend else contextlib.nullcontext():
        yield


def call_op(op: str, functions: Any, case: Case) -> Tensor:
    shape = (case.x.shape[-1],)
    if op == "layer_norm":
        return functions.layer_norm(case.x, shape, case.weight, case.bias, EPS)
    if op == "rms_norm":
        return functions.rms_norm(case.x, shape, case.weight, EPS)
    return functions.softmax(case.x, -1)


def run_once(functions: Any, case: Case, mode: str) -> list[Tensor | None]:
    """[output] (fwd), or [output, gradient with respect to x] (bwd), of `functions` on `case`."""
    common.reset_grads(case.leaves)
    y = call_op(case.op, functions, case)
    if mode == "fwd":
        return [y.detach()]
    y.backward(case.dy)
    grad_input = case.x.grad
    common.reset_grads(case.leaves)
    return [y.detach(), grad_input]


def exact_results(case: Case) -> list[Tensor]:
    """lmrt.reference in float64 on `case`'s inputs: the output and the gradient with respect to x."""
    return run_once(reference, case.as_float64(), "bwd")


def check_provider(provider: Provider, case: Case, mode: str, exact: Sequence[Tensor]) -> str | None:
    """None when `provider` computes `case` in `mode` within tolerance of `exact`, else why it is WRONG."""
    try:
        with _backend_of(provider):
            results = run_once(provider.functions, case, mode)
    except Exception as error:  # a provider that fails is a result to report, not the end of the run
        return common.raised(error)
    return common.compare(CHECKED, results, exact[: len(results)], case.x.dtype)


def bytes_moved(op: str, mode: str, rows: int, cols: int, dtype: torch.dtype) -> int:
    """Bytes a fused kernel must read and write for `op` in `mode` on a (rows, cols) input (see the module doc)."""
    size = dtype.itemsize
    matrix = rows * cols * size
    if op == "softmax":
        return (2 if mode == "fwd" else 3) * matrix  # fwd: x, y; bwd: y, dy, dx
    params = 2 if op == "layer_norm" else 1  # weight and bias, or weight alone
    stats = params * rows * 4  # float32 mean and rstd, or rstd alone, one per row
    if mode == "fwd":
        return 2 * matrix + params * cols * size + stats  # x, y; weight (bias); stats written
    return 3 * matrix + stats + (1 + params) * cols * size  # x, dy, dx; stats read; weight, grad_weight (grad_bias)


def timed_call(provider: Provider, case: Case, mode: str) -> Callable[[], object]:
    """The call that is timed: the forward, or the backward of a forward run here, outside the timed region."""
    if mode == "fwd":
        return lambda: call_op(case.op, provider.functions, case)
    y = call_op(case.op, provider.functions, case)
    return lambda: y.backward(case.dy, retain_graph=True)


def measure(
    case: Case, provider: Provider, mode: str, exact: Sequence[Tensor], timer: common.Timer, copy_gbps: float,
) -> dict[str, Any]:
    """One result row: `provider` checked against `exact`, then timed with `timer` unless it is WRONG."""
    rows, cols = case.x.shape
    row: dict[str, Any] = {
        "op": case.op, "mode": mode, "dtype": common.dtype_str(case.x.dtype), "M": rows, "N": cols,
        "provider": provider.name, "status": "ok", "error": None, "ms": None, "ms_p20": None, "ms_p80": None,
        "bytes": bytes_moved(case.op, mode, rows, cols, case.x.dtype), "gbps": None, "copy_fraction": None,
        "peak_memory_mb": None, "time_vs_torch": None,
    }
    error = check_provider(provider, case, mode, exact)
    if error is not None:
        row.update(status="WRONG", error=error)
        return row
    with _backend_of(provider):
        row.update(common.time_call(timed_call(provider, case, mode), case.leaves, timer, case.x.device))
    gbps = row["bytes"] / (row["ms"] * 1e-3) / 1e9
    row.update(gbps=gbps, copy_fraction=gbps / copy_gbps)
    return row


def benchmark(
    ops: Sequence[str], modes: Sequence[str], dtypes: Sequence[str], grid: Grid, device: torch.device,
    timer: common.Timer, copy_gbps: float,
) -> list[dict[str, Any]]:
    """Every (op, dtype, N, mode, provider) of the grid: one row each, with its time relative to `torch`."""
    measured = providers(device)
    results = []
    for op in ops:
        for dtype_name in dtypes:
            for cols in grid.cols:
                print(f"{op} {dtype_name} {grid.rows}x{cols}", file=sys.stderr, flush=True)
                if any(provider.name == "compile" for provider in measured):
                    # Each shape compiles afresh, so dynamo's recompile limit and automatic dynamic shapes
                    # never turn the compiled provider into something slower than a specialized graph.
                    torch.compiler.reset()
                case = make_case(op, grid.rows, cols, common.DTYPES[dtype_name], device)
                exact = exact_results(case)
                for mode in modes:
                    rows = [measure(case, provider, mode, exact, timer, copy_gbps) for provider in measured]
                    common.set_time_ratio(rows, "time_vs_torch", {"torch"})
                    results += rows
    return results


TABLE_COLUMNS = ("op", "mode", "dtype", "M x N", "provider", "ms", "p20-p80 ms", "GB/s", "% copy", "vs torch",
                 "peak MiB", "status")


def _cells(row: dict[str, Any]) -> list[str]:
    fmt = common.fmt
    return [row["op"], row["mode"], row["dtype"], f"{row['M']}x{row['N']}", row["provider"], *common.time_cells(row),
            fmt(row["gbps"], ".1f"), fmt(row["copy_fraction"], ".0%"), fmt(row["time_vs_torch"], ".2f", "x"),
            fmt(row["peak_memory_mb"], ".1f"), common.status_cell(row)]


def plot(results: Sequence[dict[str, Any]], copy_gbps: float, path: Path, device: str) -> list[Path]:
    """One PNG of GB/s against N with a panel per (op; mode, dtype); nothing, and an empty list, without matplotlib."""
    ops = list(dict.fromkeys(row["op"] for row in results))
    columns = list(dict.fromkeys((row["mode"], row["dtype"]) for row in results))
    panels = [[(f"{op} {mode} {dtype}, M={results[0]['M']}",
                [r for r in results if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype)])
               for mode, dtype in columns] for op in ops]
    return common.plot_panels(path, panels, "N", "gbps", "GB/s", ("copy", copy_gbps), PROVIDER_COLORS, device)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_norms", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke grid: M={QUICK_GRID.rows}, N in {set(QUICK_GRID.cols)}, float32")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtypes", nargs="+", choices=list(common.DTYPES), help="default: the grid's (float32 on the "
                        "CPU, bfloat16 and float32 on CUDA)")
    common.add_output_arguments(parser, "bench_norms")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark the command line asks for; print the table, write --out; return the result rows."""
    args = _parse(argv)
    device = common.default_device()
    on_cuda = device.type == "cuda"
    grid = QUICK_GRID if args.quick else CUDA_GRID if on_cuda else CPU_GRID
    timer = common.timer_for(device, args.quick)
    # Large enough to stream from memory rather than cache: 1 GiB on a GPU, 128 MiB on the CPU.
    copy_gbps = common.copy_bandwidth_gbps(device, timer, 2**30 if on_cuda else 2**27)
    results = benchmark(args.ops, args.modes, args.dtypes or grid.dtypes, grid, device, timer, copy_gbps)
    common.print_table(TABLE_COLUMNS, [_cells(row) for row in results],
                       f"{common.device_name(device)}: copy ceiling {copy_gbps:.1f} GB/s",
                       left=("op", "mode", "dtype", "provider", "status"))
    if args.out is not None:
        meta = common.run_meta(device, copy_bandwidth_gbps=copy_gbps)
        common.write_report(args.out, "bench_norms", meta, results,
                            None if args.no_plot else lambda path: plot(results, copy_gbps, path, meta["device"]))
    return results


if __name__ == "__main__":
    main()
