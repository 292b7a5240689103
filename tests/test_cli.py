import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmrt.cli import main
from lmrt.data import default_corpus, load_tokenizer, read_token_file
from lmrt.train import CheckpointManager, load_checkpoint

TINY = ["model_options={\"n_layer\": 1, \"n_head\": 2, \"n_embd\": 32}", "context_length=32", "batch_size=8",
        "max_steps=8", "warmup_steps=2", "eval_interval=4", "eval_batches=2", "sample_interval=8", "sample_tokens=8",
        "checkpoint_interval=4", "device=cpu"]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_second", "seconds")} for r in records]


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
    # Sampling options with a decoding that draws nothing were ignored without a word.
    assert main(["generate", "--run", str(run), "--beams", "2", "--top-k", "5", "--temperature", "2"]) == 2
    assert capsys.readouterr().err == ("lmrt generate: error: --temperature, --top-k set how tokens are sampled, and "
                                       "--greedy or --beams decode without sampling; leave out one or the other\n")
    assert main(["generate", "--run", str(run), "--greedy", "--beams", "3"]) == 2
    assert "--greedy and --beams 3 are two ways to decode; pick one" in capsys.readouterr().err

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


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_tokenize_then_train_on_the_bin(tmp_path, capsys, tokenizer):
    """`lmrt tokenize` writes the token file and its tokenizer beside it; `lmrt train --data` on the .bin trains with
    that tokenizer (whatever the tokenizer setting says) exactly as on the text it came from."""
    if tokenizer == "bpe":
        pytest.importorskip("tokenizers")
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(default_corpus()[:60_000], encoding="utf-8")
    token_file, tokenizer_file = tmp_path / "tokens" / "corpus.bin", tmp_path / "tokens" / "corpus.tokenizer.json"
    assert main(["tokenize", "--data", str(texts), "--out", str(token_file), "--tokenizer", tokenizer,
                 "--bpe-vocab-size", "320"]) == 0
    saved = load_tokenizer(tokenizer_file)
    tokens = read_token_file(token_file, saved.vocab_size)
    assert saved.kind == tokenizer and len(tokens) == len(saved.encode((texts / "a.txt").read_text()))
    assert capsys.readouterr().out == (f"lmrt tokenize: {len(tokens):,} tokens written to {token_file}; tokenizer "
                                       f"{tokenizer} ({saved.vocab_size} ids) in {tokenizer_file}\n")

    settings = ["--quiet", "--set", *TINY, "max_steps=2", "bpe_vocab_size=320"]
    assert main(["train", "--data", str(texts), "--out", str(tmp_path / "text"), *settings,
                 f"tokenizer={tokenizer}"]) == 0
    other = "bpe" if tokenizer == "byte" else "byte"
    status = main(["train", "--data", str(token_file), "--out", str(tmp_path / "bin"), *settings, f"tokenizer={other}"])
    assert status == 0, capsys.readouterr().err
    assert (tmp_path / "bin" / "tokenizer.json").read_text() == tokenizer_file.read_text()
    assert _untimed(_records(tmp_path / "bin")) == _untimed(_records(tmp_path / "text"))  # the same losses


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch is built without torch.distributed")
def test_torchrun_two_processes(tmp_path):
    """The README's several-GPUs command on two CPU processes (gloo): tokenize, then torchrun ... -m lmrt train on
    the .bin. Rank 0 alone reports and writes: one metrics record per step, its checkpoint; rank 1 prints nothing."""
    token_file, run = tmp_path / "corpus.bin", tmp_path / "run"
    assert main(["tokenize", "--out", str(token_file)]) == 0  # the embedded corpus, byte tokens
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--tee", "3",
               "-m", "lmrt", "train", "--data", str(token_file), "--out", str(run), "--quiet",
               "--set", *TINY, "max_steps=4", "batch_size=4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()  # --tee 3: each line of a rank's stdout tagged [default<local rank>]:
    assert lines and all(re.match(r"\[\w*?0\]:", line) for line in lines), result.stdout[-3000:]
    assert "(float32, 2 processes)" in lines[0] and any("checkpoint " in line for line in lines)
    records = _records(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "validation_loss" in r] == [4]
    final = [r for r in records if "loss" in r][-1]
    assert math.isfinite(final["loss"]) and math.isfinite(records[-1]["validation_loss"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "checkpoints.json",
                                                                       "step-00000004.pt"]


def _saved_config(run):
    latest = CheckpointManager(run / "checkpoints").latest()
    return load_checkpoint(latest)["state"]["config"]


def test_resume_takes_every_setting_given(tmp_path, capsys):
    """With --resume, a setting given (at its default value or not) changes the run if a resumed run may change it;
    any other must equal the saved value, or the command is refused without training."""
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--quiet", "--set", *TINY, "max_steps=4", "max_minutes=5"]) == 0
    (tmp_path / "other.txt").write_text("other text")
    (tmp_path / "lstm.yaml").write_text("model: lstm\n")
    for refused, message in [(["--set", "weight_decay=0.5"], "weight_decay=0.1, the config now says 0.5"),
                             (["--set", "batch_size=64"], "batch_size=8, the config now says 64"),
                             (["--model", "lstm"], "model='gpt', the config now says 'lstm'"),
                             (["--config", str(tmp_path / "lstm.yaml")], "model='gpt', the config now says 'lstm'"),
                             (["--preset", "tiny"], "preset=None, the config now says 'tiny'")]:
        assert main(["train", "--out", str(run), "--resume", *refused]) == 2
        err = capsys.readouterr().err
        assert f"lmrt train: error: cannot resume from {run}" in err and message in err and err.count("\n") == 1
    # `data` may name another path, of the same data: its fingerprint decides.
    assert main(["train", "--out", str(run), "--resume", "--data", str(tmp_path / "other.txt")]) == 2
    assert "was trained on other data than `data` " in capsys.readouterr().err
    assert _saved_config(run)["max_steps"] == 4
    # max_minutes=none lifts the saved limit, eval_interval=200 is TrainConfig's default; the saved learning rate
    # and model are no change.
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--model", "gpt", "--set", "max_steps=6",
                 "max_minutes=none", "eval_interval=200", "learning_rate=1e-3"]) == 0
    saved = _saved_config(run)
    assert (saved["max_steps"], saved["max_minutes"], saved["eval_interval"]) == (6, None, 200)


