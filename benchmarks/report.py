"""docs/BENCHMARKS.md from the committed results (benchmarks/results/<device>/*.json), and the README's headline
lines, printed.

    python -m benchmarks.report [--results DIR] [--out FILE]        (default: benchmarks/results, docs/BENCHMARKS.md)

Per device folder: the device, versions, date, commit and ceilings of each run, and per benchmark a summary table
with links to its plot, JSON and CSV. An op's table has a line per case (mode, dtype and the op's other keys) at the
largest size of its grid: each provider's throughput, and the speed-up of the fastest lmrt provider over the
fastest PyTorch provider (its time over lmrt's: above 1, lmrt is faster), at that size and as the geometric mean
over every size. bench_model's tables give tokens/s, MFU and the same speed-up per model, for training steps and
for generation. Older result files are read too: the attention JSON of before the suite (its rows have the same
keys) and scripts/gpt2_small_check.py's gpt2_small_check.json (GPT-2 small, Triton against the torch backend).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import bench_attention, bench_layer_norm, bench_rms_norm, bench_softmax, common, harness

OPS: dict[str, harness.OpBenchmark] = {
    f"bench_{module.BENCHMARK.name}": module.BENCHMARK
    for module in (bench_attention, bench_layer_norm, bench_rms_norm, bench_softmax)
}
TITLES = {"bench_attention": "Attention", "bench_layer_norm": "LayerNorm", "bench_rms_norm": "RMSNorm",
          "bench_softmax": "Softmax", "bench_model": "End to end: training steps and generation"}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def load(path: Path) -> dict[str, Any]:
    """A results file as {"meta", "results"}, older formats converted."""
    report = json.loads(path.read_text())
    if path.stem == "gpt2_small_check":
        return _from_gpt2_small_check(report)
    meta = report["meta"]
    if "pytorch_providers" not in meta:  # written before the suite: the PyTorch providers by name
        names = dict.fromkeys(row["provider"] for row in report["results"])
        meta["pytorch_providers"] = [n for n in names if n in ("torch", "compile") or n.startswith("sdpa-")]
    meta.setdefault("skipped", {})
    return report


def _from_gpt2_small_check(report: dict[str, Any]) -> dict[str, Any]:
    """scripts/gpt2_small_check.py's summary as bench_model rows: the triton run as `lmrt`, the torch backend's
    as `torch-eager` (its float32 run too, as `torch-eager float32`)."""
    meta = {"device": report["device"], "torch_version": report["torch"], "triton_version": report["triton"],
            "date": report["date"], "git_commit": None, "pytorch_providers": ["torch-eager"], "skipped": {},
            "source": "scripts/gpt2_small_check.py (before bench_model): lmrt against the torch backend only"}
    rows = []
    for run in report["runs"]:
        name = "lmrt" if run["backend"] == "triton" else "torch-eager"
        name += "" if run["dtype"] == "bfloat16" else f" {run['dtype']}"
        rows.append({"task": "train", "model": "gpt2-small", "batch": report["batch"], "context": report["context"],
                     "dtype": run["dtype"], "provider": name, "status": "ok", "ms": run["step_seconds"] * 1e3,
                     "tokens_per_second": run["tokens_per_second"], "mfu": run["mfu"], "matmul_fraction": None})
    generation = report["generation"]
    rows.append({"task": "generate", "model": "gpt2-small", "provider": "lmrt", "status": "ok",
                 "new_tokens": generation["new_tokens"], "prompt_tokens": 64,
                 "ms": generation["new_tokens"] / generation["cached_tokens_per_second"] * 1e3,
                 "tokens_per_second": generation["cached_tokens_per_second"],
                 "same_as_recompute": generation["identical_leading_tokens"]})
    return {"meta": meta, "results": rows}


def _geomean(values: Sequence[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def speedup(rows: Sequence[dict[str, Any]], pytorch: Sequence[str]) -> float | None:
    """The fastest PyTorch provider's time over the fastest lmrt provider's among `rows` (one case), or None."""
    lmrt = [row["ms"] for row in rows if row["provider"].startswith("lmrt") and row.get("ms")]
    torch_ = [row["ms"] for row in rows if row["provider"] in pytorch and row.get("ms")]
    return min(torch_) / min(lmrt) if lmrt and torch_ else None


def _cell(row: dict[str, Any] | None, key: str, spec: str) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    return "-" if row.get(key) is None else format(row[key], spec)


def _times(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(line) + " |" for line in lines], ""]


def op_cases(bench: harness.OpBenchmark, results: Sequence[dict[str, Any]]
             ) -> dict[tuple[Any, ...], dict[Any, list[dict[str, Any]]]]:
    """{case key (mode, then the panel keys): {size: the rows of that case and size}}."""
    keys = ("mode", *[k for k in (*bench.panel_rows, *bench.panel_cols) if k != "mode"])
    cases: dict[tuple[Any, ...], dict[Any, list[dict[str, Any]]]] = {}
    for row in results:
        cases.setdefault(tuple(row[k] for k in keys), {}).setdefault(row[bench.x], []).append(row)
    return cases


def op_section(bench: harness.OpBenchmark, report: dict[str, Any]) -> list[str]:
    meta, results = report["meta"], report["results"]
    pytorch = meta["pytorch_providers"]
    rate = bench.metric.rate
    providers = list(dict.fromkeys(row["provider"] for row in results))
    keys = ("mode", *[k for k in (*bench.panel_rows, *bench.panel_cols) if k != "mode"])
    lines = []
    for case, sizes in op_cases(bench, results).items():
        largest = max(sizes)
        by_provider = {row["provider"]: row for row in sizes[largest]}
        per_size = [s for s in (speedup(rows, pytorch) for rows in sizes.values()) if s is not None]
        lines.append([*[harness.label(k, v) if isinstance(v, bool) else str(v) for k, v in zip(keys, case,
                                                                                               strict=True)],
                      str(largest), *[_cell(by_provider.get(name), rate, ".4g") for name in providers],
                      _times(speedup(sizes[largest], pytorch)), _times(_geomean(per_size))])
    header = [*keys, bench.x, *[f"{name} {bench.metric.unit}" for name in providers], "lmrt speed-up",
              f"over all {bench.x}"]
    return _markdown_table(header, lines)


def model_section(report: dict[str, Any]) -> list[str]:
    meta, results = report["meta"], report["results"]
    pytorch = meta["pytorch_providers"]
    out = []
    for task, title in (("train", "Training steps"), ("generate", "Greedy generation, KV cache, batch 1")):
        rows = [row for row in results if row["task"] == task]
        if not rows:
            continue
        lines = []
        for model in dict.fromkeys(row["model"] for row in rows):
            group = [row for row in rows if row["model"] == model]
            gain = _times(speedup(group, pytorch))
            for row in group:
                shape = (f"{row['batch']}x{row['context']} {row['dtype']}" if task == "train"
                         else f"{row['prompt_tokens']}+{row['new_tokens']}")
                extra = ([_cell(row, "mfu", ".1%"), _cell(row, "matmul_fraction", ".1%")] if task == "train"
                         else [_cell(row, "same_as_recompute", "d")])
                lines.append([model, shape, row["provider"], _cell(row, "tokens_per_second", ",.0f"), *extra,
                              gain if row["provider"].startswith("lmrt") else ""])
        extra_header = ["MFU", "% matmul ceiling"] if task == "train" else ["same tokens as recompute"]
        out += [f"{title}:", "", *_markdown_table(
            ["model", "batch x context" if task == "train" else "prompt+new", "provider", "tokens/s", *extra_header,
             "lmrt speed-up"], lines)]
    return out


def _run_line(meta: dict[str, Any]) -> str:
    commit = (meta.get("git_commit") or "")[:10] or "unknown"
    parts = [f"{meta.get('date', '?')}", f"commit {commit}", f"torch {meta.get('torch_version')}",
             f"triton {meta.get('triton_version')}"]
    if meta.get("cpu_threads") and meta.get("device_type") == "cpu":
        parts.append(f"{meta['cpu_threads']} threads")
    if meta.get("malloc"):
        parts.append(meta["malloc"])
    if meta.get("copy_bandwidth_gbps"):
        parts.append(f"copy ceiling {meta['copy_bandwidth_gbps']:.4g} GB/s")
    if meta.get("matmul_tflops"):
        parts.append(f"matmul ceiling {meta['matmul_tflops']:.4g} TFLOP/s ({meta.get('matmul_dtype')} "
                     f"{meta.get('matmul_size')}^2)")
    return "Measured " + ", ".join(parts) + "."


def headline(folder: str, reports: dict[str, dict[str, Any]]) -> list[str]:
    """The README's lines for one device, whose reports are in `folder` (as shown): per op and mode, the geometric
    mean over the cases at the grid's largest size of lmrt's speed-up over the fastest PyTorch provider; per model,
    the training step's. Each line cites its file, marked when it holds a --quick run (not for comparison)."""
    lines = []
    for stem, report in reports.items():
        pytorch = report["meta"]["pytorch_providers"]
        source = f"`{folder}/{stem}.json`" + (", a --quick run" if report["meta"].get("quick") else "")
        if stem in OPS:
            bench = OPS[stem]
            by_mode: dict[str, list[float]] = {}
            for case, sizes in op_cases(bench, report["results"]).items():
                gain = speedup(sizes[max(sizes)], pytorch)
                if gain is not None:
                    by_mode.setdefault(case[0], []).append(gain)
            figures = ", ".join(f"{mode} {_geomean(gains):.2f}x" for mode, gains in by_mode.items())
            lines.append(f"- {TITLES[stem]}, lmrt's speed-up over the fastest PyTorch provider at the largest size: " +
                         (figures or "no timed lmrt provider") +
                         f" ({source})")
        elif "task" in (report["results"] or [{}])[0]:
            for model in dict.fromkeys(row["model"] for row in report["results"] if row["task"] == "train"):
                group = [r for r in report["results"] if r["task"] == "train" and r["model"] == model]
                lmrt = max((r for r in group if r["provider"].startswith("lmrt") and r.get("tokens_per_second")),
                           key=lambda r: r["tokens_per_second"], default=None)
                gain = speedup(group, pytorch)
                if lmrt is None or gain is None:
                    lines.append(f"- {model} training step: no timed lmrt provider ({source})")
                else:
                    mfu = f", MFU {lmrt['mfu']:.1%}" if lmrt.get("mfu") else ""
                    lines.append(f"- {model} training step: {lmrt['tokens_per_second']:,.0f} tokens/s{mfu}, "
                                 f"{gain:.2f}x the fastest PyTorch provider ({', '.join(pytorch)}) "
                                 f"({source})")
    return lines


