"""What every benchmark shares: the timers, the device's ceilings, the throughput metrics, the check against the
float64 reference, peak memory, the run's metadata, and the table, plot, JSON and CSV a run writes."""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import dataclasses
import importlib.metadata
import json
import math
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Allowed error: |result - exact| <= tol * max|exact| + tol * |exact|. Scaling the absolute part by the exact
# result's largest magnitude makes one figure serve results of order 1 (norms) and of order 1/N (softmax).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}

# The committed figures: one folder per device (device_folder), as `--save` writes them.
RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Job:
    """A call to time. `prepare()`, run inside `context()`, returns the call; what it does first (the forward whose
    backward is timed) stays outside the timed region. The `leaves`' gradients are reset to None before every call,
    so that no gradient accumulation is timed."""

    prepare: Callable[[], Callable[[], object]]
    leaves: Sequence[Tensor] = ()
    context: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext


Timing = tuple[float, float, float]  # (median, 20th percentile, 80th percentile) in ms
# Jobs -> each job's Timing, or the exception that its preparation or a call raised (the others are still timed).
Timer = Callable[[Sequence[Job]], list[Timing | Exception]]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def reset_grads(leaves: Sequence[Tensor]) -> None:
    for leaf in leaves:
        leaf.grad = None


def _quantiles(times_ms: Sequence[float]) -> Timing:
    levels = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    median, p20, p80 = torch.tensor(times_ms, dtype=torch.float64).quantile(levels).tolist()
    return median, p20, p80


def cuda_timer(warmup_ms: float, rep_ms: float) -> Timer:
    """A Timer that runs triton.testing.do_bench on each job in turn: about `warmup_ms` of warm-up calls, then about
    `rep_ms` of timed calls (at least one), L2 flushed before each. Each job's call is released before the next job
    is prepared, so that one provider's saved tensors never crowd another's out of GPU memory."""

    def bench(jobs: Sequence[Job]) -> list[Timing | Exception]:
        from triton.testing import do_bench  # triton is imported on CUDA only; the CPU runs never need it

        timings: list[Timing | Exception] = []
        for job in jobs:
            try:
                with job.context():
                    median, p20, p80 = do_bench(job.prepare(), warmup=warmup_ms, rep=rep_ms,
                                                grad_to_none=list(job.leaves), quantiles=[0.5, 0.2, 0.8])
                timings.append((median, p20, p80))
            except Exception as error:  # one provider's failure is its row's result, not the end of the run
                timings.append(error)
        return timings

    return bench


def cpu_timer(budget_s: float, warmup: int = 2, min_reps: int = 5, max_reps: int = 1000, rounds: int = 4,
              apart: float = 4.0) -> Timer:
    """A Timer that times calls one by one with perf_counter, about `budget_s` seconds per job (at least `min_reps`
    calls, at most `max_reps`), the jobs interleaved: in about `rounds` rounds, each running every job for a
    `budget_s / rounds` share of calls after untimed ones, the order rotated from round to round.

    Interleaving is what makes the jobs' figures comparable on a shared host: the machine's speed drifts by 10-20%
    over seconds (other tenants, frequency), and timing one job after another put each job on its own stretch of
    that drift, which made equal kernels differ by more than the differences measured. The untimed calls (a
    quarter of the round's share, at least one) keep a job's figures free of the caches' state the job before it
    left. A job whose quickest warm-up call (the quickest: one call can stall on a busy host) takes over `apart`
    times the fastest job's (the naive reference, say) is timed on its own after the others: it streams so many
    more bytes that the next job's calls stayed slow for several calls after it (the first softmax backward after
    the naive one's took 1.5 times as long as the fifth)."""

    def bench(jobs: Sequence[Job]) -> list[Timing | Exception]:
        timings: list[Timing | Exception | None] = [None] * len(jobs)
        calls: dict[int, Callable[[], object]] = {}
        warm_s: dict[int, float] = {}
        for index, job in enumerate(jobs):
            try:
                with job.context():
                    calls[index] = job.prepare()
                    for _ in range(max(warmup, 1)):
                        reset_grads(job.leaves)
                        start = time.perf_counter()
                        calls[index]()
                        warm_s[index] = min(time.perf_counter() - start, warm_s.get(index, math.inf))
            except Exception as error:  # one provider's failure is its row's result, not the end of the run
                timings[index] = error
                calls.pop(index, None)
        fastest = min(warm_s[index] for index in calls) if calls else 0.0
        together = [index for index in calls if warm_s[index] <= apart * fastest]
        for group in [together] + [[index] for index in calls if index not in together]:
            _time_interleaved({index: (jobs[index], calls[index], warm_s[index]) for index in group}, timings,
                              budget_s, min_reps, max_reps, rounds)
        return [timing for timing in timings if timing is not None]

    return bench


