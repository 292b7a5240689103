import contextlib
import csv
import math
import time

import pytest
import torch

from benchmarks import common


@pytest.mark.parametrize("name,folder", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("Tesla T4", "t4"),
])
def test_device_folder(name, folder):
    assert common.device_folder("cuda", name) == folder


@pytest.mark.parametrize("name,capability,folder", [
    ("Intel(R) Xeon(R) Processor", "AVX512", "cpu-xeon-avx512"), ("AMD EPYC", "AVX2", "cpu-epyc-avx2"),
    ("AMD EPYC", "AVX512", "cpu-epyc-avx512"), ("AMD EPYC 7763 64-Core Processor", "AVX2", "cpu-epyc-avx2"),
    ("Intel(R) Core(TM) i9-13900K", "AVX2", "cpu-core-avx2"), ("Neoverse-V2", "SVE256", "cpu-neoverse-sve256"),
    ("", "DEFAULT", "cpu-default"), ("AMD EPYC", "", "cpu-epyc"), ("", "", "cpu"),
])
def test_cpu_folder_names_the_family_and_vector_instructions(name, capability, folder):
    assert common.device_folder("cpu", name, capability) == folder


def test_results_folder_of_this_cpu():
    folder = common.results_folder(torch.device("cpu"))
    assert folder.startswith("cpu") and folder.endswith(torch.backends.cpu.get_cpu_capability().lower())


def test_time_ratios_to_each_pytorch_provider():
    rows = [{"provider": "lmrt-cpp", "ms": 1.0}, {"provider": "torch", "ms": 2.0}, {"provider": "compile", "ms": None},
            {"provider": "naive", "ms": 4.0}]
    common.set_time_ratios(rows, ["torch", "compile"])
    assert [row.get("time_vs") for row in rows] == [{"torch": 0.5}, {"torch": 1.0}, None, {"torch": 2.0}]


def test_csv_flattens_ratios_and_shapes(tmp_path):
    rows = [{"provider": "a", "check_shape": [1, 2], "time_vs": {"torch": 0.5}, "ms": None},
            {"provider": "b", "check_shape": [3, 4], "time_vs": {}, "ms": 1.5}]
    common.write_csv(tmp_path / "rows.csv", rows)
    with (tmp_path / "rows.csv").open() as file:
        assert list(csv.DictReader(file)) == [
            {"provider": "a", "check_shape": "1x2", "time_vs_torch": "0.5", "ms": ""},
            {"provider": "b", "check_shape": "3x4", "time_vs_torch": "", "ms": "1.5"},
        ]


def test_cpu_timer_interleaves_jobs_and_reports_each_failure():
    calls = []

    def job(name):
        return common.Job(lambda: lambda: calls.append(name))

    def unprepared():
        raise RuntimeError("no such case")

    def fails_when_timed():
        def call():
            if len(calls) > 2:
                raise ValueError("out of memory")

        return call

    # apart=inf: the calls are list appends of ~100 ns, whose warm timings differ by over the default 4x now and then
    # on a loaded host, which would time one of them on its own (test_cpu_timer_times_a_much_slower_job_apart).
    timer = common.cpu_timer(budget_s=0.01, warmup=1, min_reps=5, max_reps=50, rounds=5, apart=math.inf)
    a, b, missing, late = timer([job("a"), job("b"), common.Job(unprepared), common.Job(fails_when_timed)])

    assert isinstance(missing, RuntimeError) and isinstance(late, ValueError)
    assert all(isinstance(timing, tuple) and timing[1] <= timing[0] <= timing[2] for timing in (a, b)), (a, b)
    timed = calls[2:]  # after one warm-up call each
    assert timed.count("a") >= 5 and timed.count("b") >= 5
    # Interleaved: the two jobs' calls alternate in runs, rather than all of one job's calls coming first.
    switches = sum(first != second for first, second in zip(timed, timed[1:], strict=False))
    assert switches >= 4, timed


def test_cpu_timer_times_a_much_slower_job_apart():
    calls = []

    def job(name, seconds):
        def call():
            time.sleep(seconds)
            calls.append(name)

        return common.Job(lambda: call)

    # Three warm-up calls: the timer goes by the quickest, so one stalled call of the fast job on a busy host
    # (CI saw one take over 0.5 ms) leaves it well under a quarter of the slow job's.
    timer = common.cpu_timer(budget_s=0.02, warmup=3, min_reps=5, max_reps=20, rounds=4)
    timings = timer([job("slow", 5e-3), job("fast", 0.0)])

    assert all(isinstance(timing, tuple) for timing in timings)
    timed = calls[6:]  # after the warm-up calls
    # The slow job's warm calls took over 4x the fast one's: its calls come after all of the fast job's.
    assert timed.count("slow") >= 5 and "fast" not in timed[timed.index("slow"):], timed


def test_cpu_timer_keeps_a_job_whose_warm_up_call_stalled_with_the_others():
    calls = []

    def job(name, stall_on_call):
        def call():
            calls.append(name)
            # 2 ms a call: long enough that a loaded host's late wake-ups keep the jobs' quickest warm calls within
            # 4x. The stall: the core taken away for 20 ms, in the last warm-up call.
            time.sleep(0.02 if calls.count(name) == stall_on_call else 2e-3)

        return common.Job(lambda: call)

    timer = common.cpu_timer(budget_s=0.02, warmup=3, min_reps=5, max_reps=20, rounds=4)
    timer([job("stalled", stall_on_call=3), job("other", stall_on_call=0)])

    timed = calls[6:]  # after three warm-up calls each
    # Timed together, in rounds that alternate the order: a job timed apart would give a single switch.
    switches = sum(first != second for first, second in zip(timed, timed[1:], strict=False))
    assert switches >= 2, timed


def test_a_job_prepares_and_runs_in_its_context():
    entered = []

    @contextlib.contextmanager
    def context():
        entered.append(True)
        yield
        entered.pop()

    def prepare():
        assert entered, "prepared outside its context"
        return lambda: None if entered else pytest.fail("called outside its context")

    (timing,) = common.cpu_timer(budget_s=0.001, warmup=1, min_reps=3)([common.Job(prepare, context=context)])
    assert isinstance(timing, tuple)
