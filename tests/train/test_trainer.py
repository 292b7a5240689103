import json
import math
import os
import shutil
import signal
import sys
import time

import pytest
import torch

from lmrt import backends
from lmrt.train import CheckpointError, TrainConfig
from lmrt.train.trainer import NonFiniteLossError, Trainer

TINY = dict(model="gpt", model_options=dict(n_layer=1, n_head=2, n_embd=32, dropout=0.1), context_length=32,
            batch_size=8, max_steps=12, warmup_steps=3, eval_interval=4, eval_batches=2, sample_interval=6,
            sample_tokens=10, checkpoint_interval=4, device="cpu")


def _config(tmp_path, name="run", **overrides):
    return TrainConfig(**{**TINY, "out_dir": str(tmp_path / name), **overrides})


def _losses(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_a_run_writes_its_records(tmp_path):
    events = []
    result = Trainer(_config(tmp_path), on_event=lambda name, data: events.append(name)).run()
    assert result.step == 12 and not result.interrupted and result.validation_loss is not None
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "best.pt", "checkpoints.json", "step-00000004.pt", "step-00000008.pt", "step-00000012.pt"]
    assert (out / "loss.png").stat().st_size > 0 and (out / "tokenizer.json").is_file()
    assert sorted(_losses(out)) == list(range(1, 13))
    assert events[0] == "start" and events[-1] == "end"
    assert {"step", "eval", "sample", "checkpoint"} <= set(events)


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    """Stopped after step 5 (a request, as Ctrl-C makes) and resumed: the same losses, bit for bit, at every step."""
    Trainer(_config(tmp_path, "straight")).run()

    def stop_at_five(name, data):
        if name == "step" and data["step"] == 5:
            trainer.request_stop()

    trainer = Trainer(_config(tmp_path, "resumed"), on_event=stop_at_five)
    result = trainer.run()
    assert result.interrupted and result.step == 5
    assert (tmp_path / "resumed" / "checkpoints" / "step-00000005.pt").is_file()
    assert Trainer(_config(tmp_path, "resumed"), resume=True).run().step == 12
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")


