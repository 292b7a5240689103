import json
import subprocess
import sys

import pytest

from lmrt.cli import main

TINY = ["model_options={\"n_layer\": 1, \"n_head\": 2, \"n_embd\": 32}", "context_length=32", "batch_size=8",
        "max_steps=8", "warmup_steps=2", "eval_interval=4", "eval_batches=2", "sample_interval=8", "sample_tokens=8",
        "checkpoint_interval=4", "device=cpu"]


def test_train_eval_generate(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--quiet", "--set", *TINY]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "sample:" in out and "done at step 8" in out
    assert (run / "loss.png").is_file() and (run / "checkpoints" / "step-00000008.pt").is_file()

    assert main(["eval", "--run", str(run)]) == 0
    assert capsys.readouterr().out.startswith("step 8: validation loss ")
    assert main(["generate", "--run", str(run), "--prompt", "The", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("The")

    # Resume with more steps: the saved config is used, and only what a resumed run may change is taken.
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--set", "max_steps=10"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 10


def test_config_file_and_preset(tmp_path, capsys):
    (tmp_path / "run.toml").write_text("model = \"lstm\"\nmax_steps = 2\n[model_options]\nhidden_size = 16\n"
                                       "n_embd = 16\n")
    assert main(["train", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "lstm"), "--quiet",
                 "--set", "context_length=16", "batch_size=4", "eval_batches=1", "device=cpu"]) == 0
    assert "lstm, 0.0" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["train", "--set", "batch_size=0"], "lmrt train: error: TrainConfig: `batch_size` must be >= 1, got 0"),
    (["train", "--data", "/nonexistent/texts"], "lmrt train: error: training text /nonexistent/texts does not exist"),
    (["eval", "--run", "/nonexistent"], "lmrt eval: error: no checkpoint in /nonexistent/checkpoints"),
    (["bench", "bench_everything"], "lmrt bench: error: unknown benchmark 'bench_everything'"),
])
def test_user_errors_are_one_line(argv, message, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path / "run")] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_info_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "lmrt", "info"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("lmrt ") and "backend torch: available on cpu" in result.stdout
