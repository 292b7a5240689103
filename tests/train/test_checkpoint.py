import collections
import dataclasses
import json
import random
import struct
import zipfile

import numpy
import pytest
import torch

from lmrt.data import ByteTokenizer
from lmrt.models import GPT, GPTConfig
from lmrt.train import (
    CheckpointError,
    CheckpointManager,
    apply_model_state,
    apply_optimizer_state,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)

# Dropout makes every step draw from torch's generator, so a resume that misses the RNG state changes the loss.
CONFIG = GPTConfig(vocab_size=32, context_length=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


def seed_everything(seed):
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def make_run(config=CONFIG):
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler):
    # The batch draws from all three generators, as a data loader with shuffling and augmentation would.
    shift = random.randrange(CONFIG.vocab_size) + int(numpy.random.randint(CONFIG.vocab_size))
    idx = (torch.randint(0, CONFIG.vocab_size, (4, 12)) + shift) % CONFIG.vocab_size
    _, loss = model(idx, idx.roll(-1, dims=1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def run_state(model, optimizer, scheduler):
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": capture_rng_state(), "config": dataclasses.asdict(CONFIG),
            "tokenizer": ByteTokenizer().to_json()}


def test_resumed_run_matches_uninterrupted_run_bitwise(tmp_path):
    seed_everything(0)
    straight = make_run()
    straight_losses = [train_step(*straight) for _ in range(6)]

    seed_everything(0)
    first_half = make_run()
    losses = [train_step(*first_half) for _ in range(3)]
    manager = CheckpointManager(tmp_path)
    manager.save(3, run_state(*first_half), validation_loss=losses[-1])

    seed_everything(123)  # a new process: other initial weights, other generator states
    model, optimizer, scheduler = make_run(GPTConfig(**load_checkpoint(manager.latest())["state"]["config"]))
    checkpoint = load_checkpoint(manager.latest())
    assert checkpoint["step"] == 3 and checkpoint["state"]["tokenizer"] == {"kind": "byte"}
    state = checkpoint["state"]
    apply_model_state(model, state["model"])
    apply_optimizer_state(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    losses += [train_step(model, optimizer, scheduler) for _ in range(3)]

    assert losses == straight_losses
    for (name, resumed), expected in zip(model.state_dict().items(), straight[0].state_dict().values(), strict=True):
        assert torch.equal(resumed, expected), name


def test_keeps_the_last_n_and_the_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, None)]:
        manager.save(step, {"weight": torch.full((2,), float(step))}, loss)
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-00000002.pt", "step-00000004.pt",
                                                                   "step-00000005.pt"]
    assert manager.latest() == tmp_path / "step-00000005.pt"
    assert manager.best() == tmp_path / "best.pt" and load_checkpoint(manager.best())["step"] == 2
    index = json.loads((tmp_path / "checkpoints.json").read_text())
    assert [(entry["step"], entry["validation_loss"]) for entry in index["checkpoints"]] == [(2, 1.0), (4, 2.5),
                                                                                              (5, None)]
    assert index["best"] == {"step": 2, "path": "best.pt", "validation_loss": 1.0}

    manager.save(6, {"weight": torch.zeros(2)}, 0.5)  # a new best frees step 2 to be pruned
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-00000005.pt", "step-00000006.pt"]
    assert load_checkpoint(manager.best())["step"] == 6


def test_index_keeps_the_best_across_managers(tmp_path, monkeypatch):
    CheckpointManager(tmp_path, keep_last=2).save(1, {}, 1.0)
    CheckpointManager(tmp_path, keep_last=2).save(2, {}, 2.0)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", None)  # the index alone tells a new manager the losses: no checkpoint is opened
        manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(3, {}, 1.5)  # worse than step 1
    manager.save(4, {}, 1.2)
    assert load_checkpoint(manager.best())["step"] == 1
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-00000001.pt", "step-00000003.pt",
                                                                   "step-00000004.pt"]


