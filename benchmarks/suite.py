"""The benchmark suite: the op benchmarks and bench_model in one run, sharing the ceilings measured at its start.

    python -m benchmarks [NAME ...] [--quick] [--out DIR | --save] [--no-plot] [--no-compile] [--budget SECONDS]
    lmrt bench [NAME ...] [--quick] [--out DIR | --save]

NAME: attention, layer_norm, rms_norm, softmax, model (default: all, in that order). --quick runs the smoke grids
(under a minute on a 2-core CPU, correctness checks included); --save writes into benchmarks/results/<device>/, the
committed figures. With --budget, each benchmark gets a share of the seconds left (BUDGET_SHARES) and starts no new
point of its grid once its share is spent; what it left out is recorded in its meta's "not_run". The exit status
is 1 when any provider is WRONG.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import common

BENCHMARKS = {"attention": "benchmarks.bench_attention", "layer_norm": "benchmarks.bench_layer_norm",
              "rms_norm": "benchmarks.bench_rms_norm", "softmax": "benchmarks.bench_softmax",
              "model": "benchmarks.bench_model"}
# Relative shares of --budget: attention's grid and the models' compilations cost the most.
BUDGET_SHARES = {"attention": 3, "layer_norm": 1, "rms_norm": 1, "softmax": 1, "model": 3}


def run(names: Sequence[str] = (), quick: bool = False, out: Path | str | None = None, save: bool = False,
        no_plot: bool = False, no_compile: bool = False, budget: float | None = None) -> int:
    """Run the benchmarks `names` (all when empty) and return the exit status: 1 when a provider was WRONG."""
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; the benchmarks are {', '.join(BENCHMARKS)}")
    names = list(names) or list(BENCHMARKS)
    if out is not None:  # before the run, not once it is done
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(f"cannot create the output folder {str(out)!r}: {error.strerror or error}") from error
    device = common.default_device()
    with common.cpu_settings(device, quick):
        ceilings = common.measure_ceilings(device, common.timer_for(device, quick), quick)
    argv = (["--quick"] if quick else []) + (["--out", str(out)] if out is not None else []) + \
        (["--save"] if save else []) + (["--no-plot"] if no_plot else []) + (["--no-compile"] if no_compile else [])
    start, wrong, seconds = time.monotonic(), [], {}
    for index, name in enumerate(names):
        began = time.monotonic()
        deadline = None
        if budget is not None:
            left = budget - (began - start)
            deadline = began + left * BUDGET_SHARES[name] / sum(BUDGET_SHARES[n] for n in names[index:])
        rows = importlib.import_module(BENCHMARKS[name]).main(argv, ceilings=ceilings, deadline=deadline)
        seconds[name] = time.monotonic() - began
        wrong += [f"{name} {row.get('mode') or row.get('task')} {row['provider']}: {row['error']}"
                  for row in rows if row["status"] == "WRONG"]
    print("benchmark seconds: " + ", ".join(f"{name} {s:.0f}" for name, s in seconds.items()) +
          f"; total {time.monotonic() - start:.0f}", file=sys.stderr)
    if wrong:
        print(f"{len(wrong)} WRONG rows:\n  " + "\n  ".join(dict.fromkeys(wrong)), file=sys.stderr)
    return 1 if wrong else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="the smoke grids")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile providers")
    parser.add_argument("--budget", type=float, metavar="SECONDS", help="stop starting new points after this long")
    common.add_output_arguments(parser, "each benchmark's JSON, CSV and PNG")
    args = common.parse_arguments(parser, argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        # Checked here rather than by `choices`, which argparse would also apply to the empty default.
        parser.error(f"argument NAME: invalid choice: {unknown[0]!r} (choose from {', '.join(BENCHMARKS)})")
    return run(args.names, args.quick, args.out, args.save, args.no_plot, args.no_compile, args.budget)