def test_ctrl_c_saves_and_returns(tmp_path):
    def press_ctrl_c(name, data):
        if name == "step" and data["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    result = Trainer(_config(tmp_path), on_event=press_ctrl_c).run()
    assert result.interrupted and result.step == 2
    assert (tmp_path / "run" / "checkpoints" / "step-00000002.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(_config(tmp_path))
    forward = type(trainer.model).forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        calls["n"] += self.training  # training forwards only: the 7th is step 7's
        return logits, (loss * float("nan") if calls["n"] > 6 and self.training else loss)

    monkeypatch.setattr(type(trainer.model), "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 7: the training loss is nan; the run stopped. The last good "
                                                 r"checkpoint is .*step-00000004.pt"):
        trainer.run()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-00000004.pt"]


def test_resume_refuses_a_corrupt_or_mismatched_checkpoint(tmp_path):
    Trainer(_config(tmp_path, max_steps=4)).run()
    with pytest.raises(CheckpointError, match="it was trained with context_length=32, the config now says 64"):
        Trainer(_config(tmp_path, context_length=64, max_steps=8), resume=True)
    latest = tmp_path / "run" / "checkpoints" / "step-00000004.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="step-00000004.pt"):
        Trainer(_config(tmp_path, max_steps=8), resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        Trainer(_config(tmp_path, "empty"), resume=True)


@pytest.mark.parametrize("model,options", [("lstm", dict(n_layer=1, n_embd=32, hidden_size=48)),
                                           ("seq2seq", dict(d_model=32, n_head=2, n_encoder_layers=1,
                                                            n_decoder_layers=1, ffn_dim=64))])
def test_other_models_train(tmp_path, model, options):
    result = Trainer(_config(tmp_path, model=model, model_options=options, max_steps=6)).run()
    losses = _losses(tmp_path / "run")
    assert result.step == 6 and losses[6] < losses[1]


def test_learning_rate_schedule(tmp_path):
    Trainer(_config(tmp_path, learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=4, max_steps=12)).run()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    lrs = [r["lr"] for r in map(json.loads, lines) if "lr" in r]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warmup
    assert lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + torch.cos(
        torch.tensor(torch.pi * 7 / 8)).item()))  # cosine towards min_learning_rate at step 12
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def _ddp_worker(rank, port, config_dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    try:
        Trainer(TrainConfig.from_dict(config_dict)).run()
    finally:
        dist.destroy_process_group()


def test_two_processes_reach_the_loss_of_one(tmp_path):
    """DDP on gloo, two CPU processes of 4 sequences each, against one process of 8: the same global batches
    (DistributedSampler deals one permutation out to the ranks), so the same losses up to summation order."""
    import socket

    import torch.multiprocessing

    options = dict(max_steps=6, model_options=dict(n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    Trainer(_config(tmp_path, "one", batch_size=8, **options)).run()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = _config(tmp_path, "two", batch_size=4, **options)
    torch.multiprocessing.spawn(_ddp_worker, args=(port, config.to_dict()), nprocs=2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step


def test_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra")
    Trainer(_config(tmp_path, tensorboard=True, max_steps=2)).run()
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_tensorboard_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import raises ImportError
    with pytest.raises(ImportError, match=r"needs the tensorboard package \(pip install tensorboard\)"):
        Trainer(_config(tmp_path, tensorboard=True))


def test_compiled_training_matches_eager(tmp_path):
    """compile=true trains the torch.compile'd model: the same losses as eager mode, to float32 rounding."""
    options = dict(max_steps=3, eval_interval=3, sample_interval=100, checkpoint_interval=3,
                   model_options=dict(n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    Trainer(_config(tmp_path, "eager", **options)).run()
    trainer = Trainer(_config(tmp_path, "compiled", compile=True, **options))
    assert trainer.train_model._orig_mod is trainer.model  # the compiled wrapper trains, the model is saved
    trainer.run()
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_process_group_backend_follows_the_device(monkeypatch):
    """Under torchrun, a run on GPUs joins NCCL and a run on CPUs gloo, even on a machine with GPUs."""
    from lmrt.train import trainer

    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", backends.append)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    for device in ("cpu", "auto", "cuda", "cuda:1"):
        trainer._init_distributed(device)
    assert backends == ["gloo", "nccl", "nccl", "nccl"]


def test_a_continued_run_lives_in_the_folder_it_was_loaded_from(tmp_path):
    """A copied run, resumed, writes into the copy: the original keeps its checkpoints (keep_last would have deleted
    them from the folder the saved config named) and its records."""
    Trainer(_config(tmp_path, "x", max_steps=4, keep_last=1)).run()
    shutil.copytree(tmp_path / "x", tmp_path / "y")
    before = {p.name: p.read_bytes() for p in (tmp_path / "x").rglob("*") if p.is_file()}
    assert Trainer.continue_run(tmp_path / "y", {"max_steps": 8}).run().step == 8
    assert Trainer(_config(tmp_path, "y", max_steps=12, keep_last=1), resume=True).run().step == 12
    assert {p.name: p.read_bytes() for p in (tmp_path / "x").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "y" / "checkpoints").glob("step-*")) == ["step-00000012.pt"]
    assert sorted(_losses(tmp_path / "y")) == list(range(1, 13))


def test_only_a_run_that_trains_on_drops_the_records_past_its_checkpoint(tmp_path):
    """Loading a run to evaluate or generate leaves metrics.jsonl alone (its training may be going on); training on
    from the checkpoint drops what the run wrote after it."""
    Trainer(_config(tmp_path, max_steps=4)).run()
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as file:
        file.write(json.dumps({"step": 5, "loss": 99.0}) + "\n")
    written = metrics.read_text()
    trainer = Trainer.continue_run(tmp_path / "run")
    trainer.evaluate(1)
    trainer.generate_text("a", 2)
    assert metrics.read_text() == written
    Trainer.continue_run(tmp_path / "run", {"max_steps": 6}).run()
    assert sorted(_losses(tmp_path / "run")) == list(range(1, 7)) and _losses(tmp_path / "run")[5] != 99.0


def test_a_new_run_in_a_folder_holding_a_run_is_refused(tmp_path):
    """Without resume, a second run into the same folder would delete the first one's later checkpoints and mix
    their metrics; it is refused and the folder left as it was. A folder holding only an attempt that stopped
    before its first checkpoint is taken, its records dropped."""
    Trainer(_config(tmp_path, max_steps=8)).run()
    out = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in [*(out / "checkpoints").iterdir(), out / "metrics.jsonl"]}
    with pytest.raises(CheckpointError, match=r"already holds a run \(latest checkpoint step-00000008.pt\).*resume"):
        Trainer(_config(tmp_path, max_steps=2))
    assert {p.name: p.read_bytes() for p in [*(out / "checkpoints").iterdir(), out / "metrics.jsonl"]} == before

    started = tmp_path / "started"
    started.mkdir()
    (started / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 99.0}) + "\n")
    Trainer(_config(tmp_path, "started", max_steps=2)).run()
    assert sorted(_losses(started)) == [1, 2] and 99.0 not in _losses(started).values()


def test_generation_needs_only_the_checkpoint(tmp_path):
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    Trainer(_config(tmp_path, data=str(tmp_path / "text.txt"), max_steps=4)).run()
    (tmp_path / "text.txt").unlink()
    trainer = Trainer.continue_run(tmp_path / "run", load_data=False)
    assert trainer.generate_text("the", 3, do_sample=False).startswith("the")
    full_context = "x" * trainer.config.context_length  # byte tokens: as many as the context holds
    assert len(trainer.generate_text(full_context, 5, do_sample=False)) == len(full_context) + 1
    for call, purpose in ((trainer.run, "training"), (trainer.evaluate, "evaluation")):
        with pytest.raises(RuntimeError, match=f"{purpose} needs the run's data, and this trainer was loaded without"):
            call()
    with pytest.raises(FileNotFoundError, match=r"text.txt does not exist \(the data of the run in .*run; if it "
                                                r"moved, give its new place: --data, or the `data` setting\)"):
        Trainer.continue_run(tmp_path / "run")


def test_continue_run_refuses_only_changes_it_cannot_make(tmp_path):
    Trainer(_config(tmp_path, max_steps=4)).run()
    with pytest.raises(CheckpointError, match="it was trained with weight_decay=0.1, the config now says 0.5 "
                                              r"\(a resumed run may change only backend, "):
        Trainer.continue_run(tmp_path / "run", {"weight_decay": 0.5, "max_steps": 8})
    # The saved value of a setting it cannot change is no change; default values of those it can change are.
    trainer = Trainer.continue_run(tmp_path / "run", {"weight_decay": 0.1, "model": "gpt", "max_steps": 2000,
                                                      "max_minutes": None})
    assert (trainer.config.max_steps, trainer.config.max_minutes, trainer.config.weight_decay) == (2000, None, 0.1)
    # model_options add to the saved ones (the same command again, say, whose preset gave the rest): a part of them
    # is no change; a different value is.
    Trainer.continue_run(tmp_path / "run", {"model_options": {"n_layer": 1}})
    with pytest.raises(CheckpointError, match="it was trained with model_options="):
        Trainer.continue_run(tmp_path / "run", {"model_options": {"n_layer": 2}})


def test_the_backend_setting_runs_training_evaluation_and_samples(tmp_path):
    """Every forward pass of the run (training, evaluation, samples) is under the `backend` setting's choice."""
    trainer = Trainer(_config(tmp_path, backend="torch", max_steps=6))
    choices = []
    trainer.model.register_forward_pre_hook(lambda module, args: choices.append(backends.chosen_backend()))
    events = []
    trainer.on_event = lambda name, data: events.append(name)
    trainer.run()
    assert {"step", "eval", "sample"} <= set(events) and set(choices) == {"torch"}
    assert backends.chosen_backend() is None  # the choice holds only while the run does


def test_a_backend_that_cannot_run_is_refused_before_any_step(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="`backend` is 'triton', which cannot run on cpu: triton "):
        Trainer(_config(tmp_path, backend="triton"))
    assert not (tmp_path / "run").exists()


def test_bad_evaluation_and_sample_settings_are_refused_before_any_step(tmp_path):
    trainer = Trainer(_config(tmp_path, sample_prompt="x" * 33))
    with pytest.raises(ValueError, match="`sample_prompt` has 33 tokens; the model's context holds 32"):
        trainer.run()
    assert not (tmp_path / "run").exists()
    for batches in (0, -1):
        with pytest.raises(ValueError, match=f"evaluation needs `batches` >= 1 .*, got {batches}"):
            trainer.evaluate(batches)
    # A run that will not sample does not need a prompt that fits.
    assert Trainer(_config(tmp_path, sample_prompt="x" * 32, max_steps=5)).run().step == 5


def test_a_split_too_short_for_one_example_is_named(tmp_path):
    (tmp_path / "text.txt").write_text("x" * 2000)  # byte tokens: 1900 for training, 100 for validation
    with pytest.raises(ValueError, match=r"the validation split \(0.05 of the data\): the token stream has 100 "
                                         r"tokens; .* use more text, a larger validation_fraction, or a shorter"):
        Trainer(_config(tmp_path, data=str(tmp_path / "text.txt"), context_length=200))
    with pytest.raises(ValueError, match=r"the training split \(0.95 of the data\): the token stream has 1900 "):
        Trainer(_config(tmp_path, data=str(tmp_path / "text.txt"), context_length=2000))


# A run of a few milliseconds a step, for the tests of what happens around the steps.
QUICK = dict(model_options=dict(n_layer=1, n_head=2, n_embd=16, dropout=0.0), context_length=16, batch_size=2,
             eval_batches=1, sample_interval=1000)


def _quick(tmp_path, name="run", **overrides):
    return _config(tmp_path, name, **{**QUICK, **overrides})


def test_a_diverging_run_writes_no_checkpoint_of_spoilt_weights(tmp_path):
    """A learning rate so large that the first update takes the weights to ~1e30: the step's evaluation is NaN, and
    the run stops there, writing no checkpoint of those weights."""
    config = _quick(tmp_path, learning_rate=1e30, min_learning_rate=0.0, warmup_steps=0, eval_interval=1,
                    checkpoint_interval=1, max_steps=3)
    with pytest.raises(NonFiniteLossError, match=r"step 1: the validation loss is nan; the run stopped. No checkpoint "
                                                 r"was written yet; start again with a lower learning_rate"):
        Trainer(config).run()
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_a_non_finite_gradient_stops_the_run_before_the_update(tmp_path, grad_clip):
    """A finite loss whose gradient overflowed: the run stops before the optimizer step, the weights untouched (the
    clipping would have multiplied the gradients by inf/inf = NaN, and AdamW put NaN in every weight)."""
    trainer = Trainer(_quick(tmp_path, grad_clip=grad_clip, max_steps=4, eval_interval=2, checkpoint_interval=2))
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.model.get_parameter(next(iter(weights))).register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"step 1: the gradient norm is (inf|nan); the run stopped"):
        trainer.run()
    assert all(torch.equal(p, weights[name]) for name, p in trainer.model.named_parameters())


def test_a_resumed_run_takes_a_lower_learning_rate_and_another_precision(tmp_path):
    """The advice of NonFiniteLossError can be followed: resume with a lower learning_rate (the schedule and the
    optimizer take it from the next step), another precision and grad_clip."""
    Trainer(_quick(tmp_path, max_steps=4, warmup_steps=2, eval_interval=4, checkpoint_interval=4)).run()
    changes = {"learning_rate": 1e-4, "min_learning_rate": 1e-5, "precision": "bfloat16", "grad_clip": 0.5,
               "max_steps": 6}
    trainer = Trainer.continue_run(tmp_path / "run", changes)
    expected = 1e-5 + 0.9e-4 * 0.5 * (1 + math.cos(math.pi * 2 / 4))  # step 5 of the new cosine (warmup 2, to 6)
    assert [group["lr"] for group in trainer.optimizer.param_groups] == pytest.approx([expected] * 2)
    assert trainer.run().step == 6 and trainer.amp_dtype == torch.bfloat16
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    lrs = {r["step"]: r["lr"] for r in map(json.loads, lines) if "lr" in r}
    assert lrs[4] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1 / 2))))  # the saved run's
    assert lrs[5] == pytest.approx(expected) and lrs[6] < lrs[5]