def device_reports(folder: Path) -> dict[str, dict[str, Any]]:
    """The benchmark reports in `folder` by file stem: the suite's, then the older ones."""
    known = [*OPS, "bench_model", "gpt2_small_check"]
    return {stem: load(folder / f"{stem}.json") for stem in known if (folder / f"{stem}.json").is_file()}


def _shown(path: Path) -> str:
    """`path` relative to the repository when it lies inside it."""
    root = common.RESULTS.parents[1]
    resolved = path.resolve()
    return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(path)


def render(results_dir: Path, out: Path) -> tuple[str, list[str]]:
    """The Markdown of docs/BENCHMARKS.md, and the README's headline lines."""
    link = Path(os.path.relpath(results_dir.resolve(), out.resolve().parent))
    text = ["# Benchmarks", "",
            f"Generated by `python -m benchmarks.report` from the results committed under `{_shown(results_dir)}/`; "
            "regenerate it rather than editing it. How the figures are measured: `benchmarks/harness.py` (providers, "
            "the check against the float64 reference before timing, modes, timers), `benchmarks/common.py` (ceilings), "
            "the byte and FLOP formulas in each `benchmarks/bench_<op>.py`, and `benchmarks/bench_model.py`.", "",
            "In the op tables, a provider's column holds its throughput at the grid's largest size, or its status "
            "(`WRONG`, `unsupported`, `untimed`: the Triton interpreter on a CPU). `lmrt speed-up` is the fastest "
            "PyTorch provider's time over the fastest lmrt provider's (above 1, lmrt is faster), at that size and as "
            "the geometric mean over all sizes.", ""]
    headlines = []
    for folder in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        reports = device_reports(folder)
        others = sorted(p.name for p in folder.iterdir() if p.suffix == ".md")
        if not reports and not others:
            continue
        device = next(iter(reports.values()))["meta"]["device"] if reports else folder.name
        text += [f"## {device} (`{folder.name}/`)", ""]
        lines = headline(_shown(folder), reports)
        if lines:
            headlines += [f"{device} ({folder.name}):", *lines]
            text += ["Headline:", "", *lines, ""]
        for stem, report in reports.items():
            meta = report["meta"]
            title = TITLES.get(stem, "End to end: GPT-2 small")
            files = [f"[{kind}]({(link / folder.name / f'{stem}.{kind}').as_posix()})" for kind in ("json", "csv")
                     if (folder / f"{stem}.{kind}").is_file()]
            text += [f"### {title}", "", _run_line(meta) + " " + " ".join(files), ""]
            if meta.get("source"):
                text += [f"From {meta['source']}.", ""]
            if (folder / f"{stem}.png").is_file():
                text += [f"![{stem}]({(link / folder.name / f'{stem}.png').as_posix()})", ""]
            text += op_section(OPS[stem], report) if stem in OPS else model_section(report)
            if meta["skipped"]:
                text += ["Skipped: " + "; ".join(f"`{name}`: {why}" for name, why in meta["skipped"].items()) + ".",
                         ""]
            if meta.get("not_run"):
                text += [f"Not run: {meta['not_run']}.", ""]
        if others:
            text += ["Other results here: " + ", ".join(f"[{name}]({(link / folder.name / name).as_posix()})"
                                                         for name in others), ""]
    return "\n".join(text).rstrip() + "\n", headlines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=common.RESULTS, help="default: %(default)s")
    parser.add_argument("--out", type=Path, default=DOCS, help="default: %(default)s")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"--results {args.results} is not a folder")
    text, headlines = render(args.results, args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}\n\nThe README's headline figures (from {args.out.name}):\n")
    print("\n".join(headlines))


if __name__ == "__main__":
    main()
