"""Scaled-dot-product attention: lmrt against every PyTorch backend, forward, backward and both, in one run.

    python -m benchmarks.bench_attention [--quick] [--modes ...] [--dtypes ...] [--seqlens ...] [--head-dims ...]
                                         [--out DIR] [--no-plot]

The CUDA grid: head dim d 64 and 128; sequence length L 512 to 16384 at 16384 tokens per batch (batch = 16384 // L)
and model width 2048 (heads = 2048 // d: 32 at d=64, 16 at d=128); causal and not; bfloat16 and float16. q, k, v
and the output gradient are (batch, heads, L, d) tensors of standard normal values; the scale is 1/sqrt(d).

What is timed, per (mode, dtype, d, causal, L, provider):
- fwd: one attention call on q, k, v that require grad, i.e. a training forward.
- bwd: `out.backward(dout, retain_graph=True)` alone. The forward runs once beforehand, outside the timed region.
- fwd+bwd: the forward and its backward in one call.
The gradients of q, k and v are reset to None before every timed call, so no gradient accumulation is timed.

Providers: `lmrt-triton` (lmrt.ops.scaled_dot_product_attention under lmrt.backend("triton"); CUDA only, the
Triton interpreter on the CPU says nothing about speed), `lmrt` (the same on the default backend), `sdpa-flash`,
`sdpa-efficient`, `sdpa-cudnn` and `sdpa-math` (F.scaled_dot_product_attention held to one backend with
torch.nn.attention.sdpa_kernel; on the CPU only flash and math, the two PyTorch has there), `naive`
(lmrt.reference.scaled_dot_product_attention in the inputs' dtype: plain PyTorch ops that hold the L x L scores)
and `compile` (torch.compile of the naive reference; CUDA only, compiling takes too long on a small CPU). The
compiled reference takes dynamic shapes and is reset for every (dtype, d, causal), so the grid costs a few
compilations, not one per shape. A provider that raises because it cannot run a case, an SDPA backend refusing
the case or any provider running out of GPU memory, is reported `unsupported` with the reason and not timed.

Correctness, before timing: each provider's output (fwd), or output and gradients with respect to q, k and v
(bwd, fwd+bwd), are compared with lmrt.reference run in float64: |result - exact| <= tol * (max|exact| + |exact|)
with tol 1e-5 (float32), 1e-2 (float16), 5e-2 (bfloat16). A provider that disagrees, or raises for another
reason, is reported WRONG with the reason and is not timed. The float64 reference cannot run the full-size grid
(at L=16384 the scores of 32 heads alone are 64 GiB in float64), so the check runs on a reduced case of the same
dtype, d and causality: batch 1, 2 heads, L = min(L, 4096) (float64 scores of 256 MiB at most), recorded as each
row's `check_shape`. On the quick grid that is the timed case itself.

FLOPs are those of the matmuls: forward 4 * batch * heads * L^2 * d (QK^T and PV, 2 FLOPs per multiply-add),
halved when causal; backward 2.5x the forward's (QK^T recomputed, dV, dP, dQ, dK: five matmuls to two); fwd+bwd
3.5x. The ceiling they are compared with is a matmul measured at the start of the run, 2 * n^3 FLOPs of an
(n, n) @ (n, n) product: n = 8192 in bfloat16 on CUDA, n = 1024 in float32 on the CPU. `vs best sdpa` is a row's
time over the fastest SDPA backend's in the same mode and case (below 1 is faster).

Timing: on CUDA triton.testing.do_bench, which flushes L2 before every call (median, 20th and 80th percentiles),
with 12.5 ms of warm-up and 50 ms of timed calls per measurement, half its defaults, since the grid makes over a
thousand measurements; on the CPU a perf_counter loop after warm-up calls. Peak memory (CUDA only) is what one
timed call allocates at its peak beyond what was allocated before it, from torch.cuda.max_memory_allocated: the
output, what autograd saves and the workspace (fwd); the gradients and the workspace (bwd); all of them (fwd+bwd).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

import lmrt
from benchmarks import common
from lmrt import reference

MODES = ("fwd", "bwd", "fwd+bwd")
# Each mode's FLOPs as a multiple of the forward's.
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
CHECKED = ("output", "grad_query", "grad_key", "grad_value")
# The reduced case the float64 check runs on: batch 1, at most CHECK_HEADS heads and CHECK_SEQLEN positions.
CHECK_HEADS, CHECK_SEQLEN = 2, 4096
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
CPU_SDPA_BACKENDS = ("sdpa-flash", "sdpa-math")
PROVIDER_COLORS = {"lmrt-triton": "tab:red", "lmrt": "tab:orange", "sdpa-flash": "tab:blue",
                   "sdpa-efficient": "tab:purple", "sdpa-cudnn": "tab:cyan", "sdpa-math": "tab:brown",
                   "naive": "tab:gray", "compile": "tab:green"}


@dataclass(frozen=True)
class Grid:
    tokens: int  # batch * L, batch = max(1, tokens // L)
    width: int  # heads * d, heads = max(1, width // d)
    seqlens: tuple[int, ...]
    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]


QUICK_GRID = Grid(128, 128, (128,), (64,), ("float32",))
CPU_GRID = Grid(2048, 256, (256, 512, 1024), (64,), ("float32",))
CUDA_GRID = Grid(16384, 2048, (512, 1024, 2048, 4096, 8192, 16384), (64, 128), ("bfloat16", "float16"))
# do_bench's timed milliseconds per measurement, half its default: the CUDA grid makes over a thousand.
CUDA_REP_MS = 50


@dataclass(frozen=True)
class Provider:
    """An attention function with F.scaled_dot_product_attention's call, run inside `context()`. With `refuses`,
    an exception means that the function does not take the case (an SDPA backend's limits), not that it is wrong."""

    name: str
    attention: Callable[..., Tensor]
    context: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext
    refuses: bool = False


@dataclass
class Case:
    """q, k and v of shape (batch, heads, L, d), leaves requiring grad, the output gradient, and causality."""

    q: Tensor
    k: Tensor
    v: Tensor
    dout: Tensor
    causal: bool

    @property
    def leaves(self) -> list[Tensor]:
        return [self.q, self.k, self.v]

    def as_float64(self) -> Case:
        q, k, v = (t.detach().double().requires_grad_(True) for t in self.leaves)
        return Case(q, k, v, self.dout.double(), self.causal)


def make_case(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, dtype: torch.dtype,
              device: torch.device) -> Case:
    """Seeded standard normal inputs; the same for every provider and every run."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn() -> Tensor:
        return torch.randn(batch, heads, seqlen, head_dim, generator=generator, device=device).to(dtype)

    q, k, v = (randn().requires_grad_(True) for _ in range(3))
    return Case(q, k, v, randn(), causal)


def check_shape(heads: int, seqlen: int, head_dim: int) -> tuple[int, int, int, int]:
    """The reduced (batch, heads, L, d) shape the float64 check of a case of any batch runs on."""
    return 1, min(heads, CHECK_HEADS), min(seqlen, CHECK_SEQLEN), head_dim


def attention_flops(mode: str, batch: int, heads: int, seqlen: int, head_dim: int, causal: bool) -> float:
    """FLOPs of the matmuls of attention in `mode` (see the module doc)."""
    forward = 4 * batch * heads * seqlen * seqlen * head_dim // (2 if causal else 1)
    return forward * FLOP_FACTOR[mode]


def providers(device: torch.device) -> list[Provider]:
    """The providers measured on `device`, in the order they are reported."""
    on_cuda = device.type == "cuda"
    found = []
    if on_cuda and "triton" in lmrt.available_backends(device):
        found.append(Provider("lmrt-triton", lmrt.ops.scaled_dot_product_attention,
                              functools.partial(lmrt.backend, "triton")))
    found.append(Provider("lmrt", lmrt.ops.scaled_dot_product_attention))
    found += [Provider(name, F.scaled_dot_product_attention, functools.partial(sdpa_kernel, backend), refuses=True)
              for name, backend in SDPA_BACKENDS.items() if on_cuda or name in CPU_SDPA_BACKENDS]
    found.append(Provider("naive", reference.scaled_dot_product_attention))
    if on_cuda:
        compiled = common.compile_for_timing(reference.scaled_dot_product_attention, dynamic=True)
        found.append(Provider("compile", compiled))
    return found


def _attend(attention: Callable[..., Tensor], case: Case) -> Tensor:
    return attention(case.q, case.k, case.v, is_causal=case.causal)


def run_once(attention: Callable[..., Tensor], case: Case, mode: str) -> list[Tensor | None]:
    """[output] (fwd), or [output, gradients with respect to q, k and v] (bwd, fwd+bwd), of `attention` on `case`."""
    common.reset_grads(case.leaves)
    out = _attend(attention, case)
    if mode == "fwd":
        return [out.detach()]
    out.backward(case.dout)
    grads = [leaf.grad for leaf in case.leaves]
    common.reset_grads(case.leaves)
    return [out.detach(), *grads]


def exact_results(case: Case) -> list[Tensor]:
    """lmrt.reference in float64 on `case`'s inputs: the output and the gradients with respect to q, k and v."""
    return run_once(reference.scaled_dot_product_attention, case.as_float64(), "bwd")


def _failure(provider: Provider, error: Exception, when: str = "") -> tuple[str, str]:
    unsupported = provider.refuses or isinstance(error, torch.OutOfMemoryError)
    return ("unsupported" if unsupported else "WRONG"), when + common.raised(error)


def check_provider(provider: Provider, case: Case, mode: str, exact: Sequence[Tensor]) -> tuple[str, str] | None:
    """None when `provider` computes `case` in `mode` within tolerance of `exact`, else (status, reason)."""
    try:
        with provider.context():
            results = run_once(provider.attention, case, mode)
    except Exception as error:  # a provider that fails is a result to report, not the end of the run
        return _failure(provider, error)
    error = common.compare(CHECKED, results, exact[: len(results)], case.q.dtype)
    return None if error is None else ("WRONG", error)


def timed_call(provider: Provider, case: Case, mode: str) -> Callable[[], object]:
    """The call that is timed: the forward, the backward of a forward run here (outside the timed region), or both."""
    if mode == "fwd":
        return lambda: _attend(provider.attention, case)
    if mode == "fwd+bwd":
        return lambda: _attend(provider.attention, case).backward(case.dout)
    out = _attend(provider.attention, case)
    return lambda: out.backward(case.dout, retain_graph=True)


def measure(
    case: Case, check: Case, exact: Sequence[Tensor], provider: Provider, mode: str, timer: common.Timer,
    matmul_ceiling: float,
) -> dict[str, Any]:
    """One result row: `provider` checked on `check` against `exact`, then timed on `case` unless that failed."""
    batch, heads, seqlen, head_dim = case.q.shape
    row: dict[str, Any] = {
        "mode": mode, "dtype": common.dtype_str(case.q.dtype), "causal": case.causal, "batch": batch,
        "heads": heads, "seqlen": seqlen, "head_dim": head_dim, "check_shape": list(check.q.shape),
        "provider": provider.name, "status": "ok", "error": None, "ms": None, "ms_p20": None, "ms_p80": None,
        "flops": attention_flops(mode, batch, heads, seqlen, head_dim, case.causal), "tflops": None,
        "matmul_fraction": None, "time_vs_best_sdpa": None, "peak_memory_mb": None,
    }
    failure = check_provider(provider, check, mode, exact)
    if failure is None:
        try:
            with provider.context():
                row.update(common.time_call(timed_call(provider, case, mode), case.leaves, timer, case.q.device))
        except Exception as error:  # the full-size case may be too large, or refused, where the check case was not
            failure = _failure(provider, error, when="at full size: ")
    if failure is not None:
        row.update(status=failure[0], error=failure[1])
        return row
    tflops = row["flops"] / (row["ms"] * 1e-3) / 1e12
    row.update(tflops=tflops, matmul_fraction=tflops / matmul_ceiling)
    return row


def benchmark(modes: Sequence[str], grid: Grid, device: torch.device, timer: common.Timer,
              matmul_ceiling: float) -> list[dict[str, Any]]:
    """Every (dtype, d, causal, L, mode, provider) of the grid: one row each, with its time relative to the fastest
    SDPA backend's."""
    measured = providers(device)
    results = []
    for dtype_name, head_dim, causal in itertools.product(grid.dtypes, grid.head_dims, (False, True)):
        if any(provider.name == "compile" for provider in measured):
            # A few graphs per (dtype, d, causal), never dynamo's recompile limit, past which it would run eagerly.
            torch.compiler.reset()
        heads = max(1, grid.width // head_dim)
        for seqlen in grid.seqlens:
            batch = max(1, grid.tokens // seqlen)
            print(f"{dtype_name} d={head_dim} causal={causal} {batch}x{heads}x{seqlen}", file=sys.stderr, flush=True)
            case = make_case(batch, heads, seqlen, head_dim, causal, common.DTYPES[dtype_name], device)
            check = make_case(*check_shape(heads, seqlen, head_dim), causal, common.DTYPES[dtype_name], device)
            exact = exact_results(check)
            for mode in modes:
                rows = [measure(case, check, exact, provider, mode, timer, matmul_ceiling) for provider in measured]
                common.set_time_ratio(rows, "time_vs_best_sdpa", SDPA_BACKENDS)
                results += rows
    return results


TABLE_COLUMNS = ("mode", "dtype", "causal", "B x H x L x d", "provider", "ms", "p20-p80 ms", "TFLOP/s", "% matmul",
                 "vs best sdpa", "peak MiB", "status")


def _cells(row: dict[str, Any]) -> list[str]:
    shape = f"{row['batch']}x{row['heads']}x{row['seqlen']}x{row['head_dim']}"
    fmt = common.fmt
    return [row["mode"], row["dtype"], "yes" if row["causal"] else "no", shape, row["provider"],
            *common.time_cells(row), fmt(row["tflops"], ".3g"), fmt(row["matmul_fraction"], ".0%"),
            fmt(row["time_vs_best_sdpa"], ".2f", "x"), fmt(row["peak_memory_mb"], ".1f"), common.status_cell(row)]


def plot(results: Sequence[dict[str, Any]], ceiling: tuple[str, float], path: Path, device: str) -> list[Path]:
    """One PNG of TFLOP/s against L: a row of panels per (dtype, d), a panel per (mode, causal)."""
    groups: dict[tuple[str, int, str, bool], list[dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["dtype"], row["head_dim"], row["mode"], row["causal"]), []).append(row)
    lines = dict.fromkeys((dtype, head_dim) for dtype, head_dim, _, _ in groups)
    columns = dict.fromkeys((mode, causal) for _, _, mode, causal in groups)
    panels = [[(f"{mode} {dtype} d={head_dim}{' causal' if causal else ''}", groups[dtype, head_dim, mode, causal])
               for mode, causal in columns] for dtype, head_dim in lines]
    return common.plot_panels(path, panels, "seqlen", "tflops", "TFLOP/s", ceiling, PROVIDER_COLORS, device)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_attention", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke grid: batch 1, 2 heads, L=128, d=64, float32")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtypes", nargs="+", choices=list(common.DTYPES), help="default: the grid's (float32 on the "
                        "CPU, bfloat16 and float16 on CUDA)")
    parser.add_argument("--seqlens", nargs="+", type=int, metavar="L", help="default: the grid's (512 to 16384 on "
                        "CUDA); batch = tokens // L at the grid's tokens per batch")
    parser.add_argument("--head-dims", nargs="+", type=int, metavar="D", help="default: the grid's (64 and 128 on "
                        "CUDA); heads = width // D at the grid's model width")
    common.add_output_arguments(parser, "bench_attention")
    return parser.parse_args(argv)


def _grid(args: argparse.Namespace, on_cuda: bool) -> Grid:
    """The grid for the device, or the quick one, with the sequence lengths, head dims and dtypes given instead."""
    grid = QUICK_GRID if args.quick else CUDA_GRID if on_cuda else CPU_GRID
    return dataclasses.replace(
        grid, seqlens=tuple(args.seqlens or grid.seqlens), head_dims=tuple(args.head_dims or grid.head_dims),
        dtypes=tuple(args.dtypes or grid.dtypes))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark the command line asks for; print the table, write --out; return the result rows."""
    args = _parse(argv)
    device = common.default_device()
    on_cuda = device.type == "cuda"
    grid = _grid(args, on_cuda)
    timer = common.timer_for(device, args.quick, cuda_rep_ms=CUDA_REP_MS)
    matmul_size, matmul_dtype = (8192, torch.bfloat16) if on_cuda else (1024, torch.float32)
    ceiling = common.matmul_tflops(device, timer, matmul_size, matmul_dtype)
    results = benchmark(args.modes, grid, device, timer, ceiling)
    matmul = f"{common.dtype_str(matmul_dtype)} matmul"
    common.print_table(TABLE_COLUMNS, [_cells(row) for row in results],
                       f"{common.device_name(device)}: {matmul} ceiling {ceiling:.3g} TFLOP/s",
                       left=("mode", "dtype", "causal", "provider", "status"))
    if args.out is not None:
        meta = common.run_meta(device, matmul_tflops=ceiling, matmul_size=matmul_size,
                               matmul_dtype=common.dtype_str(matmul_dtype))
        plot_to = None if args.no_plot else lambda path: plot(results, (matmul, ceiling), path, meta["device"])
        common.write_report(args.out, "bench_attention", meta, results, plot_to)
    return results


if __name__ == "__main__":
    main()