def test_resuming_a_run_that_trains_no_step_leaves_its_checkpoint_alone(tmp_path):
    """Resumed at max_steps, or stopped (here by max_minutes) before its first step, a run has nothing new to save:
    its last checkpoint keeps its validation loss in the index and in the file."""
    Trainer(_quick(tmp_path, max_steps=2, eval_interval=2, checkpoint_interval=2)).run()
    checkpoints = tmp_path / "run" / "checkpoints"
    before = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    assert Trainer.continue_run(tmp_path / "run").run().step == 2
    assert Trainer.continue_run(tmp_path / "run", {"max_steps": 4, "max_minutes": 1e-9}).run().step == 2
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before
    assert json.loads((checkpoints / "checkpoints.json").read_text())["checkpoints"][0]["validation_loss"] is not None


def test_a_torn_metrics_line_is_skipped_with_a_warning(tmp_path):
    """A partial line (a process killed mid-append) or a record without a step does not make the run unresumable:
    they are dropped, with one warning naming the file."""
    Trainer(_quick(tmp_path, max_steps=2, eval_interval=2, checkpoint_interval=2)).run()
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as file:
        file.write('{"loss": 1.0}\n{"step": 3, "loss": 5.4')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped 2 unreadable lines \(not a JSON record with an "
                                         r"integer step"):
        assert Trainer.continue_run(tmp_path / "run", {"max_steps": 3}).run().step == 3
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3]


