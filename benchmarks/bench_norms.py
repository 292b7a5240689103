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
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import lmrt
from lmrt import reference

OPS = ("layer_norm", "rms_norm", "softmax")
MODES = ("fwd", "bwd")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Passed explicitly so that every provider normalizes with the same eps.
EPS = 1e-5
# Allowed error: |result - exact| <= tol * max|exact| + tol * |exact|. Scaling the absolute part by the exact
# result's largest magnitude makes one figure serve outputs of order 1 (norms) and of order 1/N (softmax).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
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

# (fn, tensors whose .grad is reset before every call) -> (median, 20th percentile, 80th percentile) in ms.
Timer = Callable[[Callable[[], object], Sequence[Tensor]], tuple[float, float, float]]


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
        compiled = {op: torch.compile(getattr(reference, op), dynamic=False) for op in OPS}
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


def _reset_grads(leaves: Sequence[Tensor]) -> None:
    for leaf in leaves:
        leaf.grad = None


def run_once(functions: Any, case: Case, mode: str) -> list[Tensor | None]:
    """[output] (fwd), or [output, gradient with respect to x] (bwd), of `functions` on `case`."""
    _reset_grads(case.leaves)
    y = call_op(case.op, functions, case)
    if mode == "fwd":
        return [y.detach()]
    y.backward(case.dy)
    grad_input = case.x.grad
    _reset_grads(case.leaves)
    return [y.detach(), grad_input]


def exact_results(case: Case) -> list[Tensor]:
    """lmrt.reference in float64 on `case`'s inputs: the output and the gradient with respect to x."""
    return run_once(reference, case.as_float64(), "bwd")


def compare(results: Sequence[Tensor | None], exact: Sequence[Tensor], dtype: torch.dtype) -> str | None:
    """None when every result is within TOLERANCE[dtype] of the exact one, else what is wrong with the first bad one."""
    tol = TOLERANCE[dtype]
    for name, result, expected in zip(CHECKED[: len(results)], results, exact, strict=True):
        if result is None:
            return f"{name}: missing"
        if result.shape != expected.shape or result.dtype != dtype:
            return f"{name}: {result.dtype} {list(result.shape)}, expected {dtype} {list(expected.shape)}"
        error = (result.double() - expected).abs()
        bound = tol * expected.abs().max() + tol * expected.abs()
        outside = ~(error <= bound)  # NaN counts as outside
        if outside.any():
            worst = error.nan_to_num(float("inf")).max().item()
            return (f"{name}: {int(outside.sum())} of {error.numel()} elements off by more than {tol:g} x (max|exact| "
                    f"+ |exact|); max error {worst:.3g}, max|exact| {expected.abs().max().item():.3g}")
    return None


def check_provider(provider: Provider, case: Case, mode: str, exact: Sequence[Tensor]) -> str | None:
    """None when `provider` computes `case` in `mode` within tolerance of `exact`, else why it is WRONG."""
    try:
        with _backend_of(provider):
            results = run_once(provider.functions, case, mode)
    except Exception as error:  # a provider that fails is a result to report, not the end of the run
        first_line = (str(error).strip().splitlines() or [""])[0]
        return f"raised {type(error).__name__}: {first_line[:300]}"
    return compare(results, exact[: len(results)], case.x.dtype)


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


def cuda_timer(fn: Callable[[], object], grad_to_none: Sequence[Tensor]) -> tuple[float, float, float]:
    from triton.testing import do_bench  # triton is imported on CUDA only; the CPU runs never need it

    median, p20, p80 = do_bench(fn, grad_to_none=list(grad_to_none), quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


def cpu_timer(budget_s: float, warmup: int = 2, min_reps: int = 5, max_reps: int = 1000) -> Timer:
    """A Timer that times calls one by one with perf_counter for about `budget_s` seconds, at least `min_reps`."""

    def bench(fn: Callable[[], object], grad_to_none: Sequence[Tensor]) -> tuple[float, float, float]:
        for _ in range(warmup):
            _reset_grads(grad_to_none)
            fn()
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < deadline):
            _reset_grads(grad_to_none)
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        levels = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
        median, p20, p80 = torch.tensor(times, dtype=torch.float64).quantile(levels).tolist()
        return median, p20, p80

    return bench


