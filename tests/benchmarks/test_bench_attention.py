import functools
import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from benchmarks.bench_attention import (
    MODES,
    SDPA_BACKENDS,
    Provider,
    attention_flops,
    check_shape,
    exact_results,
    main,
    make_case,
    measure,
)
from tests.benchmarks.quick_run import run_quick
from tests.conftest import DEVICE


def test_quick_run_writes_correct_timed_rows(tmp_path):
    results = run_quick(main, "bench_attention", tmp_path, ceilings=["matmul_tflops"])

    assert {"lmrt", "sdpa-math", "naive"} <= {row["provider"] for row in results}
    assert {(row["mode"], row["causal"]) for row in results} == set(itertools.product(MODES, (False, True)))
    for row in results:
        if row["status"] == "unsupported":  # on a GPU, SDPA's flash and cuDNN backends refuse the float32 quick grid
            assert row["provider"] in ("sdpa-flash", "sdpa-cudnn") and row["error"], row
            continue
        assert row["status"] == "ok", row
        assert row["ms"] > 0 and row["tflops"] > 0 and row["matmul_fraction"] > 0, row
        assert row["ms_p20"] <= row["ms"] <= row["ms_p80"], row
        assert row["time_vs_best_sdpa"] > 0, row
        assert row["check_shape"] == [row["batch"], row["heads"], row["seqlen"], row["head_dim"]], row


def _untimeable(fn, grad_to_none):
    raise AssertionError("a provider that failed its check must not be timed")


def _case(causal=False, device=DEVICE):
    return make_case(1, 2, 64, 32, causal, torch.float32, torch.device(device))


def test_wrong_output_is_reported_and_not_timed():
    case = _case(causal=True)
    wrong = Provider("wrong", lambda *args, **kwargs: F.scaled_dot_product_attention(*args, **kwargs) * 1.01)

    row = measure(case, case, exact_results(case), wrong, "fwd", _untimeable, matmul_ceiling=1.0)

    assert row["status"] == "WRONG" and row["error"].startswith("output:"), row
    assert row["ms"] is None and row["tflops"] is None


def test_wrong_gradient_is_reported_and_not_timed():
    def right_forward_wrong_backward(*args, **kwargs):
        # Equal to attention in value, but every gradient is 1.5 times the right one.
        out = F.scaled_dot_product_attention(*args, **kwargs)
        return out + 0.5 * (out - out.detach())

    case = _case()
    wrong = Provider("wrong", right_forward_wrong_backward)
    exact = exact_results(case)

    assert measure(case, case, exact, wrong, "fwd", lambda fn, grads: (1.0, 1.0, 1.0), 1.0)["status"] == "ok"
    for mode in ("bwd", "fwd+bwd"):
        row = measure(case, case, exact, wrong, mode, _untimeable, matmul_ceiling=1.0)
        assert row["status"] == "WRONG" and row["error"].startswith("grad_query:"), row


def test_a_backend_that_refuses_is_unsupported_and_another_that_raises_is_wrong():
    # PyTorch has no memory-efficient attention kernel for CPU tensors: sdpa_kernel makes the call raise.
    case = _case(device="cpu")
    exact = exact_results(case)
    efficient = Provider("sdpa-efficient", F.scaled_dot_product_attention,
                         functools.partial(sdpa_kernel, SDPA_BACKENDS["sdpa-efficient"]), refuses=True)
    broken = Provider("broken", efficient.attention, efficient.context)

    refused = measure(case, case, exact, efficient, "fwd", _untimeable, matmul_ceiling=1.0)
    failed = measure(case, case, exact, broken, "fwd", _untimeable, matmul_ceiling=1.0)

    assert refused["status"] == "unsupported" and refused["error"].startswith("raised RuntimeError"), refused
    assert failed["status"] == "WRONG" and failed["error"] == refused["error"], failed


def test_check_runs_on_a_reduced_case():
    assert check_shape(heads=32, seqlen=16384, head_dim=64) == (1, 2, 4096, 64)
    assert check_shape(heads=2, seqlen=128, head_dim=128) == (1, 2, 128, 128)


def test_attention_flops():
    b, h, n, d = 2, 3, 128, 64
    forward = 4 * b * h * n * n * d
    assert attention_flops("fwd", b, h, n, d, causal=False) == forward
    assert attention_flops("fwd", b, h, n, d, causal=True) == forward / 2
    assert attention_flops("bwd", b, h, n, d, causal=False) == 2.5 * forward
    assert attention_flops("fwd+bwd", b, h, n, d, causal=True) == 3.5 * forward / 2