def _press_ctrl_c_at_step_2(signals):
    def on_event(name, data):
        if name == "step" and data["step"] == 2:
            for number in signals:
                os.kill(os.getpid(), number)
    return on_event


def test_ctrl_c_twice_at_once_and_sigterm_finish_the_step_and_save(tmp_path):
    """Under torchrun each worker gets one Ctrl-C twice (the terminal's and torchrun's): that still finishes the
    step and saves, as a SIGTERM (a scheduler's, torchrun's) does."""
    try:
        result = Trainer(_quick(tmp_path, "twice"), on_event=_press_ctrl_c_at_step_2([signal.SIGINT] * 2)).run()
    except KeyboardInterrupt:  # which would end the test session
        pytest.fail("the second SIGINT of one Ctrl-C interrupted the run at once")
    assert result.interrupted and result.step == 2
    assert (tmp_path / "twice" / "checkpoints" / "step-00000002.pt").is_file()

    class Terminated(Exception):
        pass

    def terminated(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        result = Trainer(_quick(tmp_path, "term"), on_event=_press_ctrl_c_at_step_2([signal.SIGTERM])).run()
        assert signal.getsignal(signal.SIGTERM) is terminated  # the handler is put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.interrupted and result.step == 2
    assert (tmp_path / "term" / "checkpoints" / "step-00000002.pt").is_file()


def test_a_later_second_ctrl_c_interrupts_at_once(tmp_path, monkeypatch):
    from lmrt.train import trainer

    monkeypatch.setattr(trainer, "SECOND_CTRL_C_SECONDS", 0.0)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_quick(tmp_path), on_event=_press_ctrl_c_at_step_2([signal.SIGINT] * 2)).run()
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))