def copy_bandwidth_gbps(device: torch.device, timer: Timer, nbytes: int) -> float:
    """The device's copy ceiling: GB/s of copying `nbytes` between two buffers on it (bytes read + written)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median, _, _ = timer(lambda: dst.copy_(src), [])
    return 2 * nbytes / (median * 1e-3) / 1e9


def peak_memory_mb(fn: Callable[[], object], leaves: Sequence[Tensor], device: torch.device) -> float | None:
    """MiB one call of `fn` allocates at its peak beyond what was allocated before it; None off CUDA."""
    if device.type != "cuda":
        return None
    _reset_grads(leaves)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    _reset_grads(leaves)
    return peak / 2**20


def measure(
    case: Case, provider: Provider, mode: str, exact: Sequence[Tensor], timer: Timer, copy_gbps: float,
) -> dict[str, Any]:
    """One result row: `provider` checked against `exact`, then timed with `timer` unless it is WRONG."""
    rows, cols = case.x.shape
    row: dict[str, Any] = {
        "op": case.op, "mode": mode, "dtype": str(case.x.dtype).removeprefix("torch."), "M": rows, "N": cols,
        "provider": provider.name, "status": "ok", "error": None, "ms": None, "ms_p20": None, "ms_p80": None,
        "bytes": bytes_moved(case.op, mode, rows, cols, case.x.dtype), "gbps": None, "copy_fraction": None,
        "peak_memory_mb": None, "time_vs_torch": None,
    }
    error = check_provider(provider, case, mode, exact)
    if error is not None:
        row.update(status="WRONG", error=error)
        return row
    with _backend_of(provider):
        fn = timed_call(provider, case, mode)
        median, p20, p80 = timer(fn, case.leaves)
        peak = peak_memory_mb(fn, case.leaves, case.x.device)
    gbps = row["bytes"] / (median * 1e-3) / 1e9
    row.update(ms=median, ms_p20=p20, ms_p80=p80, gbps=gbps, copy_fraction=gbps / copy_gbps, peak_memory_mb=peak)
    return row


def benchmark(
    ops: Sequence[str], modes: Sequence[str], dtypes: Sequence[str], grid: Grid, device: torch.device,
    timer: Timer, copy_gbps: float,
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
                case = make_case(op, grid.rows, cols, DTYPES[dtype_name], device)
                exact = exact_results(case)
                for mode in modes:
                    rows = [measure(case, provider, mode, exact, timer, copy_gbps) for provider in measured]
                    torch_ms = next((r["ms"] for r in rows if r["provider"] == "torch" and r["ms"]), None)
                    for row in rows:
                        if row["ms"] is not None and torch_ms is not None:
                            row["time_vs_torch"] = row["ms"] / torch_ms
                    results += rows
    return results


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _triton_version() -> str | None:
    # Read from the installed distribution, so that CPU runs need not import triton.
    for distribution in ("triton", "pytorch-triton"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(distribution)
    return None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def run_meta(device: torch.device, copy_gbps: float) -> dict[str, Any]:
    return {
        "device": device_name(device), "device_type": device.type, "torch_version": torch.__version__,
        "triton_version": _triton_version(), "python_version": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": _git_commit(),
        "copy_bandwidth_gbps": copy_gbps,
    }


TABLE_COLUMNS = ("op", "mode", "dtype", "M x N", "provider", "ms", "p20-p80 ms", "GB/s", "% copy", "vs torch",
                 "peak MiB", "status")


def _cells(row: dict[str, Any]) -> list[str]:
    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    spread = "-" if row["ms"] is None else f"{row['ms_p20']:.4g}-{row['ms_p80']:.4g}"
    status = "ok" if row["status"] == "ok" else f"WRONG: {row['error']}"
    return [row["op"], row["mode"], row["dtype"], f"{row['M']}x{row['N']}", row["provider"], number(row["ms"], ".4g"),
            spread, number(row["gbps"], ".1f"),
            "-" if row["copy_fraction"] is None else f"{100 * row['copy_fraction']:.0f}%",
            "-" if row["time_vs_torch"] is None else f"{row['time_vs_torch']:.2f}x",
            number(row["peak_memory_mb"], ".1f"), status]


def print_table(results: Sequence[dict[str, Any]], title: str) -> None:
    """The results as a table on stdout: rich's when it is installed, else aligned plain text."""
    cells = [_cells(row) for row in results]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(line[i]) for line in [list(TABLE_COLUMNS), *cells]) for i in range(len(TABLE_COLUMNS))]
        print(title)
        for line in [list(TABLE_COLUMNS), *cells]:
            print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        return
    table = Table(title=title)
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="left" if column in ("op", "mode", "dtype", "provider", "status") else "right")
    for line in cells:
        table.add_row(*line, style="bold red" if line[-1] != "ok" else None)
    console = Console()
    if not console.is_terminal:
        # Piped or in CI, rich assumes 80 columns and would elide the figures; a log line may be long.
        console.width = 240
    console.print(table)


