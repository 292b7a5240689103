import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from benchmarks import common, harness
from benchmarks.bench_attention import BENCHMARK, SDPA_BACKENDS, attention_flops, check_shape, make_case
from benchmarks.harness import MODES, Provider
from tests.conftest import DEVICE

CEILINGS = common.Ceilings(1.0, 1, 1.0, 1, "float32")


def _untimeable(jobs):
    raise AssertionError("a provider that failed its check must not be timed")


def _case(causal=False, device=DEVICE):
    return make_case(1, 2, 64, 32, causal, torch.float32, torch.device(device))


def _measure(provider, case, mode, timer=_untimeable):
    exact = harness.run_once(BENCHMARK.reference, case.as_float64(), grads=True)
    verdict = harness.check_provider(provider, case, exact, [mode])[mode]
    (row,) = harness.measure({"flops": 1.0}, [provider], case, mode, [verdict], timer, common.COMPUTE, CEILINGS)
    return row


def test_wrong_output_is_reported_and_not_timed():
    wrong = Provider("wrong", lambda *args, **kwargs: F.scaled_dot_product_attention(*args, **kwargs) * 1.01)

    row = _measure(wrong, _case(causal=True), "fwd")

    assert row["status"] == "WRONG" and row["error"].startswith("output:"), row
    assert row["ms"] is None and row["tflops"] is None


def test_wrong_gradient_is_reported_and_not_timed():
    def right_forward_wrong_backward(*args, **kwargs):
        # Equal to attention in value, but every gradient is 1.5 times the right one.
        out = F.scaled_dot_product_attention(*args, **kwargs)
        return out + 0.5 * (out - out.detach())

    wrong = Provider("wrong", right_forward_wrong_backward)
    case = _case()
    exact = harness.run_once(BENCHMARK.reference, case.as_float64(), grads=True)

    verdicts = harness.check_provider(wrong, case, exact, MODES)
    assert verdicts["fwd"] is None
    for mode in ("bwd", "fwd+bwd"):
        assert verdicts[mode][0] == "WRONG" and verdicts[mode][1].startswith("grad_query:"), verdicts
    row = _measure(wrong, case, "fwd", timer=lambda jobs: [(2.0, 1.0, 3.0)] * len(jobs))
    assert row["status"] == "ok" and row["tflops"] == 1.0 / 2e-3 / 1e12, row


def test_a_backend_that_refuses_is_unsupported_and_another_that_raises_is_wrong():
    # PyTorch has no memory-efficient attention kernel for CPU tensors: sdpa_kernel makes the call raise.
    case = _case(device="cpu")
    context = functools.partial(sdpa_kernel, SDPA_BACKENDS["sdpa-efficient"])
    refused = _measure(Provider("sdpa-efficient", F.scaled_dot_product_attention, context, refuses=True), case, "fwd")
    failed = _measure(Provider("broken", F.scaled_dot_product_attention, context), case, "fwd")

    assert refused["status"] == "unsupported" and refused["error"].startswith("raised RuntimeError"), refused
    assert failed["status"] == "WRONG" and failed["error"] == refused["error"], failed


def test_untimed_provider_is_checked_but_not_timed():
    right = Provider("lmrt-triton", F.scaled_dot_product_attention, untimed=harness.INTERPRETED)
    wrong = Provider("lmrt-triton", lambda *args, **kwargs: F.scaled_dot_product_attention(*args, **kwargs) * 2,
                     untimed=harness.INTERPRETED)

    assert _measure(right, _case(), "bwd")["status"] == "untimed"
    assert _measure(wrong, _case(), "bwd")["status"] == "WRONG"


def test_providers_on_the_cpu_skip_what_pytorch_lacks_with_a_reason():
    found, skipped = BENCHMARK.providers(torch.device("cpu"), compile_skip="--no-compile")

    names = [provider.name for provider in found]
    assert names[-3:] == ["sdpa-flash", "sdpa-math", "naive"], names
    assert set(skipped) >= {"lmrt-cuda", "sdpa-efficient", "sdpa-cudnn", "compile"}, skipped
    assert [p.name for p in found if p.pytorch] == ["sdpa-flash", "sdpa-math"]
    assert skipped["compile"] == "--no-compile"


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