def test_resume_refuses_other_data_at_the_same_path(tmp_path):
    """The checkpoint holds a fingerprint of the data: other text at the same path is refused, the run's own text
    resumes, and a checkpoint saved without a fingerprint (an older lmrt's) is taken on trust."""
    from lmrt.train import CheckpointManager
    from lmrt.train.checkpoint import load_checkpoint

    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    Trainer(_quick(tmp_path, data=str(data), max_steps=2, eval_interval=2, checkpoint_interval=2)).run()
    data.write_text("THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG. " * 40)  # as many tokens, others
    with pytest.raises(CheckpointError, match=r".*step-00000002.pt was trained on other data than `data` .*text.txt "
                                              r"\(1800 tokens, as then, but others\)"):
        Trainer.continue_run(tmp_path / "run", {"max_steps": 3})
    data.write_text("the quick brown fox. " * 40)
    with pytest.raises(CheckpointError, match=r"\(840 tokens now, 1800 then\); give the run's data \(`data`, "
                                              r"--data\), or train a new run"):
        Trainer(_quick(tmp_path, data=str(data), max_steps=3, eval_interval=2, checkpoint_interval=2), resume=True)
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert Trainer.continue_run(tmp_path / "run", {"max_steps": 3}).run().step == 3

    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000003.pt")
    del checkpoint["state"]["data"]["fingerprint"]
    CheckpointManager(tmp_path / "run" / "checkpoints").save(3, checkpoint["state"], checkpoint["validation_loss"])
    data.write_text("THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG. " * 40)
    assert Trainer.continue_run(tmp_path / "run", {"max_steps": 4}).run().step == 4


