from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks.bench_norms import Provider, bytes_moved, exact_results, main, make_case, measure
from tests.benchmarks.quick_run import run_quick
from tests.conftest import DEVICE


def test_quick_run_writes_correct_timed_rows(tmp_path):
    results = run_quick(main, "bench_norms", tmp_path, ceilings=["copy_bandwidth_gbps"])

    assert {"lmrt", "torch", "naive"} <= {row["provider"] for row in results}
    assert {(row["op"], row["mode"]) for row in results} == {
        (op, mode) for op in ("layer_norm", "rms_norm", "softmax") for mode in ("fwd", "bwd")
    }
    for row in results:
        assert row["status"] == "ok", row
        assert row["ms"] > 0 and row["gbps"] > 0, row
        assert row["ms_p20"] <= row["ms"] <= row["ms_p80"], row
        assert row["time_vs_torch"] > 0, row


def _untimeable(fn, grad_to_none):
    raise AssertionError("a WRONG provider must not be timed")


def test_wrong_output_is_reported_and_not_timed():
    case = make_case("layer_norm", 64, 128, torch.float32, torch.device(DEVICE))
    wrong = Provider("wrong", SimpleNamespace(layer_norm=lambda *args: F.layer_norm(*args) * 1.01))

    row = measure(case, wrong, "fwd", exact_results(case), _untimeable, copy_gbps=1.0)

    assert row["status"] == "WRONG" and row["error"].startswith("output:"), row
    assert row["ms"] is None and row["gbps"] is None


def test_wrong_gradient_is_reported_and_not_timed():
    def right_forward_wrong_backward(x, dim):
        # Equal to softmax in value, but the gradient with respect to x is dy itself.
        return F.softmax(x.detach(), dim) + (x - x.detach())

    case = make_case("softmax", 64, 128, torch.float32, torch.device(DEVICE))
    wrong = Provider("wrong", SimpleNamespace(softmax=right_forward_wrong_backward))
    exact = exact_results(case)

    assert measure(case, wrong, "fwd", exact, lambda fn, grads: (1.0, 1.0, 1.0), copy_gbps=1.0)["status"] == "ok"
    row = measure(case, wrong, "bwd", exact, _untimeable, copy_gbps=1.0)
    assert row["status"] == "WRONG" and row["error"].startswith("grad_input:"), row


def test_a_provider_that_raises_is_reported_wrong():
    def broken(*args):
        raise RuntimeError("no kernel for this shape")

    case = make_case("rms_norm", 8, 32, torch.float32, torch.device(DEVICE))
    row = measure(case, Provider("broken", SimpleNamespace(rms_norm=broken)), "fwd", exact_results(case),
                  _untimeable, copy_gbps=1.0)

    assert row["status"] == "WRONG" and "no kernel for this shape" in row["error"]


def test_bytes_moved():
    m, n = 4096, 1024
    assert bytes_moved("softmax", "fwd", m, n, torch.bfloat16) == 2 * m * n * 2
    assert bytes_moved("softmax", "bwd", m, n, torch.float32) == 3 * m * n * 4
    assert bytes_moved("layer_norm", "fwd", m, n, torch.float32) == (2 * m * n + 2 * n) * 4 + 2 * m * 4
    assert bytes_moved("layer_norm", "bwd", m, n, torch.float32) == (3 * m * n + 3 * n) * 4 + 2 * m * 4
    assert bytes_moved("rms_norm", "bwd", m, n, torch.bfloat16) == (3 * m * n + 2 * n) * 2 + m * 4
