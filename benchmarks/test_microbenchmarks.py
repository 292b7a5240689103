"""Quick microbenchmarks for pytest-benchmark: each op's timed providers on its quick grid's largest case, forward
and forward+backward, each provider checked against the float64 reference before it is timed.

    pytest benchmarks --benchmark-only [-q] [--benchmark-json FILE] [--benchmark-compare]

The same providers, cases and check as `python -m benchmarks --quick` (benchmarks/harness.py), timed by
pytest-benchmark instead: a fixed number of rounds, the gradients reset before each, CUDA synchronized after each
call. Untimed providers (the Triton interpreter on a CPU) and torch.compile are left out; a provider that refuses
the case is skipped with the reason, one that is wrong fails.
"""

import pytest
import torch

from benchmarks import bench_attention, bench_layer_norm, bench_rms_norm, bench_softmax, common, harness

pytest.importorskip("pytest_benchmark")

DEVICE = common.default_device()
ROUNDS = 20
MODES = ("fwd", "fwd+bwd")


@pytest.fixture(autouse=True, scope="module")
def quick_cpu_settings():
    """`--quick`'s settings (one CPU thread): without them, two threads on busy cores made a 30 us softmax 8 ms."""
    with common.cpu_settings(DEVICE, quick=True):
        yield


def _params():
    for module in (bench_attention, bench_layer_norm, bench_rms_norm, bench_softmax):
        bench = module.BENCHMARK
        providers, _ = bench.providers(DEVICE, compile_skip="microbenchmarks are not compiled")
        for provider in providers:
            if provider.untimed is None:
                for mode in MODES:
                    yield pytest.param(bench, provider, mode, id=f"{bench.name}-{mode}-{provider.name}")


@pytest.mark.parametrize("bench,provider,mode", list(_params()))
def test_op(benchmark, bench, provider, mode):
    point = bench.points(bench.parser().parse_args(["--quick"]), DEVICE)[-1]
    case = point.make()
    exact = harness.run_once(bench.reference, case.as_float64(), grads=mode != "fwd")
    failure = harness.check_provider(provider, case, exact, [mode])[mode]
    if failure is not None and failure[0] == "unsupported":
        pytest.skip(failure[1])
    assert failure is None, failure[1]

    benchmark.group = f"{bench.name} {mode} " + " ".join(f"{k}={v}" for k, v in point.shape.items())
    benchmark.extra_info[bench.metric.work] = point.work(mode)
    with provider.context():
        call = harness.timed_call(provider, case, mode)

        def timed():
            call()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize(DEVICE)

        benchmark.pedantic(timed, setup=lambda: common.reset_grads(case.leaves), rounds=ROUNDS, warmup_rounds=2)