@pytest.mark.parametrize("damage", ["index deleted", "index garbled", "index and the best's step file deleted"])
def test_recovers_without_the_index(tmp_path, damage):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step, loss in [(1, 0.5), (2, 0.9), (3, 0.8)]:
        manager.save(step, {}, loss)
    index = tmp_path / "checkpoints.json"
    if damage == "index garbled":
        index.write_text("{not json")
    else:
        index.unlink()
    if damage == "index and the best's step file deleted":
        (tmp_path / "step-00000001.pt").unlink()  # only best.pt itself still knows step 1's loss

    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() == tmp_path / "step-00000003.pt"
    manager.save(4, {}, 0.7)  # still worse than step 1: the files told the new manager its loss
    assert load_checkpoint(manager.best())["step"] == 1
    assert json.loads(index.read_text())["best"]["step"] == 1


@pytest.mark.parametrize("resumed_by", ["the same manager", "a new manager"])
def test_recovers_a_save_interrupted_before_the_index_update(tmp_path, monkeypatch, resumed_by):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(1, {}, 1.0)

    def power_cut(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(CheckpointManager, "_write_index", power_cut)
    with pytest.raises(OSError):
        manager.save(2, {}, 0.5)  # step-00000002.pt and best.pt are in place, the index still says step 1
    monkeypatch.undo()

    if resumed_by == "a new manager":
        manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() == tmp_path / "step-00000002.pt"
    manager.save(3, {}, 0.7)
    assert load_checkpoint(manager.best())["step"] == 2
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-00000002.pt", "step-00000003.pt"]


def test_going_back_to_an_earlier_step_drops_the_abandoned_steps(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        manager.save(step, {"branch": "first"})
    manager.save(2, {"branch": "second"})  # the run was resumed from step 2
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-00000001.pt", "step-00000002.pt"]
    assert load_checkpoint(manager.latest())["state"] == {"branch": "second"}


def test_latest_and_best_of_an_empty_directory(tmp_path):
    manager = CheckpointManager(tmp_path / "not-yet-created")
    assert manager.latest() is None and manager.best() is None


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_save_leaves_the_previous_checkpoints_intact(tmp_path, monkeypatch, failure):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(1, {"weight": torch.ones(3)}, 1.0)
    manager.save(2, {"weight": torch.ones(3)}, 0.5)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    def failing_save(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 part of an archive")  # some bytes reach the temporary file before the failure
        raise failure

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(failure)):
        manager.save(3, {"weight": torch.zeros(3)}, 0.1)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before

    monkeypatch.undo()
    manager.save(3, {"weight": torch.zeros(3)}, 0.1)
    assert load_checkpoint(manager.best())["step"] == 3


def test_save_removes_temporary_files_of_a_killed_writer(tmp_path):
    leftover = tmp_path / ".step-00000001.pt.0123456789ab.tmp"
    leftover.write_bytes(b"half a checkpoint")
    CheckpointManager(tmp_path).save(2, {})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoints.json", "step-00000002.pt"]


@pytest.mark.parametrize("value, refused", [(CONFIG, "GPTConfig"), (numpy.float64(1.5), "float64"),
                                            (collections.defaultdict(int), "defaultdict")])
def test_save_refuses_what_weights_only_loading_would_refuse(tmp_path, value, refused):
    with pytest.raises(TypeError, match=rf"`state\['extra'\]\[0\]` is a .*{refused}"):
        CheckpointManager(tmp_path).save(1, {"model": {"weight": torch.ones(2)}, "extra": [value]})
    assert list(tmp_path.iterdir()) == []


def flip_byte_in_tensor_data(path):
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if "/data/" in info.filename)
    name_length, extra_length = struct.unpack_from("<HH", data, record.header_offset + 26)
    data[record.header_offset + 30 + name_length + extra_length + record.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    ("missing", "does not exist"),
    ("empty", "truncated or corrupt"),
    ("truncated", "truncated or corrupt"),
    ("garbage", "truncated or corrupt"),
    ("flipped byte", "fails its CRC-32 check"),
    ("plain torch file", "not an lmrt checkpoint: it lacks the marker"),
    ("pickled object", "not an lmrt checkpoint: it holds objects"),
    ("future version", "format version 2, newer than the version 1"),
])
def test_load_refuses_a_bad_file(tmp_path, damage, message):
    path = CheckpointManager(tmp_path).save(7, {"model": GPT(CONFIG).state_dict()})
    content = path.read_bytes()
    if damage == "missing":
        path = tmp_path / "step-00000008.pt"
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(content[:len(content) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 64)
    elif damage == "flipped byte":
        flip_byte_in_tensor_data(path)
    elif damage == "plain torch file":
        torch.save({"model": {"weight": torch.ones(2)}}, path)
    elif damage == "pickled object":
        torch.save({"format": "lmrt.checkpoint", "state": collections.defaultdict(int)}, path)
    else:
        torch.save({"format": "lmrt.checkpoint", "version": 2, "step": 7, "validation_loss": None, "state": {}}, path)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("change, message", [
    (dict(n_embd=64), r"`token_embedding.weight` is float32 of shape \[32, 64\] in the checkpoint but float32 of "
                      r"shape \[32, 32\] in the model"),
    (dict(ffn_dim=64), r"`layers.0.feed_forward.w1.weight` is float32 of shape \[64, 32\] in the checkpoint but "
                       r"float32 of shape \[128, 32\] in the model"),
    (dict(n_layer=3), r"it has `layers\.2\.[\w.]+`, `layers\.2\.[\w.]+`, `layers\.2\.[\w.]+` and \d+ more that GPT "
                      r"lacks"),
    (dict(dtype=torch.float64), r"`token_embedding.weight` is float64 of shape \[32, 32\] in the checkpoint but "
                                r"float32"),
])
def test_a_mismatched_model_state_is_refused_before_anything_is_copied(change, message):
    dtype = change.pop("dtype", None)
    # Only some tensors differ in shape: torch's load_state_dict alone would copy the others before raising.
    checkpoint = GPT(dataclasses.replace(CONFIG, **change), dtype=dtype).state_dict()
    model = GPT(CONFIG)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"checkpoint run/step-00000001.pt does not fit GPT: .*{message}"):
        apply_model_state(model, checkpoint, source="run/step-00000001.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_mismatched_optimizer_state_is_refused_before_anything_is_loaded():
    def adamw_after_one_step(model, groups):
        parameters = list(model.parameters())
        optimizer = torch.optim.AdamW([{"params": parameters[i::groups]} for i in range(groups)])
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
        optimizer.step()
        return optimizer

    optimizer = torch.optim.AdamW(GPT(CONFIG).parameters())
    wider = adamw_after_one_step(GPT(dataclasses.replace(CONFIG, n_embd=64)), 1).state_dict()
    with pytest.raises(CheckpointError, match=r"state `exp_avg` of parameter 0 in group 0 has shape \[32, 64\] but "
                                              r"the parameter has shape \[32, 32\]"):
        apply_optimizer_state(optimizer, wider)
    regrouped = adamw_after_one_step(GPT(CONFIG), 2).state_dict()
    with pytest.raises(CheckpointError, match="it has 2 parameter groups, the optimizer 1"):
        apply_optimizer_state(optimizer, regrouped)
    assert optimizer.state_dict()["state"] == {}


def test_rng_state_round_trip():
    state = capture_rng_state()
    draws = (random.random(), numpy.random.rand(), torch.rand(3))
    restore_rng_state(state)
    again = (random.random(), numpy.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])

    with pytest.raises(CheckpointError, match=r"`state\['torch'\]` must be the uint8 tensor"):
        restore_rng_state({**state, "torch": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"`state\['numpy'\]` must hold the 624 `keys`"):
        restore_rng_state({**state, "numpy": {"keys": torch.zeros(3)}})


def test_a_bpe_tokenizer_survives_weights_only_loading(tmp_path):
    pytest.importorskip("tokenizers")
    from lmrt.data import BPETokenizer, tokenizer_from_dict

    tokenizer = BPETokenizer.train(["the cat sat on the mat"] * 20, vocab_size=270)
    path = CheckpointManager(tmp_path).save(1, {"tokenizer": tokenizer.to_json()})
    restored = tokenizer_from_dict(load_checkpoint(path)["state"]["tokenizer"])
    assert restored.encode("the mat sat") == tokenizer.encode("the mat sat")


def test_checkpoints_carry_crc32s_even_when_the_process_turned_them_off(tmp_path):
    torch.serialization.set_crc32_options(False)
    try:
        path = CheckpointManager(tmp_path).save(1, {"weight": torch.ones(64)})
        assert torch.serialization.get_crc32_options() is False
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(load_checkpoint(path)["state"]["weight"], torch.ones(64))
