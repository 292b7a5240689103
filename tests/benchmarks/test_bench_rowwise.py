import argparse
import functools

import pytest
import torch
import torch.nn.functional as F

import lmrt
from benchmarks import bench_layer_norm, bench_rms_norm, bench_softmax, common, harness
from benchmarks.harness import MODES, Provider
from tests.conftest import DEVICE

LAYER_NORM, RMS_NORM, SOFTMAX = bench_layer_norm.BENCHMARK, bench_rms_norm.BENCHMARK, bench_softmax.BENCHMARK
CEILINGS = common.Ceilings(1.0, 1, 1.0, 1, "float32")


def _untimeable(jobs):
    raise AssertionError("a WRONG provider must not be timed")


def _verdicts(bench, provider, rows=64, cols=128, device=DEVICE):
    case = bench.make_case(rows, cols, torch.float32, torch.device(device))
    exact = harness.run_once(bench.reference, case.as_float64(), grads=True)
    return case, harness.check_provider(provider, case, exact, MODES)


def test_wrong_output_is_reported_and_not_timed():
    wrong = Provider("wrong", lambda *args: F.layer_norm(*args) * 1.01)
    case, verdicts = _verdicts(LAYER_NORM, wrong)

    assert all(v[0] == "WRONG" and v[1].startswith("output:") for v in verdicts.values()), verdicts
    (row,) = harness.measure({"bytes": 1}, [wrong], case, "fwd", [verdicts["fwd"]], _untimeable, common.BANDWIDTH,
                             CEILINGS)
    assert row["status"] == "WRONG" and row["ms"] is None and row["gbps"] is None, row


def test_wrong_gradient_is_reported_and_not_timed():
    def right_forward_wrong_backward(x, dim):
        # Equal to softmax in value, but the gradient with respect to x is dy itself.
        return F.softmax(x.detach(), dim) + (x - x.detach())

    _, verdicts = _verdicts(SOFTMAX, Provider("wrong", right_forward_wrong_backward))

    assert verdicts["fwd"] is None
    assert verdicts["bwd"] == verdicts["fwd+bwd"] and verdicts["bwd"][1].startswith("grad_input:"), verdicts


def test_a_provider_that_raises_is_wrong_and_a_broken_backward_leaves_the_forward_checked():
    def broken(*args):
        raise RuntimeError("no kernel for this shape")

    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, shape, weight, eps):
            return F.rms_norm(x, shape, weight, eps)

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("no backward kernel")

    _, raising = _verdicts(RMS_NORM, Provider("broken", broken))
    _, forward_only = _verdicts(RMS_NORM, Provider("half", NoBackward.apply))

    assert all(v == ("WRONG", "raised RuntimeError: no kernel for this shape") for v in raising.values()), raising
    assert forward_only["fwd"] is None and forward_only["bwd"][1] == "raised RuntimeError: no backward kernel"


def test_an_lmrt_backend_that_lacks_the_case_is_unsupported():
    # The cuda backend cannot serve CPU tensors, as a backend lacking a head dim cannot serve that call.
    _, verdicts = _verdicts(SOFTMAX, Provider("lmrt-cuda", lmrt.ops.softmax, functools.partial(lmrt.backend, "cuda")),
                            device="cpu")

    assert verdicts["fwd"][0] == "unsupported" and "cannot serve this call" in verdicts["fwd"][1], verdicts


def test_the_right_provider_is_timed_with_its_throughput():
    right = Provider("torch", F.softmax, pytorch=True)
    case, verdicts = _verdicts(SOFTMAX, right)
    (row,) = harness.measure({"bytes": 4e6}, [right], case, "fwd+bwd", [verdicts["fwd+bwd"]],
                             lambda jobs: [(2.0, 1.0, 3.0)] * len(jobs), common.BANDWIDTH, CEILINGS)

    assert row["status"] == "ok" and row["gbps"] == pytest.approx(2.0) and row["copy_fraction"] == pytest.approx(2.0)


@pytest.mark.parametrize("bench", [LAYER_NORM, RMS_NORM, SOFTMAX], ids=lambda bench: bench.name)
def test_providers_and_grid(bench):
    found, skipped = bench.providers(torch.device("cpu"), compile_skip=None)
    names = [provider.name for provider in found]
    assert names[-3:] == ["torch", "naive", "compile"] and "lmrt-cuda" in skipped, (names, skipped)
    assert [provider.name for provider in found if provider.pytorch] == ["torch", "compile"]

    args = argparse.Namespace(quick=False, rows=8, cols=[16, 32], dtypes=["bfloat16"])
    points = bench.points(args, torch.device("cpu"))
    assert [point.shape for point in points] == [{"dtype": "bfloat16", "M": 8, "N": n} for n in (16, 32)]
    assert points[0].work("fwd+bwd") == points[0].work("fwd") + points[0].work("bwd")


def test_bytes_moved():
    m, n = 4096, 1024
    assert SOFTMAX.bytes_moved("fwd", m, n, torch.bfloat16) == 2 * m * n * 2
    assert SOFTMAX.bytes_moved("bwd", m, n, torch.float32) == 3 * m * n * 4
    assert LAYER_NORM.bytes_moved("fwd", m, n, torch.float32) == (2 * m * n + 2 * n) * 4 + 2 * m * 4
    assert LAYER_NORM.bytes_moved("bwd", m, n, torch.float32) == (3 * m * n + 3 * n) * 4 + 2 * m * 4
    assert RMS_NORM.bytes_moved("fwd", m, n, torch.bfloat16) == (2 * m * n + n) * 2 + m * 4
    assert RMS_NORM.bytes_moved("bwd", m, n, torch.bfloat16) == (3 * m * n + 2 * n) * 2 + m * 4