def test_a_run_on_the_embedded_corpus_of_another_python_says_so(tmp_path, monkeypatch):
    """The embedded corpus is the running Python's pydoc topics, which change between Python releases: a checkpoint
    of another Python's corpus is refused naming both versions, since no data can be restored."""
    import platform

    from lmrt.train import CheckpointManager, trainer
    from lmrt.train.checkpoint import load_checkpoint

    Trainer(_quick(tmp_path, max_steps=1, eval_interval=1, checkpoint_interval=1)).run()
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000001.pt")
    assert checkpoint["state"]["data"]["python"] == platform.python_version()
    checkpoint["state"]["data"]["python"] = "3.10.0"
    CheckpointManager(tmp_path / "run" / "checkpoints").save(1, checkpoint["state"], checkpoint["validation_loss"])
    corpus = trainer.default_corpus()
    monkeypatch.setattr(trainer, "default_corpus", lambda: corpus.replace("Python", "PYTHON"))
    with pytest.raises(CheckpointError, match=rf"step-00000001.pt was trained on other data than the embedded corpus "
                                              rf".*Python 3.10.0's for that run and {platform.python_version()}'s "
                                              rf"here: run lmrt under Python 3.10.0"):
        Trainer.continue_run(tmp_path / "run", {"max_steps": 2})


def test_a_run_on_a_token_file_resumes_with_the_config_that_started_it(tmp_path):
    """A .bin file's tokenizer is the one that wrote it, whatever `tokenizer` says; the saved config records the
    file's. Resuming with the config that started the run was refused as a change of tokenizer."""
    from lmrt.data import ByteTokenizer, default_corpus, write_token_file
    from lmrt.data.token_file import tokenizer_path

    tokenizer, token_file = ByteTokenizer(), tmp_path / "corpus.bin"
    write_token_file(token_file, tokenizer.encode(default_corpus()[:20_000]), tokenizer.vocab_size)
    tokenizer.save(tokenizer_path(token_file))
    config = _quick(tmp_path, data=str(token_file), tokenizer="bpe", max_steps=2, eval_interval=2,
                    checkpoint_interval=2)
    Trainer(config).run()
    resumed = Trainer(config.with_overrides(["max_steps=3"]), resume=True)
    assert resumed.config.tokenizer == "byte" and resumed.run().step == 3


@pytest.mark.parametrize("name", ["corpus.tokens", "CORPUS.BIN"])
def test_a_token_file_is_read_as_token_ids_whatever_its_name(tmp_path, name):
    """A token file not named *.bin was read as UTF-8 text, which a byte-level corpus's ids are (the header is ASCII,
    the ids pairs of a byte and 0): the run trained on its bytes."""
    from lmrt.data import ByteTokenizer, write_token_file
    from lmrt.data.token_file import tokenizer_path
    from lmrt.train.trainer import corpus_tokens

    tokenizer, token_file = ByteTokenizer(), tmp_path / name
    ids = tokenizer.encode("hello world, " * 100)
    write_token_file(token_file, ids, tokenizer.vocab_size)
    tokenizer.save(tokenizer_path(token_file))
    _, tokens = corpus_tokens(TrainConfig(data=str(token_file)))
    assert list(tokens) == list(ids)


def _ddp_worker_rank_0_late(rank, port, config_dict):
    """A DDP worker whose rank 0 starts its clock 1.5 s after rank 1 (its start-up writes take that long)."""
    if rank == 0:
        import time

        from lmrt.train import trainer

        truncate = trainer._truncate_metrics
        trainer._truncate_metrics = lambda path, step: (time.sleep(1.5), truncate(path, step))
    _ddp_worker(rank, port, config_dict)


