import math

import pytest
import torch

import lmrt
from benchmarks import bench_model
from benchmarks.bench_model import check_losses, pytorch_ops
from lmrt.models import GPT, GPTConfig
from tests.benchmarks.conftest import wrong_rows


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_pytorch_ops_routes_every_op_the_model_calls_to_torch_and_restores_them(norm):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, context_length=16, norm=norm))
    idx = torch.randint(0, 256, (2, 16))
    originals = {name: getattr(lmrt.ops, name) for name in bench_model.FUSED_TWINS}
    # A backend that runs nothing on CPU tensors: any lmrt op the model still called would raise.
    with lmrt.backend("cuda"):
        with pytest.raises(RuntimeError, match="cannot serve this call"):
            model(idx)
        with pytorch_ops():
            logits, _ = model(idx)
            model.generate(idx[:1, :4], 4)
    with lmrt.backend("torch"):
        expected, _ = model(idx)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert {name: getattr(lmrt.ops, name) for name in bench_model.FUSED_TWINS} == originals


def test_pytorch_ops_restores_after_an_exception():
    with pytest.raises(KeyError), pytorch_ops():
        raise KeyError
    assert lmrt.ops.layer_norm.__module__ == "lmrt.ops.layer_norm"


def test_check_losses():
    assert check_losses([2.0, 1.5], [2.0, 1.50001], torch.float32) is None
    assert check_losses([2.0, 1.6], [2.0, 1.5], torch.float32).startswith("step 2: loss 1.6, torch-eager's 1.5")
    assert check_losses([2.0, 1.51], [2.0, 1.5], torch.bfloat16) is None
    assert check_losses([math.nan], None, torch.float32).startswith("non-finite losses")


def test_quick_run_checks_every_model_provider(quick_suite):
    written = quick_suite.reports["bench_model"]
    meta, rows = written["meta"], written["results"]
    assert meta["skipped"] == {"torch-compile": "not in --quick: compiling takes longer"}
    train = {row["provider"]: row for row in rows if row["task"] == "train"}
    generate = {row["provider"]: row for row in rows if row["task"] == "generate"}
    assert list(train) == ["lmrt", "torch-eager", "torch-fused", "lstm"]
    assert list(generate) == list(train)
    eager = train["torch-eager"]
    assert eager["status"] == "ok" and len(eager["losses"]) == bench_model.CHECK_STEPS
    assert eager["losses"][-1] < eager["losses"][0]  # it trains
    for row in rows:
        if row["status"] != "ok":
            continue
        assert row["tokens_per_second"] > 0 and row["ms_p20"] <= row["ms"] <= row["ms_p80"], row
        assert set(row["time_vs"]) == {"torch-eager", "torch-fused"}, row
    assert train["torch-fused"]["matmul_fraction"] > 0 and train["lstm"]["matmul_fraction"] is None
    assert all(row["same_as_recompute"] == row["new_tokens"] for row in generate.values() if row["status"] == "ok")
    wrong = wrong_rows(rows)
    assert not wrong, [(row["provider"], row["error"]) for row in wrong]


@pytest.mark.parametrize("argv,message", [
    (["--quick", "--models", "gpt-tiny"], "--models with --quick: the smoke run has its own model, gpt-quick"),
    (["--models", "gpt2-small"], "--models gpt2-small: runs on CUDA only, and this device is cpu"),
])
def test_models_that_would_not_run_are_usage_errors(argv, message, capsys):
    """Both ran nothing without a word (empty tables, no rows in the report)."""
    with pytest.raises(SystemExit) as exit_info:
        bench_model._parse(argv, torch.device("cpu"))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
