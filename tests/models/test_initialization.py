"""Every model's reset_parameters initializes all it holds, so that the meta-device recipe (build on "meta",
Module.to_empty, then reset_parameters or load_state_dict) gives a working model."""

import pytest
import torch

from lmrt.models import GPT, GPTConfig, LSTMConfig, LSTMLanguageModel, Seq2SeqConfig, Seq2SeqTransformer
from tests.conftest import DEVICE

MODELS = {
    "gpt-learned": (GPT, GPTConfig(vocab_size=11, context_length=16, n_layer=2, n_head=2, n_embd=16)),
    "gpt-rotary-rms": (GPT, GPTConfig(vocab_size=11, context_length=16, n_layer=2, n_head=2, n_embd=16,
                                      position="rotary", norm="rms")),
    "seq2seq": (Seq2SeqTransformer, Seq2SeqConfig(src_vocab_size=9, tgt_vocab_size=9, d_model=16, n_head=2,
                                                  ffn_dim=32, max_length=16)),
    "lstm-projected": (LSTMLanguageModel, LSTMConfig(vocab_size=11, context_length=16, n_embd=8, hidden_size=12)),
}


def _state(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _outputs(model):
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 9, (2, 7), generator=generator).to(DEVICE)
    if isinstance(model, Seq2SeqTransformer):
        return model(idx, idx, idx)[0]
    return model(idx, idx)[0]


def _on_meta(cls, config):
    return cls(config, device="meta").to_empty(device=DEVICE)


@pytest.mark.parametrize("cls, config", MODELS.values(), ids=MODELS.keys())
def test_reset_parameters_initializes_every_parameter_and_buffer(cls, config):
    """GPT's left the norms and Seq2SeqTransformer's the norms and the sinusoids, and the LSTM's the projection:
    after to_empty they held uninitialized memory. The same draws must now give the same model either way."""
    built, materialized = cls(config, device=DEVICE), _on_meta(cls, config)
    torch.manual_seed(1)
    built.reset_parameters()
    torch.manual_seed(1)
    materialized.reset_parameters()
    expected = _state(built)
    assert _state(materialized).keys() == expected.keys()
    for name, tensor in _state(materialized).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    assert materialized.head.weight is (materialized._tied_embedding() or materialized.head).weight


@pytest.mark.parametrize("cls, config", MODELS.values(), ids=MODELS.keys())
def test_a_model_materialized_from_meta_and_loaded_computes_as_the_original(cls, config):
    """to_empty untied the head from the embedding (a parameter per module) and left the positional tables, which
    are not in the state dict, uninitialized: the logits were NaN after loading every weight."""
    original = cls(config, device=DEVICE).eval()
    loaded = _on_meta(cls, config)
    loaded.load_state_dict(original.state_dict())
    loaded.eval()
    assert loaded.head.weight is (loaded._tied_embedding() or loaded.head).weight
    torch.testing.assert_close(_outputs(loaded), _outputs(original), rtol=0, atol=0)