def test_a_copied_run_resumes_in_its_own_folder(tmp_path, capsys):
    """eval and generate leave a run's records alone; resuming a copy writes into the copy, not the original."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    assert main(["train", "--out", str(original), "--quiet", "--set", *TINY, "max_steps=4", "keep_last=1"]) == 0
    shutil.copytree(original, copy)
    with open(copy / "metrics.jsonl", "a") as file:  # as a run still training past its checkpoint writes
        file.write(json.dumps({"step": 5, "loss": 99.0}) + "\n")
    before = {p: p.read_bytes() for p in (*original.rglob("*"), copy / "metrics.jsonl") if p.is_file()}
    assert main(["eval", "--run", str(copy), "--batches", "1"]) == 0
    assert main(["generate", "--run", str(copy), "--max-new-tokens", "2"]) == 0
    assert {p: p.read_bytes() for p in before} == before
    assert main(["train", "--out", str(copy), "--resume", "--quiet", "--set", "max_steps=6"]) == 0
    assert {p: p.read_bytes() for p in original.rglob("*") if p.is_file()} == {
        p: data for p, data in before.items() if p.is_relative_to(original)}
    losses = {r["step"]: r["loss"] for r in _records(copy) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[5] != 99.0
    assert sorted(p.name for p in (copy / "checkpoints").glob("step-*")) == ["step-00000006.pt"]


def test_a_run_on_a_relative_data_path_is_evaluated_and_resumed_from_anywhere(tmp_path, monkeypatch, capsys):
    """A run trained on a relative `data` path records where the data is: eval and resume work from another folder
    (they looked for the relative path there). Data that moved is named by eval, and --data gives its new place
    (the checkpoint's fingerprint, not the path, says whether it is the run's data); generate needs no data."""
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "text.txt").write_text(default_corpus()[:20_000])
    monkeypatch.chdir(tmp_path / "started")
    assert main(["train", "--data", "text.txt", "--out", "run", "--quiet", "--set", *TINY, "max_steps=4"]) == 0
    assert _saved_config(tmp_path / "started" / "run")["data"] == str(tmp_path / "started" / "text.txt")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--run", "started/run"]) == 0
    assert capsys.readouterr().out.startswith("step 4: validation loss ")
    assert main(["train", "--out", "started/run", "--resume", "--quiet", "--set", "max_steps=5"]) == 0

    (tmp_path / "started" / "text.txt").rename(tmp_path / "moved.txt")
    capsys.readouterr()
    assert main(["generate", "--run", "started/run", "--prompt", "The", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert main(["eval", "--run", "started/run"]) == 2
    assert capsys.readouterr().err == (f"lmrt eval: error: training text {tmp_path / 'started' / 'text.txt'} does not "
                                       "exist (the data of the run in started/run; if it moved, give its new place: "
                                       "--data, or the `data` setting)\n")
    assert main(["eval", "--run", "started/run", "--data", "moved.txt"]) == 0
    assert capsys.readouterr().out.startswith("step 5: validation loss ")
    assert main(["train", "--out", "started/run", "--resume", "--data", "moved.txt", "--quiet",
                 "--set", "max_steps=6"]) == 0
    assert _saved_config(tmp_path / "started" / "run")["data"] == str(tmp_path / "moved.txt")
    (tmp_path / "other.txt").write_text(default_corpus()[20_000:40_000])
    assert main(["eval", "--run", "started/run", "--data", "other.txt"]) == 2
    assert "was trained on other data than `data` " in capsys.readouterr().err


@pytest.mark.parametrize("how", ["--preset", "config", "set"])
def test_a_preset_is_for_the_model_and_under_the_settings(tmp_path, how):
    """However the preset and the model are named, the preset's settings are those for the model, and the run's
    model_options add to its model_options."""
    (tmp_path / "run.yaml").write_text("model: lstm\nmodel_options: {hidden_size: 64}\n" +
                                       ("preset: tiny\n" if how == "config" else ""))
    preset = {"--preset": ["--preset", "tiny"], "config": [], "set": ["--set", "preset=tiny"]}[how]
    settings = ["context_length=16", "batch_size=2", "max_steps=1", "eval_batches=1", "device=cpu"]
    assert main(["train", "--config", str(tmp_path / "run.yaml"), *preset, "--out", str(tmp_path / "run"),
                 "--quiet", "--set", *settings]) == 0
    saved = _saved_config(tmp_path / "run")
    assert (saved["model"], saved["preset"], saved["learning_rate"]) == ("lstm", "tiny", 2e-3)
    assert saved["model_options"] == {"n_layer": 1, "n_embd": 128, "hidden_size": 64}


def test_config_file_numbers_that_yaml_reads_as_strings(tmp_path):
    """YAML reads 3e-4 as a string. TrainConfig.from_file converted it, but lmrt train --config read the file
    itself and refused it."""
    (tmp_path / "run.yaml").write_text("learning_rate: 3e-4\nmin_learning_rate: 1e-5\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run"), "--quiet",
                 "--set", *TINY]) == 0
    saved = _saved_config(tmp_path / "run")
    assert (saved["learning_rate"], saved["min_learning_rate"]) == (3e-4, 1e-5)


def test_every_set_counts(tmp_path):
    assert main(["train", "--out", str(tmp_path / "run"), "--quiet", "--set", *TINY, "learning_rate=5e-4",
                 "--set", "max_steps=1"]) == 0
    saved = _saved_config(tmp_path / "run")
    assert (saved["learning_rate"], saved["max_steps"]) == (5e-4, 1)


def test_a_backend_that_cannot_run_is_one_line_before_any_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton runs CPU tensors only through its interpreter
    assert main(["train", "--out", str(tmp_path / "run"), "--set", *TINY, "backend=triton"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmrt train: error: `backend` is 'triton', which cannot run on cpu: ")
    assert err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_eval_batches_must_be_positive(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--quiet", "--set", *TINY, "max_steps=1"]) == 0
    for batches in ("0", "-1"):
        assert main(["eval", "--run", str(tmp_path / "run"), "--batches", batches]) == 2
        assert capsys.readouterr().err == (f"lmrt eval: error: evaluation needs `batches` >= 1 (or None: every "
                                           f"validation batch), got {batches}\n")


@pytest.mark.parametrize("argv,message", [
    (["train", "--set", "batch_size=0"], "lmrt train: error: TrainConfig: `batch_size` must be >= 1, got 0"),
    (["train", "--set", "learning_rate=0", "min_learning_rate=0"], "lmrt train: error: TrainConfig: `learning_rate` "
                                                                   "must be > 0, got 0.0"),
    (["train", "--set", "sample_tokens=0"], "lmrt train: error: TrainConfig: `sample_tokens` must be >= 1, got 0"),
    (["train", "--set", *TINY, "sample_prompt=" + "x" * 40], "lmrt train: error: `sample_prompt` has 40 tokens; the "
                                                            "model's context holds 32"),
    (["train", "--quiet", "--set", *TINY, "backend=cpp", "model_options={\"n_head\": 2, \"dropout\": 0.1}"],
     "lmrt train: error: lmrt.ops.attention: the 'cpp' backend was chosen but cannot serve this call: its attention "
     "kernels have no dropout"),
    (["train", "--data", "/nonexistent/texts"], "lmrt train: error: training text /nonexistent/texts does not exist"),
    (["eval", "--run", "/nonexistent"], "lmrt eval: error: no checkpoint in /nonexistent/checkpoints"),
    (["bench", "bench_everything"], "lmrt bench: error: unknown benchmark 'bench_everything'"),
    (["bench", "softmax", "--quick", "--out", "/dev/null/x"], "lmrt bench: error: cannot create the output folder "
                                                              "'/dev/null/x': Not a directory"),
    (["tokenize", "--data", "/nonexistent/texts"], "lmrt tokenize: error: training text /nonexistent/texts does not "
                                                   "exist"),
    (["tokenize", "--out", "corpus.txt"], "lmrt tokenize: error: --out corpus.txt must end in .bin"),
])
def test_user_errors_are_one_line(argv, message, capsys, tmp_path):
    out = {"train": ["--out", str(tmp_path / "run")], "tokenize": ["--out", str(tmp_path / "corpus.bin")]}
    assert main(argv + ([] if "--out" in argv else out.get(argv[0], []))) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_info_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "lmrt", "info"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("lmrt ") and "backend torch: available on cpu" in result.stdout


def test_bench_from_the_console_script_finds_the_checkout_benchmarks():
    """The `lmrt` console script has its bin/ folder first on sys.path, where `python -m lmrt` has the current folder:
    simulated by taking the current folder off sys.path once lmrt is imported, then run from the repository root."""
    code = ("import os, sys, lmrt.cli; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]; "
            "sys.exit(lmrt.cli.main(['bench', 'no_such_benchmark']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    # suite.run's refusal: the checkout's benchmarks package was found.
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("lmrt bench: error: unknown benchmark 'no_such_benchmark'"), done.stderr
