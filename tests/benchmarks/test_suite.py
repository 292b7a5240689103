import csv
import importlib.util
import subprocess
import sys

import pytest

from benchmarks import report, suite
from tests.benchmarks.conftest import META_FIELDS, wrong_rows


def test_quick_run_writes_every_benchmark_with_checked_rows(quick_suite):
    assert sorted(quick_suite.reports) == sorted(f"bench_{name}" for name in suite.BENCHMARKS)
    wrong = []
    for name, written in quick_suite.reports.items():
        meta, rows = written["meta"], written["results"]
        assert all(field in meta for field in META_FIELDS), (name, meta)
        assert meta["copy_bandwidth_gbps"] > 0 and meta["matmul_tflops"] > 0 and meta["quick"], meta
        assert rows and set(meta["providers"]) == {row["provider"] for row in rows}, name
        assert not set(meta["providers"]) & set(meta["skipped"]), meta
        with (quick_suite.out / f"{name}.csv").open() as file:
            assert len(list(csv.DictReader(file))) == len(rows)
        if importlib.util.find_spec("matplotlib") is not None:
            assert (quick_suite.out / f"{name}.png").stat().st_size > 0
        for row in rows:
            if row["status"] == "ok":
                assert row["ms_p20"] <= row["ms"] <= row["ms_p80"], row
                assert set(row["time_vs"]) <= set(meta["pytorch_providers"]), row
            else:
                assert row["ms"] is None and row["error"], row
        wrong += wrong_rows(rows)
    assert not wrong, [(row["provider"], row["error"]) for row in wrong]
    assert quick_suite.status == 0


def test_quick_run_compares_every_provider_it_lists(quick_suite):
    for name in ("bench_layer_norm", "bench_rms_norm", "bench_softmax", "bench_attention"):
        meta, rows = quick_suite.reports[name]["meta"], quick_suite.reports[name]["results"]
        assert {row["mode"] for row in rows} == {"fwd", "bwd", "fwd+bwd"}, name
        assert "naive" in meta["providers"] and "compile" in meta["skipped"], meta
        assert any(p.startswith("lmrt-") for p in meta["providers"]), meta
        # Every lmrt backend is either measured or skipped with its reason.
        for provider in ("lmrt-triton", "lmrt-cuda", "lmrt-cpp"):
            assert provider in meta["providers"] or meta["skipped"][provider], (name, provider)
        metric = report.OPS[name].metric
        timed = [row for row in rows if row["status"] == "ok"]
        assert timed and all(row[metric.rate] > 0 and row[metric.fraction] > 0 for row in timed), name
    attention = quick_suite.reports["bench_attention"]["meta"]
    assert {"sdpa-flash", "sdpa-math"} <= set(attention["pytorch_providers"])


def test_report_renders_the_quick_run(quick_suite, tmp_path):
    results = tmp_path / "results"
    (results / "cpu").mkdir(parents=True)
    for path in quick_suite.out.iterdir():
        (results / "cpu" / path.name).write_bytes(path.read_bytes())
    text, headlines = report.render(results, tmp_path / "docs" / "BENCHMARKS.md")

    for title in ("Attention", "LayerNorm", "RMSNorm", "Softmax", "End to end: training steps and generation"):
        assert f"### {title}" in text
    assert "![bench_softmax](../results/cpu/bench_softmax.png)" in text
    assert "| mode | dtype | N | " in text and "lmrt speed-up" in text
    softmax = next(line for line in headlines if line.startswith("- Softmax, lmrt's speed-up"))
    # The file it was read from, marked as a smoke run's (not the committed benchmarks/results/ one).
    assert softmax.endswith(f"(`{results / 'cpu' / 'bench_softmax.json'}`, a --quick run)"), softmax


def test_unknown_benchmark_is_a_user_error():
    with pytest.raises(ValueError, match="unknown benchmark 'norms'; the benchmarks are attention, layer_norm"):
        suite.run(["norms"])


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], capture_output=True, text=True, check=True)
    assert "attention, layer_norm, rms_norm, softmax, model" in done.stdout and "--budget" in done.stdout
