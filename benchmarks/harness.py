"""The harness of the op benchmarks (bench_attention, bench_layer_norm, bench_rms_norm, bench_softmax): the
providers, the check of each against the float64 reference before it is timed, the run over a grid, the table,
plot and report, and the command line. An op benchmark is an OpBenchmark that says which providers it has on a
device, which points its grid holds (each a Case: the op's inputs) and how much work each mode of a point does.

Providers:
- `lmrt-triton`, `lmrt-cuda`, `lmrt-cpp`: the lmrt op under lmrt.backend(name), each where its backend runs. On
  the CPU `lmrt-triton` runs through the Triton interpreter (TRITON_INTERPRET=1): it is checked, not timed, since
  the interpreter's speed says nothing about the kernels'.
- PyTorch's: the op's torch.nn.functional twin (`torch`), or one provider per SDPA backend for attention, and
  `compile`, torch.compile of the reference (not in --quick, nor with --no-compile). Every row records its time
  over each PyTorch provider's in the same case and mode ("time_vs"; below 1 is faster).
- `naive`: lmrt.reference, plain PyTorch ops in the inputs' dtype.
A provider that cannot run on this machine is listed, with the reason, in the meta's "skipped" and under the
table; none is dropped silently.

Modes: `fwd` is one call on inputs that require grad (a training forward); `bwd` is `out.backward(grad,
retain_graph=True)` alone, its forward run once beforehand outside the timed region; `fwd+bwd` is both in one
call. The leaves' gradients are reset to None before every timed call, so no gradient accumulation is timed.

Correctness, before timing: each provider's output (fwd), or output and checked gradients (bwd, fwd+bwd), against
lmrt.reference run in float64 (common.compare: |result - exact| <= tol * (max|exact| + |exact|), tol 1e-5 for
float32, 1e-2 for float16, 5e-2 for bfloat16). A provider that disagrees, or raises, is WRONG with the reason and is
not timed; one that refuses a case it does not take (an SDPA backend's or an lmrt backend's limits, running out
of memory, a compile that fails) is `unsupported`, with the reason.

Figures per row: the median time and the 20th-80th percentile spread (common.timer_for: triton.testing.do_bench
on CUDA, one provider after another; on the CPU a perf_counter loop after warm-up calls, the providers of a case
and mode interleaved in rounds so that the host's drift does not favour one), the throughput (the op's Metric: its
formula is in the op's module), the fraction of the ceiling measured at the start of the run
(common.measure_ceilings), peak memory (CUDA only: what one call allocates beyond what was allocated before it) and
the ratios to PyTorch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import lmrt
from benchmarks import common
from lmrt import backends

MODES = ("fwd", "bwd", "fwd+bwd")
LMRT_BACKENDS = {"lmrt-triton": "triton", "lmrt-cuda": "cuda", "lmrt-cpp": "cpp"}
INTERPRETED = "the Triton interpreter: checked, not timed"
# What an lmrt op raises when the backend chosen for it lacks the case (a head dim, say: lmrt/backends.py's select);
# that provider is `unsupported` there, not wrong.
LMRT_REFUSAL = "was chosen but cannot serve this call"
PROVIDER_COLORS = {"lmrt-triton": "tab:red", "lmrt-cuda": "tab:pink", "lmrt-cpp": "tab:orange", "lmrt": "tab:orange",
                   "torch": "tab:blue", "sdpa-flash": "tab:blue", "sdpa-efficient": "tab:purple",
                   "sdpa-cudnn": "tab:cyan", "sdpa-math": "tab:brown", "naive": "tab:gray", "compile": "tab:green"}


@dataclass(frozen=True)
class Provider:
    """A function with the op's torch.nn.functional signature, run inside `context()`. `pytorch`: a PyTorch
    provider, which every row is compared with. `refuses`: an exception means that it does not take the case, not
    that it is wrong. `untimed`: why it is checked but not timed."""

    name: str
    fn: Callable[..., Tensor]
    context: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext
    pytorch: bool = False
    refuses: bool = False
    untimed: str | None = None


@dataclass
class Case:
    """One call of an op, `fn(*args, **kwargs)`. The tensors of `args` that require grad are its leaves; `names`
    name the checked results: the output, then the gradients of the first len(names) - 1 leaves."""

    args: tuple[Any, ...]
    grad_output: Tensor
    names: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def leaves(self) -> list[Tensor]:
        return [arg for arg in self.args if isinstance(arg, Tensor) and arg.requires_grad]

    @property
    def dtype(self) -> torch.dtype:
        return self.args[0].dtype

    @property
    def device(self) -> torch.device:
        return self.args[0].device

    def call(self, fn: Callable[..., Tensor]) -> Tensor:
        return fn(*self.args, **self.kwargs)

    def as_float64(self) -> Case:
        def widen(arg: Any) -> Any:
            return arg.detach().double().requires_grad_(arg.requires_grad) if isinstance(arg, Tensor) else arg

        return Case(tuple(widen(arg) for arg in self.args), self.grad_output.double(), self.names, self.kwargs)


@dataclass(frozen=True)
class Point:
    """One point of a grid: `shape`, the row's columns that say which case it is (dtype included); `make`, the case
    timed; `make_check`, the case checked (a reduced one where the float64 reference cannot run the timed case;
    None: the timed case itself); `work(mode)`, the bytes or FLOPs of a mode, as the op's Metric counts them. The
    compiled provider starts afresh (torch.compiler.reset) whenever `compile_group` changes."""

    shape: dict[str, Any]
    make: Callable[[], Case]
    work: Callable[[str], float]
    make_check: Callable[[], Case] | None = None
    compile_group: Any = None


Failure = tuple[str, str]  # (status, reason)


def lmrt_providers(fn: Callable[..., Tensor], device: torch.device) -> tuple[list[Provider], dict[str, str]]:
    """`fn` (an lmrt op) under each lmrt backend that runs on `device`, and why each other is skipped."""
    found, skipped = [], {}
    for name, backend in LMRT_BACKENDS.items():
        why = backends.unavailable_reason(backend, device.type)
        if why is not None:
            skipped[name] = why
            continue
        untimed = INTERPRETED if backend == "triton" and device.type != "cuda" else None
        found.append(Provider(name, fn, functools.partial(lmrt.backend, backend), untimed=untimed))
    return found, skipped


def compiled_provider(fn: Callable[..., Tensor], skip: str | None, **options: Any
                      ) -> tuple[list[Provider], dict[str, str]]:
    """`compile`: torch.compile(fn, **options), a PyTorch provider, unless `skip` says why not."""
    if skip is not None:
        return [], {"compile": skip}
    return [Provider("compile", common.compile_for_timing(fn, **options), pytorch=True, refuses=True)], {}


def compile_skip(args: argparse.Namespace) -> str | None:
    """Why the run has no compiled provider, or None."""
    if args.no_compile:
        return "--no-compile"
    if args.quick:
        return "not in --quick: compiling takes longer than the quick run"
    return None


def run_once(fn: Callable[..., Tensor], case: Case, grads: bool) -> list[Tensor | None]:
    """[output], or with `grads` [output, the checked leaves' gradients], of `fn` on `case`."""
    common.reset_grads(case.leaves)
    out = case.call(fn)
    if not grads:
        return [out.detach()]
    out.backward(case.grad_output)
    checked = [leaf.grad for leaf in case.leaves[: len(case.names) - 1]]
    common.reset_grads(case.leaves)
    return [out.detach(), *checked]


def _failure(provider: Provider, error: Exception, when: str = "") -> Failure:
    unsupported = provider.refuses or isinstance(error, torch.OutOfMemoryError) or LMRT_REFUSAL in str(error)
    return ("unsupported" if unsupported else "WRONG"), when + common.raised(error)


def check_provider(provider: Provider, case: Case, exact: Sequence[Tensor], modes: Sequence[str]
                   ) -> dict[str, Failure | None]:
    """Each mode's verdict on `provider`: None when it computes `case` within tolerance of `exact` (the float64
    reference's output and checked gradients), else (status, reason). One run with gradients serves every mode; the
    forward runs alone only when that run fails, so that a broken backward does not hide a correct forward."""

    def attempt(grads: bool) -> Failure | None:
        try:
            with provider.context():
                results = run_once(provider.fn, case, grads)
        except Exception as error:  # a provider that fails is a result to report, not the end of the run
            return _failure(provider, error)
        wrong = common.compare(case.names, results, exact[: len(results)], case.dtype)
        return None if wrong is None else ("WRONG", wrong)

    backward_modes = [mode for mode in modes if mode != "fwd"]
    verdicts: dict[str, Failure | None] = dict.fromkeys(backward_modes, attempt(True)) if backward_modes else {}
    if "fwd" in modes:
        verdicts["fwd"] = None if backward_modes and verdicts[backward_modes[0]] is None else attempt(False)
    return verdicts


def timed_call(provider: Provider, case: Case, mode: str) -> Callable[[], object]:
    """The call that is timed: the forward, the backward of a forward run here (outside the timed region), or both.
    Run inside provider.context()."""
    if mode == "fwd":
        return lambda: case.call(provider.fn)
    if mode == "fwd+bwd":
        return lambda: case.call(provider.fn).backward(case.grad_output)
    out = case.call(provider.fn)
    return lambda: out.backward(case.grad_output, retain_graph=True)


def measure(
    base: dict[str, Any], providers: Sequence[Provider], case: Case, mode: str, verdicts: Sequence[Failure | None],
    timer: common.Timer, metric: common.Metric, ceilings: common.Ceilings,
) -> list[dict[str, Any]]:
    """A row per provider, `base` (the case's columns and work) completed for it in `mode` given its verdict: the
    providers that passed their check and are not untimed are timed in one call of `timer`, which interleaves
    them on the CPU."""
    rows, jobs = [], {}
    for index, (provider, verdict) in enumerate(zip(providers, verdicts, strict=True)):
        row = dict(base, provider=provider.name, status="ok", error=None, ms=None, ms_p20=None, ms_p80=None,
                   **{metric.rate: None, metric.fraction: None}, peak_memory_mb=None, time_vs={})
        if verdict is not None:
            row.update(status=verdict[0], error=verdict[1])
        elif provider.untimed:
            row.update(status="untimed", error=provider.untimed)
        else:
            jobs[index] = common.Job(functools.partial(timed_call, provider, case, mode), case.leaves, provider.context)
        rows.append(row)
    timings = timer(list(jobs.values())) if jobs else []
    for (index, job), timing in zip(jobs.items(), timings, strict=True):
        row = rows[index]
        try:
            if isinstance(timing, Exception):
                raise timing
            row.update(common.timing_columns(timing, job, case.device))
        except Exception as error:  # the full-size case may be too large, or refused, where the checked one was not
            status, reason = _failure(providers[index], error, when="while timed: ")
            row.update(status=status, error=reason)
            continue
        metric.fill(row, ceilings)
    return rows


def label(key: str, value: Any) -> str:
    """A shape value in a title: "causal" or "not causal", "head_dim=64", "bfloat16"."""
    if isinstance(value, bool):
        return key if value else f"not {key}"
    return f"{key}={value}" if isinstance(value, int) else str(value)


class OpBenchmark:
    """One op's benchmark. A subclass sets the class attributes and implements `providers`, `points` and
    `shape_cells` (and `add_grid_arguments` for options of its own)."""

    name: str  # the op: the results are bench_<name>.json, .csv and .png
    doc: str  # the module's docstring: the command's help
    metric: common.Metric
    shape_headers: tuple[str, ...]  # the table's columns that say which case a row is, after "mode"
    x: str  # the shape key on the plots' x axis (log2)
    panel_rows: tuple[str, ...]  # shape keys: one row of plot panels per combination of their values
    panel_cols: tuple[str, ...]  # shape keys, "mode" among them: one panel of a row per combination
    quick_help: str
    cuda_rep_ms: float = 50  # do_bench's timed milliseconds per measurement, half its default

    @staticmethod
    def reference(*args: Any, **kwargs: Any) -> Tensor:
        """The op in plain PyTorch (lmrt.reference), run in float64 for the exact results and as `naive`."""
        raise NotImplementedError

    def providers(self, device: torch.device, compile_skip: str | None) -> tuple[list[Provider], dict[str, str]]:
        """The providers measured on `device`, in the order they are reported, and why each other is skipped."""
        raise NotImplementedError

    def points(self, args: argparse.Namespace, device: torch.device) -> list[Point]:
        raise NotImplementedError

    def shape_cells(self, row: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def add_grid_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Options that change the grid, beyond --quick, --modes and --dtypes."""

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=f"python -m benchmarks.bench_{self.name}", description=self.doc,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--quick", action="store_true", help=f"smoke grid: {self.quick_help}")
        parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
        parser.add_argument("--dtypes", nargs="+", choices=list(common.DTYPES), help="default: the grid's")
        parser.add_argument("--no-compile", action="store_true", help="no torch.compile provider")
        self.add_grid_arguments(parser)
        common.add_output_arguments(parser, f"bench_{self.name}.json, .csv and .png")
        return parser

    def run(self, args: argparse.Namespace, device: torch.device, providers: Sequence[Provider], timer: common.Timer,
            ceilings: common.Ceilings, deadline: float | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Every (point, mode, provider) of the grid, one row each, and what was not run when time.monotonic()
        passed `deadline` (None when all was)."""
        points = self.points(args, device)
        grads = any(mode != "fwd" for mode in args.modes)
        compiled = any(provider.name == "compile" for provider in providers)
        pytorch = [provider.name for provider in providers if provider.pytorch]
        results: list[dict[str, Any]] = []
        group: Any = object()
        for index, point in enumerate(points):
            if deadline is not None and time.monotonic() > deadline:
                return results, f"{len(points) - index} of {len(points)} points not run: the time budget was spent"
            print(f"{self.name}: " + " ".join(f"{k}={v}" for k, v in point.shape.items()), file=sys.stderr, flush=True)
            if compiled and point.compile_group != group:
                # Dynamo's recompile limit would otherwise turn the compiled provider into an eager one.
                torch.compiler.reset()
                group = point.compile_group
            case = point.make()
            check = case if point.make_check is None else point.make_check()
            exact = run_once(self.reference, check.as_float64(), grads)
            verdicts = {provider.name: check_provider(provider, check, exact, args.modes) for provider in providers}
            for mode in args.modes:
                base = {"op": self.name, "mode": mode, **point.shape, self.metric.work: point.work(mode)}
                rows = measure(base, providers, case, mode, [verdicts[provider.name][mode] for provider in providers],
                               timer, self.metric, ceilings)
                common.set_time_ratios(rows, pytorch)
                results += rows
        return results, None

    def print_table(self, results: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
        metric, fmt = self.metric, common.fmt
        baselines = meta["pytorch_providers"]
        columns = ("mode", *self.shape_headers, "provider", "ms", "p20-p80 ms", metric.unit,
                   f"% {metric.ceiling_label}", *[f"vs {name}" for name in baselines], "peak MiB", "status")
        cells = [[row["mode"], *self.shape_cells(row), row["provider"], *common.time_cells(row),
                  fmt(row[metric.rate], ".4g"), fmt(row[metric.fraction], ".0%"),
                  *[fmt(row["time_vs"].get(name), ".2f", "x") for name in baselines],
                  fmt(row["peak_memory_mb"], ".1f"), common.status_cell(row)] for row in results]
        ceiling = meta[metric.ceiling]
        title = (f"{self.name} on {meta['device']}: {metric.ceiling_label} ceiling {ceiling:.4g} {metric.unit}; "
                 f"'vs X' is the time over X's")
        common.print_table(columns, cells, title, left=("mode", "dtype", "provider", "status"))
        for name, why in meta["skipped"].items():
            print(f"  skipped {name}: {why}")
        if meta["not_run"]:
            print(f"  {meta['not_run']}")

    def plot(self, results: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path) -> list[Path]:
        """One PNG in the style of triton.testing.perf_report: throughput against `x`, one line per provider, the
        ceiling dashed; a row of panels per `panel_rows` values, a panel per `panel_cols` values."""
        groups: dict[tuple[Any, ...], dict[tuple[Any, ...], list[dict[str, Any]]]] = {}
        for row in results:
            line = groups.setdefault(tuple(row[key] for key in self.panel_rows), {})
            line.setdefault(tuple(row[key] for key in self.panel_cols), []).append(row)
        if not groups:
            return []
        keys = (*self.panel_rows, *self.panel_cols)
        panels = [[(" ".join(label(k, v) for k, v in zip(keys, (*line_key, *panel_key), strict=True)), rows)
                   for panel_key, rows in line.items()] for line_key, line in groups.items()]
        metric = self.metric
        ceiling = (f"{metric.ceiling_label} ceiling", meta[metric.ceiling])
        return common.plot_panels(path, panels, self.x, metric.rate, metric.unit, ceiling, PROVIDER_COLORS,
                                  f"bench_{self.name}: {meta['device']}")

    def main(self, argv: Sequence[str] | None = None, ceilings: common.Ceilings | None = None,
             deadline: float | None = None) -> list[dict[str, Any]]:
        """Run the benchmark the command line asks for, with the ceilings given (else measured first); print the
        table, write --out or --save; return the result rows."""
        args = common.parse_arguments(self.parser(), argv)
        device = common.default_device()
        with common.cpu_settings(device, args.quick):
            return self._main(args, device, ceilings, deadline)

    def _main(self, args: argparse.Namespace, device: torch.device, ceilings: common.Ceilings | None,
              deadline: float | None) -> list[dict[str, Any]]:
        timer = common.timer_for(device, args.quick, cuda_rep_ms=self.cuda_rep_ms)
        if ceilings is None:
            ceilings = common.measure_ceilings(device, timer, args.quick)
        providers, skipped = self.providers(device, compile_skip(args))
        results, not_run = self.run(args, device, providers, timer, ceilings, deadline)
        meta = common.run_meta(
            device, ceilings, benchmark=f"bench_{self.name}", quick=args.quick, metric=self.metric.unit,
            providers=[provider.name for provider in providers],
            pytorch_providers=[provider.name for provider in providers if provider.pytorch], skipped=skipped,
            not_run=not_run)
        self.print_table(results, meta)
        out = common.output_dir(args, device)
        if out is not None:
            plot = None if args.no_plot else functools.partial(self.plot, results, meta)
            common.write_report(out, f"bench_{self.name}", meta, results, plot)
        return results