def _draw(ax: Any, rows: Sequence[dict[str, Any]], copy_gbps: float, title: str) -> None:
    # In the style of triton.testing.perf_report: GB/s against N, one line per provider.
    for provider in dict.fromkeys(row["provider"] for row in rows):
        points = sorted((row["N"], row["gbps"]) for row in rows if row["provider"] == provider and row["gbps"])
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=provider, color=PROVIDER_COLORS.get(provider))
    ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1, label="copy")
    cols = sorted({row["N"] for row in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(cols, [str(n) for n in cols])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("N")
    ax.set_ylabel("GB/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def plot(results: Sequence[dict[str, Any]], copy_gbps: float, out_dir: Path, device: str) -> list[Path]:
    """One PNG of GB/s against N with a panel per (op; mode, dtype); nothing, and an empty list, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ops = list(dict.fromkeys(row["op"] for row in results))
    panels = list(dict.fromkeys((row["mode"], row["dtype"]) for row in results))
    fig, axes = plt.subplots(len(ops), len(panels), figsize=(5 * len(panels), 4 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, (mode, dtype) in enumerate(panels):
            selected = [r for r in results if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype)]
            _draw(axes[i][j], selected, copy_gbps, f"{op} {mode} {dtype}, M={results[0]['M']}")
    fig.suptitle(device)
    fig.tight_layout()
    path = out_dir / "bench_norms.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_norms", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke grid: M={QUICK_GRID.rows}, N in {set(QUICK_GRID.cols)}, float32")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: the grid's (float32 on the CPU, "
                        "bfloat16 and float32 on CUDA)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="write DIR/bench_norms.json and DIR/bench_norms.png")
    parser.add_argument("--no-plot", action="store_true", help="with --out: write no bench_norms.png")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark the command line asks for; print the table, write --out; return the result rows."""
    args = _parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    grid = QUICK_GRID if args.quick else CUDA_GRID if on_cuda else CPU_GRID
    timer = cuda_timer if on_cuda else cpu_timer(budget_s=0.05 if args.quick else 0.2)
    # Large enough to stream from memory rather than cache: 1 GiB on a GPU, 128 MiB on the CPU.
    copy_gbps = copy_bandwidth_gbps(device, timer, 2**30 if on_cuda else 2**27)
    results = benchmark(args.ops, args.modes, args.dtypes or grid.dtypes, grid, device, timer, copy_gbps)
    print_table(results, f"{device_name(device)}: copy ceiling {copy_gbps:.1f} GB/s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"meta": run_meta(device, copy_gbps), "results": results}
        (args.out / "bench_norms.json").write_text(json.dumps(report, indent=2) + "\n")
        written = [args.out / "bench_norms.json"]
        if not args.no_plot:
            written += plot(results, copy_gbps, args.out, device=report["meta"]["device"])
        print("wrote " + ", ".join(str(path) for path in written), file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
