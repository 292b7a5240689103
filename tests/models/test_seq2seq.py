import pytest
import torch

from lmrt.models import IGNORE_INDEX, Seq2SeqConfig, Seq2SeqTransformer
from tests.conftest import DEVICE
from tests.models.tasks import assert_backends_agree, train

PAD, BOS, EOS = 0, 1, 2
TINY = dict(src_vocab_size=11, tgt_vocab_size=13, max_length=16, d_model=24, n_head=3, n_encoder_layers=2,
            n_decoder_layers=2, ffn_dim=40, dropout=0.0)


def reverse_batch(batch: int, length: int, vocab: int, generator: torch.Generator):
    """(src, tgt, targets) for reversing sequences of 3..length tokens, padded with PAD: tgt is BOS + reversed
    source, targets the reversed source + EOS, padding positions ignored."""
    lengths = torch.randint(3, length + 1, (batch,), generator=generator)
    src = torch.full((batch, length), PAD)
    tgt = torch.full((batch, length + 1), PAD)
    targets = torch.full((batch, length + 1), IGNORE_INDEX)
    for row, n in enumerate(lengths.tolist()):
        tokens = torch.randint(3, vocab, (n,), generator=generator)
        src[row, :n] = tokens
        tgt[row, 0], tgt[row, 1: n + 1] = BOS, tokens.flip(0)
        targets[row, :n], targets[row, n] = tokens.flip(0), EOS
    return src, tgt, targets


@pytest.mark.parametrize("norm_first", [False, True])
def test_triton_backend_matches_torch_backend(norm_first):
    model = Seq2SeqTransformer(Seq2SeqConfig(**TINY, norm_first=norm_first), device=DEVICE)
    src, tgt, targets = (t.to(DEVICE) for t in reverse_batch(3, 7, 11, torch.Generator().manual_seed(0)))
    assert (src == PAD).any()  # the padding masks take part
    assert_backends_agree(model, (src, tgt, targets))


def test_learns_to_reverse():
    torch.manual_seed(0)
    config = Seq2SeqConfig(src_vocab_size=10, tgt_vocab_size=10, max_length=12, d_model=64, n_head=4,
                           n_encoder_layers=2, n_decoder_layers=2, ffn_dim=128, dropout=0.0, share_embeddings=True)
    model = Seq2SeqTransformer(config)
    losses = train(model, 400, 1e-3, lambda g: reverse_batch(32, 6, 10, g))
    assert losses[0] > 2.0 and max(losses[-10:]) < 0.05, losses[::50]
    src, _, targets = reverse_batch(8, 6, 10, torch.Generator().manual_seed(123))
    model.eval()
    out = model.generate(src, 8)
    for row in range(8):  # BOS, the reversed source, EOS, then padding
        expected = targets[row][targets[row] != IGNORE_INDEX]
        assert torch.equal(out[row, 1: 1 + len(expected)], expected), (src[row], out[row])
        assert (out[row, 1 + len(expected):] == PAD).all()


def test_padding_does_not_change_the_result():
    """A source padded with extra PAD positions gives the same logits: the padding masks hide them."""
    model = Seq2SeqTransformer(Seq2SeqConfig(**TINY), device=DEVICE).eval()
    src = torch.randint(3, 11, (2, 5), device=DEVICE)
    tgt = torch.randint(3, 13, (2, 4), device=DEVICE)
    padded = torch.cat([src, torch.zeros(2, 3, dtype=torch.long, device=DEVICE)], dim=1)
    torch.testing.assert_close(model(padded, tgt)[0], model(src, tgt)[0])


def test_explicit_padding_mask_is_checked():
    model = Seq2SeqTransformer(Seq2SeqConfig(**TINY), device=DEVICE)
    src = torch.randint(3, 11, (2, 5), device=DEVICE)
    with pytest.raises(ValueError, match=r"`src_key_padding_mask` must be a bool tensor of shape \[2, 5\]"):
        model(src, src, src_key_padding_mask=torch.zeros(2, 5, device=DEVICE))


@pytest.mark.parametrize("overrides,message", [
    (dict(d_model=30, n_head=4), r"Seq2SeqConfig: `n_head` \(4\) must divide `d_model` \(30\)"),
    (dict(share_embeddings=True), "`share_embeddings` needs one vocabulary"),
    (dict(eos_id=13), r"`eos_id` \(13\) must be a target token id in \[0, 13\)"),
    (dict(activation="tanh"), "`activation` must be one of gelu, relu, swiglu, got 'tanh'"),
    (dict(dropout=1.0), r"Seq2SeqConfig: `dropout` must be in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"Seq2SeqConfig: `dropout` must be in \[0, 1\), got -0.1"),
])
def test_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        Seq2SeqConfig(**{**TINY, **overrides})


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_from_an_empty_source(use_cache):
    """forward accepts an empty source (cross-attention over no keys gives zeros); generate stopped in the KV
    cache, which needs a capacity >= 1. Greedy tokens are the argmax of forward on the tokens before them."""
    model = Seq2SeqTransformer(Seq2SeqConfig(**TINY), device=DEVICE).eval()
    src = torch.zeros(2, 0, dtype=torch.long, device=DEVICE)
    greedy = model.generate(src, 5, eos_token_id=None, use_cache=use_cache)
    assert greedy.shape == (2, 6) and (greedy[:, 0] == BOS).all()
    assert torch.equal(model(src, greedy[:, :-1])[0].argmax(dim=-1), greedy[:, 1:])
    beams = model.generate(src, 5, num_beams=3, use_cache=use_cache)
    assert beams.shape[0] == 2 and torch.equal(beams, model.generate(src, 5, num_beams=3, use_cache=not use_cache))
    assert torch.equal(model.generate(src, 1, num_beams=3, eos_token_id=None), greedy[:, :2])


def test_targets_outside_the_target_vocabulary():
    """The target vocabulary (13) is checked, not the source's (11)."""
    model = Seq2SeqTransformer(Seq2SeqConfig(**TINY), device=DEVICE)
    src, tgt, targets = (t.to(DEVICE) for t in reverse_batch(2, 5, 11, torch.Generator().manual_seed(0)))
    targets[0, 0] = 12
    model(src, tgt, targets)
    targets[0, 0] = 13
    with pytest.raises(ValueError, match=r"`targets` holds token id 13, outside the vocabulary \[0, 13\)"):
        model(src, tgt, targets)


def test_sequence_longer_than_the_position_table():
    model = Seq2SeqTransformer(Seq2SeqConfig(**TINY), device=DEVICE)
    src = torch.randint(3, 11, (1, 17), device=DEVICE)
    with pytest.raises(ValueError, match="positions 0 to 16 do not fit the table of max_length=16"):
        model(src, src[:, :4])