def test_max_minutes_stops_every_process_at_the_same_step(tmp_path):
    """Each process measures max_minutes on its own clock, and theirs start apart: all stop at the step the first
    one's time is up, and save (a process that stopped alone would wait in the checkpoint's barrier forever while the
    other waits in a gradient all-reduce)."""
    import socket

    import torch.multiprocessing

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = _quick(tmp_path, max_steps=100_000, max_minutes=0.05, eval_interval=100_000,
                    checkpoint_interval=100_000)
    context = torch.multiprocessing.spawn(_ddp_worker_rank_0_late, args=(port, config.to_dict()), nprocs=2,
                                          join=False)
    try:
        deadline = time.monotonic() + 60
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the processes hang"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    steps = [path.name for path in (tmp_path / "run" / "checkpoints").glob("step-*")]
    assert len(steps) == 1 and sorted(_losses(tmp_path / "run")) == list(range(1, int(steps[0][5:13]) + 1))


def test_a_run_trains_on_only_in_as_many_processes_as_trained_it(tmp_path):
    """A checkpoint's position in the data counts one process's share, and its steps batch_size sequences per
    process: resuming with another number of processes is refused (a checkpoint without the count, an older lmrt's,
    is taken on trust). Evaluation and generation need no particular count."""
    from lmrt.train import CheckpointManager
    from lmrt.train.checkpoint import load_checkpoint

    Trainer(_quick(tmp_path, max_steps=2, eval_interval=2, checkpoint_interval=2)).run()
    path = tmp_path / "run" / "checkpoints" / "step-00000002.pt"
    checkpoint = load_checkpoint(path)
    assert checkpoint["state"]["data"]["processes"] == 1
    checkpoint["state"]["data"]["processes"] = 2  # as a run under torchrun --nproc_per_node 2 saves it
    CheckpointManager(tmp_path / "run" / "checkpoints").save(2, checkpoint["state"], checkpoint["validation_loss"])
    trainer = Trainer.continue_run(tmp_path / "run", {"max_steps": 3})
    assert math.isfinite(trainer.evaluate(1))
    with pytest.raises(CheckpointError, match=r"cannot train on from .*step-00000002.pt in 1 process\(es\): its run "
                                              r"trained in 2, .* torchrun --nproc_per_node 2 -m lmrt train --resume"):
        trainer.run()
    del checkpoint["state"]["data"]["processes"]
    CheckpointManager(tmp_path / "run" / "checkpoints").save(2, checkpoint["state"], checkpoint["validation_loss"])
    assert Trainer.continue_run(tmp_path / "run", {"max_steps": 3}).run().step == 3


@pytest.mark.parametrize("model,options", [("gpt", TINY["model_options"]),
                                           ("seq2seq", dict(d_model=32, n_head=2, n_encoder_layers=1,
                                                            n_decoder_layers=1, ffn_dim=64))])
def test_the_validation_loss_is_the_mean_over_every_target_token(tmp_path, model, options):
    """Batches of 3 over a validation split that 3 does not divide: the loss is the one of every example in one
    batch (the mean over all target tokens), not the mean of the batches' means, which overweighs the short last
    batch."""
    trainer = Trainer(_config(tmp_path, model=model, model_options=options, batch_size=3))
    data = trainer.validation_data
    assert len(data) % 3 != 0
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(*trainer._collate(data, [data[i] for i in range(len(data))]))[1].item()
    assert trainer.evaluate() == pytest.approx(expected, rel=1e-6)


def test_the_encoder_decoder_generates_as_many_tokens_as_its_decoder_holds(tmp_path):
    """`generate_text` for seq2seq: a source longer than max_length (context_length) is refused in the trainer's words,
    and the continuation may take all max_length positions of the decoder (the last new token is never fed back)."""
    trainer = Trainer(_config(tmp_path, model="seq2seq", model_options=dict(d_model=32, n_head=2, n_encoder_layers=1,
                                                                          n_decoder_layers=1, ffn_dim=64)))
    with pytest.raises(ValueError, match="the prompt has 33 tokens; the model's source holds 32"):
        trainer.generate_text("x" * 33, 5)
    generate, lengths = trainer.model.generate, []

    def recording(*args, **kwargs):
        out = generate(*args, **kwargs)
        lengths.append(out.shape[1])
        return out

    trainer.model.generate = recording
    trainer.generate_text("x" * 32, 100, do_sample=False, eos_token_id=None)
    assert lengths == [1 + 32]  # the start token and 32 new ones