def _time_interleaved(group: dict[int, tuple[Job, Callable[[], object], float]],
                      timings: list[Timing | Exception | None], budget_s: float, min_reps: int, max_reps: int,
                      rounds: int) -> None:
    """cpu_timer's rounds over `group` (job index -> (job, its prepared call, the time of a warm call)), each
    job's Timing, or what it raised, put at its index in `timings`."""
    share_s = budget_s / rounds
    per_round = {index: min(max(int(share_s / max(warm, 1e-9)), 1), max(max_reps // rounds, 1))
                 for index, (_, _, warm) in group.items()}
    times: dict[int, list[float]] = {index: [] for index in group}
    deadline = time.perf_counter() + budget_s * len(group)
    round_index = 0
    while group and (min(len(times[index]) for index in group) < min_reps
                     or (time.perf_counter() < deadline and max(len(times[i]) for i in group) < max_reps)):
        order = list(group)
        shift = round_index % len(order)
        for index in order[shift:] + order[:shift]:
            job, call, _ = group[index]
            try:
                with job.context():
                    settled = time.perf_counter() + share_s / 4
                    while True:  # untimed
                        reset_grads(job.leaves)
                        call()
                        if time.perf_counter() >= settled:
                            break
                    for _ in range(per_round[index]):
                        reset_grads(job.leaves)
                        start = time.perf_counter()
                        call()
                        times[index].append((time.perf_counter() - start) * 1e3)
            except Exception as error:  # one provider's failure is its row's result, not the end of the run
                timings[index] = error
                del group[index]
        round_index += 1
    for index in group:
        timings[index] = _quantiles(times[index])


def time_one(timer: Timer, fn: Callable[[], object]) -> Timing:
    """`fn` timed alone with `timer`; what it raised, raised again."""
    (timing,) = timer([Job(lambda: fn)])
    if isinstance(timing, Exception):
        raise timing
    return timing


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# What keep_freed_memory set, for the results' meta; None until it has, or where it cannot (no glibc).
malloc_setting: str | None = None


def keep_freed_memory() -> None:
    """Have glibc's malloc keep the memory of freed tensors for the next ones: no mmap for large blocks, no trim.

    By default glibc maps each block above its (adaptive) mmap threshold afresh and unmaps it when freed, so every
    call that makes a large output, 32 MiB at the CPU grids' largest width, pays the kernel's page faults for it:
    there, fwd+bwd figures moved between 8 and 20 ms from run to run with the allocator's state, for PyTorch's ops
    and lmrt's alike. Kept memory measures the ops, as a caching allocator (jemalloc, tcmalloc, PyTorch's own on
    CUDA) would serve them. Process-wide and for good: the benchmarks run in a process of their own."""
    global malloc_setting
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    int_max = 2**31 - 1
    if libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, int_max) == 1:
        malloc_setting = "glibc mallopt: M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB"


@contextlib.contextmanager
def cpu_settings(device: torch.device, quick: bool) -> Iterator[None]:
    """The CPU runs' settings: keep_freed_memory(), and one CPU thread for --quick (the previous count restored
    after). A smoke run's figures are not for comparison, and its calls are small: on cores that other processes
    share (CI runners), OpenMP's threads wait for each other at every op, which made a tiny training step 50 times
    slower on two busy cores."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        keep_freed_memory()
        if quick:
            torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def timer_for(device: torch.device, quick: bool, cuda_rep_ms: float = 100) -> Timer:
    """On CUDA do_bench with `cuda_rep_ms` of timed calls after a quarter of that of warm-up (its defaults: 100 and
    25); on the CPU a perf_counter loop of about 0.2 s per measurement (0.05 s for --quick)."""
    if device.type == "cuda":
        return cuda_timer(warmup_ms=cuda_rep_ms / 4, rep_ms=cuda_rep_ms)
    return cpu_timer(budget_s=0.05 if quick else 0.2)


def copy_bandwidth_gbps(device: torch.device, timer: Timer, nbytes: int) -> float:
    """The device's copy ceiling: GB/s of copying `nbytes` between two buffers on it (bytes read + written)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median, _, _ = time_one(timer, lambda: dst.copy_(src))
    return 2 * nbytes / (median * 1e-3) / 1e9


def matmul_tflops(device: torch.device, timer: Timer, n: int, dtype: torch.dtype) -> float:
    """The device's compute ceiling: TFLOP/s of an (n, n) @ (n, n) product in `dtype` (2 * n^3 FLOPs)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator, device=device).to(dtype) for _ in range(2))
    median, _, _ = time_one(timer, lambda: a @ b)
    return 2 * n**3 / (median * 1e-3) / 1e12


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """The device's ceilings, measured at the start of a run: a copy of `copy_bytes` between two buffers (GB/s of
    bytes read + written) and an (n, n) @ (n, n) product, n = `matmul_size`, in `matmul_dtype` (2 * n^3 FLOPs)."""

    copy_bandwidth_gbps: float
    copy_bytes: int
    matmul_tflops: float
    matmul_size: int
    matmul_dtype: str

    def meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure_ceilings(device: torch.device, timer: Timer, quick: bool) -> Ceilings:
    """The ceilings of `device`. On CUDA a 1 GiB copy (far beyond L2) and an 8192^2 bfloat16 product (the tensor
    cores' dtype). On the CPU a 128 MiB copy (beyond the last-level cache) and a 1024^2 float32 product: the CPU
    grids run float32, and a CPU without bfloat16 units would make a bfloat16 ceiling meaningless. --quick on the
    CPU: 32 MiB and 512^2, a smoke figure only."""
    if device.type == "cuda":
        copy_bytes, size, dtype = 2**30, 8192, torch.bfloat16
    else:
        copy_bytes, size, dtype = (2**25, 512, torch.float32) if quick else (2**27, 1024, torch.float32)
    print(f"ceilings: {copy_bytes // 2**20} MiB copy, {size}^2 {dtype_str(dtype)} matmul", file=sys.stderr, flush=True)
    copy = copy_bandwidth_gbps(device, timer, copy_bytes)
    return Ceilings(copy, copy_bytes, matmul_tflops(device, timer, size, dtype), size, dtype_str(dtype))


@dataclasses.dataclass(frozen=True)
class Metric:
    """How a row's throughput is counted: `work` (a row key: bytes or FLOPs) per second, in `unit`, stored under
    `rate`, and its fraction of the run's ceiling (the meta key `ceiling`) stored under `fraction`."""

    work: str
    rate: str
    unit: str
    scale: float
    ceiling: str
    fraction: str
    ceiling_label: str

    def fill(self, row: dict[str, Any], ceilings: Ceilings) -> None:
        """Set the row's throughput and fraction of the ceiling from its work and median time."""
        rate = row[self.work] / (row["ms"] * 1e-3) / self.scale
        row.update({self.rate: rate, self.fraction: rate / getattr(ceilings, self.ceiling)})


# Memory-bound ops (the norms, softmax) against the copy ceiling; matmul-bound ones (attention) against the matmul's.
BANDWIDTH = Metric("bytes", "gbps", "GB/s", 1e9, "copy_bandwidth_gbps", "copy_fraction", "copy")
COMPUTE = Metric("flops", "tflops", "TFLOP/s", 1e12, "matmul_tflops", "matmul_fraction", "matmul")


def compile_for_timing(fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """torch.compile(fn, **options), with a backward that may run again with retain_graph=True as the timed
    backward does. Donated buffers (on by default) let a compiled backward reuse its saved tensors' memory,
    which forbids that; turning them off, process-wide, costs the compiled backward a little memory."""
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    return torch.compile(fn, **options)


def raised(error: BaseException) -> str:
    """`error` in one line of a report: its type and the first line of its message."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"raised {type(error).__name__}: {first_line[:300]}"


def compare(
    names: Sequence[str], results: Sequence[Tensor | None], exact: Sequence[Tensor], dtype: torch.dtype,
) -> str | None:
    """None when every result has `dtype` and is within TOLERANCE[dtype] of the exact one, else what is wrong with
    the first bad one, by its name in `names`."""
    tol = TOLERANCE[dtype]
    for name, result, expected in zip(names[: len(results)], results, exact, strict=True):
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


def peak_memory_mb(job: Job, device: torch.device) -> float | None:
    """MiB one call of `job` allocates at its peak beyond what was allocated before it (after its preparation);
    None off CUDA."""
    if device.type != "cuda":
        return None
    with job.context():
        call = job.prepare()
        reset_grads(job.leaves)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        reset_grads(job.leaves)
    return peak / 2**20


def timing_columns(timing: Timing, job: Job, device: torch.device) -> dict[str, Any]:
    """The timing columns of a result row: the Timing of `job`, and its peak memory."""
    median, p20, p80 = timing
    return {"ms": median, "ms_p20": p20, "ms_p80": p80, "peak_memory_mb": peak_memory_mb(job, device)}


def time_call(fn: Callable[[], object], timer: Timer, device: torch.device) -> dict[str, Any]:
    """The timing columns of a result row for `fn` timed alone with `timer`; what it raised, raised again."""
    return timing_columns(time_one(timer, fn), Job(lambda: fn), device)


def set_time_ratios(rows: Sequence[dict[str, Any]], baselines: Collection[str]) -> None:
    """Set each timed row's "time_vs" to {baseline: its time over that baseline's} for each provider named in
    `baselines` that has a timed row among `rows` (rows of one case and mode): below 1 is faster."""
    times = {row["provider"]: row["ms"] for row in rows if row["provider"] in baselines and row["ms"]}
    for row in rows:
        if row["ms"] is not None:
            row["time_vs"] = {name: row["ms"] / ms for name, ms in times.items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_folder(device_type: str, name: str, cpu_capability: str = "") -> str:
    """The results folder of a device: for a GPU its model in lower case ("NVIDIA H100 80GB HBM3" -> "h100",
    "NVIDIA A100-SXM4-80GB" -> "a100", "NVIDIA GeForce RTX 4090" -> "rtx4090"); for a CPU "cpu-", its family and
    the vector instructions torch finds, `cpu_capability` ("Intel(R) Xeon(R) Processor" and "AVX512" ->
    "cpu-xeon-avx512", "AMD EPYC 7763 64-Core Processor" and "AVX2" -> "cpu-epyc-avx2"; "cpu" when the name gives
    no family), since the CPU kernels' speed differs with them, and one family's name (an "AMD EPYC" of Zen 3 or
    Zen 4) covers CPUs with and without AVX-512."""
    if device_type == "cpu":
        words = [re.sub(r"\((r|tm)\)", "", word.lower()) for word in re.split(r"[\s_-]+", name)]
        family = next((w for w in words if w.isalnum() and w not in ("intel", "amd", "genuine", "processor")), "")
        capability = re.sub(r"\W+", "", cpu_capability.lower())
        return "-".join(["cpu", *filter(None, (family, capability))])
    model = []
    for word in re.split(r"[\s_-]+", name):
        if word.lower() in ("nvidia", "geforce", "tesla", "quadro", ""):
            continue
        model.append(word.lower())
        if any(ch.isdigit() for ch in word):
            break
    return "".join(model) or device_type


def results_folder(device: torch.device) -> str:
    """The results folder of `device`, this machine's (device_folder)."""
    capability = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else ""
    return device_folder(device.type, device_name(device), capability)


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


def run_meta(device: torch.device, ceilings: Ceilings, **extra: Any) -> dict[str, Any]:
    """The run's device, versions, date and commit, CPU threads and vector instructions, malloc setting, the
    ceilings it measured, and `extra`."""
    return {
        "device": device_name(device), "device_type": device.type, "torch_version": torch.__version__,
        "triton_version": _triton_version(), "python_version": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": _git_commit(),
        "cpu_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "malloc": malloc_setting, **ceilings.meta(), **extra,
    }


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """A table cell: `value` formatted with `spec`, or "-" for a figure a row does not have."""
    return "-" if value is None else format(value, spec) + suffix


def time_cells(row: dict[str, Any]) -> list[str]:
    """The "ms" and "p20-p80 ms" cells of a result row."""
    spread = "-" if row["ms"] is None else f"{row['ms_p20']:.4g}-{row['ms_p80']:.4g}"
    return [fmt(row["ms"], ".4g"), spread]


def status_cell(row: dict[str, Any]) -> str:
    return "ok" if row["status"] == "ok" else f"{row['status']}: {row['error']}"


def print_table(columns: Sequence[str], cells: Sequence[Sequence[str]], title: str, left: Collection[str]) -> None:
    """Rows of `cells` under `columns` on stdout, the columns named in `left` left-aligned: rich's table when rich is
    installed, else aligned plain text. The last cell of a row is its status; rich highlights those not "ok"."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(line[i]) for line in [columns, *cells]) for i in range(len(columns))]
        print(title)
        for line in [columns, *cells]:
            print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    for line in cells:
        status = line[-1]
        style = {"ok": None, "WRONG": "bold red", "untimed": "dim"}.get(status.split(":")[0], "yellow")
        table.add_row(*line, style=style)
    console = Console()
    if not console.is_terminal:
        # Piped or in CI, rich assumes 80 columns and would elide the figures; a log line may be long.
        console.width = 240
    console.print(table)


def _draw(ax: Any, rows: Sequence[dict[str, Any]], x: str, y: str, ylabel: str, ceiling: tuple[str, float],
          colors: Mapping[str, str], title: str) -> None:
    # In the style of triton.testing.perf_report: `y` against `x`, one line per provider.
    for provider in dict.fromkeys(row["provider"] for row in rows):
        points = sorted((row[x], row[y]) for row in rows if row["provider"] == provider and row[y])
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=provider, color=colors.get(provider))
    ax.axhline(ceiling[1], color="black", linestyle="--", linewidth=1, label=ceiling[0])
    ticks = sorted({row[x] for row in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(tick) for tick in ticks])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def plot_panels(
    path: Path, panels: Sequence[Sequence[tuple[str, Sequence[dict[str, Any]]]]], x: str, y: str, ylabel: str,
    ceiling: tuple[str, float], colors: Mapping[str, str], title: str,
) -> list[Path]:
    """One PNG at `path` of a grid of panels, each (title, result rows): row[y] against row[x] on a log2 axis, one
    line per provider, and the ceiling (label, value) dashed. Nothing, and an empty list, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    n_rows, n_cols = len(panels), max(len(line) for line in panels)
    # Constrained layout leaves room for the suptitle, which tight_layout would draw over the top panels.
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5 * n_cols, 4 * n_rows), squeeze=False, layout="constrained")
    for i, line in enumerate(panels):
        for j, (panel_title, rows) in enumerate(line):
            _draw(axes[i][j], rows, x, y, ylabel, ceiling, colors, panel_title)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def add_output_arguments(parser: argparse.ArgumentParser, written: str) -> None:
    """--out DIR, --save (DIR = the committed results folder of this device) and --no-plot."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, metavar="DIR", help=f"write {written} into DIR")
    where.add_argument("--save", action="store_true",
                       help=f"write them into {RESULTS.relative_to(RESULTS.parents[1])}/<device>/ (cpu-xeon-avx512, "
                       "cpu-epyc-avx2, h100, ...)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (a grid's size)."""
    message = f"expected a positive integer, got {text!r}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if value < 1:
        raise argparse.ArgumentTypeError(message)
    return value


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parser.parse_args(argv), with the folder of --out created: one that cannot be is a usage error now, not an
    OSError once the whole run is done."""
    args = parser.parse_args(argv)
    if getattr(args, "out", None) is not None:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"argument --out: cannot create the folder {str(args.out)!r}: {error.strerror or error}")
    return args


def output_dir(args: argparse.Namespace, device: torch.device) -> Path | None:
    """Where --out or --save asks the results to go, or None."""
    if getattr(args, "save", False):
        return RESULTS / results_folder(device)
    return args.out


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return "" if value is None else value


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """`rows` as CSV, one column per key (in order of first appearance); a dict value such as "time_vs" becomes one
    column per entry ("time_vs_torch")."""
    flat = []
    for row in rows:
        line: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, dict):
                line.update({f"{key}_{name}": _csv_cell(v) for name, v in value.items()})
            else:
                line[key] = _csv_cell(value)
        flat.append(line)
    columns = list(dict.fromkeys(key for line in flat for key in line))
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, columns, restval="")
        writer.writeheader()
        writer.writerows(flat)


def write_report(
    out: Path, name: str, meta: dict[str, Any], results: Sequence[dict[str, Any]],
    plot: Callable[[Path], list[Path]] | None,
) -> None:
    """OUT/NAME.json with `meta` and `results`, OUT/NAME.csv with the results, and OUT/NAME.png from `plot` (given
    that path) unless it is None."""
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"{name}.json"
    report.write_text(json.dumps({"meta": meta, "results": list(results)}, indent=2) + "\n")
    write_csv(out / f"{name}.csv", results)
    written = [report, out / f"{name}.csv"] + ([] if plot is None else plot(out / f"{name}.png"))
    print("wrote " + ", ".join(str(path) for path in written), file=sys.stderr)
