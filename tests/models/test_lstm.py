import pytest
import torch

from lmrt.models import GPT, GPTConfig, LSTMConfig, LSTMLanguageModel
from tests.conftest import DEVICE
from tests.models.tasks import copy_batch, train


def test_learns_to_copy():
    torch.manual_seed(0)
    model = LSTMLanguageModel(LSTMConfig(vocab_size=12, context_length=16, n_embd=128, hidden_size=128, n_layer=1))
    losses = train(model, 400, 5e-3, lambda g: copy_batch(32, 4, 12, g))
    assert losses[0] > 2.0 and max(losses[-10:]) < 0.1, losses[::50]


def test_same_interface_as_gpt():
    """The trainer and the benchmarks treat both alike: forward(idx, targets) -> (logits, loss), generate."""
    lstm = LSTMLanguageModel(LSTMConfig(vocab_size=13, n_embd=16, hidden_size=24, n_layer=2), device=DEVICE)
    gpt = GPT(GPTConfig(vocab_size=13, context_length=32, n_layer=1, n_head=2, n_embd=16), device=DEVICE)
    idx = torch.randint(0, 13, (3, 9), device=DEVICE)
    for model in (lstm, gpt):
        logits, loss = model(idx, idx)
        assert logits.shape == (3, 9, 13) and loss.shape == ()
        assert model(idx)[1] is None
        assert model.eval().generate(idx, 4).shape == (3, 13)


@pytest.mark.parametrize("hidden_size", [8, 16, 24])
def test_tied_head_and_projection(hidden_size):
    model = LSTMLanguageModel(LSTMConfig(vocab_size=13, n_embd=16, hidden_size=hidden_size))
    assert model.head.weight is model.token_embedding.weight
    # A hidden width other than the embedding's is mapped back to it for the tied head.
    assert (model.projection is None) == (hidden_size == 16)
    assert model(torch.zeros(2, 3, dtype=torch.long))[0].shape == (2, 3, 13)
    untied = LSTMLanguageModel(LSTMConfig(vocab_size=13, n_embd=16, hidden_size=24, tie_weights=False))
    assert untied.head.weight.shape == (13, 24)


def test_forget_gate_bias_starts_at_one():
    model = LSTMLanguageModel(LSTMConfig(vocab_size=13, n_embd=16, hidden_size=8))
    bias = model.lstm.bias_ih_l0 + model.lstm.bias_hh_l0
    assert torch.equal(bias[8:16], torch.ones(8))


def test_state_continues_the_sequence():
    """Decoding step by step through the state equals one pass over the whole sequence."""
    model = LSTMLanguageModel(LSTMConfig(vocab_size=13, n_embd=16, hidden_size=24, n_layer=2), device=DEVICE).eval()
    idx = torch.randint(0, 13, (2, 7), device=DEVICE)
    state = model.init_decoding(2, 7)
    steps = torch.cat([model.decode(idx[:, :3], state), model.decode(idx[:, 3:], state)], dim=1)
    torch.testing.assert_close(steps, model(idx)[0])


@pytest.mark.parametrize("overrides,message", [
    (dict(hidden_size=0), "`hidden_size` must be >= 1, got 0"),
    (dict(dropout=-0.1), r"`dropout` must be in \[0, 1\), got -0.1"),
])
def test_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        LSTMConfig(**overrides)


def test_trains_under_cpu_autocast():
    """oneDNN has bfloat16 LSTM kernels only on AVX-512 CPUs; elsewhere torch.nn.LSTM under CPU autocast raised, so
    `lmrt train --model lstm --set precision=bfloat16` failed at its first step on an AVX2 CPU. The recurrence then
    runs in float32: the result is the float32 model's up to the bfloat16 rounding of the other layers."""
    torch.manual_seed(0)
    model = LSTMLanguageModel(LSTMConfig(vocab_size=13, n_embd=16, hidden_size=24, n_layer=2))
    idx = torch.randint(0, 13, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    torch.testing.assert_close(logits.float(), model(idx)[0], atol=0.05, rtol=0.05)


def test_the_cpu_autocast_probe_leaves_the_random_state_alone():
    """The probe for oneDNN's LSTM kernels initializes an LSTM: from torch's global generator it shifted every later
    dropout mask of the process, so a resumed bfloat16 run drew other masks than the uninterrupted one."""
    from lmrt.models.lstm import _cpu_lstm_runs_in

    _cpu_lstm_runs_in.cache_clear()
    state = torch.random.get_rng_state()
    _cpu_lstm_runs_in(torch.bfloat16)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_targets_are_checked_like_idx():
    model = LSTMLanguageModel(LSTMConfig(vocab_size=13, n_embd=16, hidden_size=24), device=DEVICE)
    idx = torch.randint(0, 13, (2, 5), device=DEVICE)
    torch.testing.assert_close(model(idx, idx.int())[1], model(idx, idx)[1])
    with pytest.raises(ValueError, match=r"`targets` holds token id 13, outside the vocabulary \[0, 13\)"):
        model(idx, torch.full_like(idx, 13))
    with pytest.raises(ValueError, match="`targets` must be an int64 tensor of token ids .*, got torch.uint8"):
        model(idx, idx.to(torch.uint8))
