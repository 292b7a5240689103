import itertools

import numpy as np
import pytest
import torch

import lmrt
from lmrt.generation import _beam_search, filter_logits, generate, sample
from lmrt.models import GPT, GPTConfig, LSTMConfig, LSTMLanguageModel, Seq2SeqConfig, Seq2SeqTransformer
from tests.conftest import DEVICE

VOCAB = 11


def _models():
    torch.manual_seed(0)
    return {
        "gpt": GPT(GPTConfig(vocab_size=VOCAB, context_length=24, n_layer=2, n_head=2, n_embd=16), device=DEVICE),
        "gpt-rotary-gqa": GPT(GPTConfig(vocab_size=VOCAB, context_length=24, n_layer=2, n_head=4, n_kv_head=2,
                                        n_embd=16, position="rotary"), device=DEVICE),
        "lstm": LSTMLanguageModel(LSTMConfig(vocab_size=VOCAB, n_embd=16, hidden_size=16), device=DEVICE),
        "seq2seq": Seq2SeqTransformer(Seq2SeqConfig(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, max_length=24,
                                                    d_model=16, n_head=2, n_encoder_layers=1, n_decoder_layers=2,
                                                    ffn_dim=32), device=DEVICE),
    }


MODELS = _models()


def _inputs(name):
    """(prompt, model inputs): a padded source for the encoder-decoder, a prompt for the others."""
    generator = torch.Generator().manual_seed(1)
    if name == "seq2seq":
        src = torch.randint(3, VOCAB, (3, 6), generator=generator).to(DEVICE)
        src[1, 4:] = 0  # padding
        return None, dict(src=src)
    return torch.randint(0, VOCAB, (3, 4), generator=generator).to(DEVICE), {}


def _generate(name, max_new_tokens, **options):
    model = MODELS[name].eval()
    prompt, inputs = _inputs(name)
    if prompt is None:
        return model.generate(inputs["src"], max_new_tokens, **options)
    return model.generate(prompt, max_new_tokens, **options)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", MODELS)
def test_kv_cache_gives_the_tokens_of_full_recomputation(name, backend):
    with lmrt.backend(backend):
        cached = _generate(name, 8, eos_token_id=None if name != "seq2seq" else 2)
        recomputed = _generate(name, 8, use_cache=False, eos_token_id=None if name != "seq2seq" else 2)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("mode", [{}, dict(do_sample=True), dict(num_beams=2)], ids=["greedy", "sample", "beams"])
def test_a_prompt_as_long_as_the_context_gets_its_next_token_in_the_prompts_dtype(mode, use_cache):
    """The last new token is never fed back, so a full context still predicts one more; the output keeps the
    prompt's dtype (int32 here) whatever the decoding."""
    model = MODELS["gpt"].eval()
    prompt = torch.randint(0, VOCAB, (2, 24), dtype=torch.int32, device=DEVICE)
    out = model.generate(prompt, 1, use_cache=use_cache, **mode)
    assert out.shape == (2, 25) and out.dtype == torch.int32 and torch.equal(out[:, :24], prompt)
    with pytest.raises(ValueError, match="exceeds the context length 24"):
        model.generate(prompt, 2, use_cache=use_cache, **mode)


@pytest.mark.parametrize("name", MODELS)
def test_beam_search_with_cache_gives_the_tokens_of_full_recomputation(name):
    options = dict(num_beams=3, eos_token_id=2, pad_token_id=0)
    assert torch.equal(_generate(name, 7, **options), _generate(name, 7, use_cache=False, **options))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("eos", [None, 5])
def test_one_beam_is_greedy(name, eos):
    """Beam search (called directly: generate sends num_beams=1 to the greedy loop) with one beam."""
    model = MODELS[name].eval()
    prompt, inputs = _inputs(name)
    if prompt is None:
        prompt = torch.full((3, 1), model.config.bos_id, device=DEVICE)
    with torch.no_grad():  # as generate runs it
        beams = _beam_search(model, prompt, 8, 1, 1.0, False, [] if eos is None else [eos], 0, True, inputs)
    greedy = generate(model, prompt, 8, eos_token_id=eos, pad_token_id=0, **inputs)
    assert torch.equal(beams, greedy)


def test_stop_tokens_and_padding():
    """Sequences stop at an end token (kept), shorter ones are padded, and generation ends when all have stopped."""
    model = MODELS["gpt"].eval()
    prompt, _ = _inputs("gpt")
    free = model.generate(prompt, 10)
    stop = int(free[0, 6])  # the third generated token of the first sequence
    out = model.generate(prompt, 10, eos_token_id=[stop, 99 % VOCAB], pad_token_id=VOCAB - 1)
    for row in range(3):
        generated = out[row, 4:]
        ends = (torch.isin(generated, torch.tensor([stop, 99 % VOCAB], device=DEVICE))).nonzero()
        if len(ends):
            first = ends[0, 0].item()
            assert torch.equal(generated[: first + 1], free[row, 4: 5 + first])
            assert (generated[first + 1:] == VOCAB - 1).all()
        else:
            assert torch.equal(generated, free[row, 4: 4 + len(generated)])
    assert out.shape[1] <= free.shape[1]


def _exhaustive_best(model, prompt, max_new_tokens, eos, length_penalty):
    """The best continuation of a single prompt by brute force: every sequence that ends with `eos` within
    max_new_tokens, or runs to max_new_tokens without it, scored sum(log p) / length ** length_penalty. One
    forward pass over every full-length continuation gives the log-probabilities of all their prefixes too."""
    continuations = torch.tensor(list(itertools.product(range(VOCAB), repeat=max_new_tokens)), device=DEVICE)
    sequences = torch.cat([torch.tensor(prompt, device=DEVICE).expand(len(continuations), -1), continuations], 1)
    log_probs = torch.log_softmax(model(sequences)[0].double(), dim=-1)[:, len(prompt) - 1: -1]
    prefix_sums = log_probs.gather(-1, continuations[..., None])[..., 0].cumsum(dim=1)
    best_score, best = float("-inf"), None
    for row, continuation in enumerate(continuations.tolist()):
        ends = [i for i, token in enumerate(continuation) if token == eos]
        length = ends[0] + 1 if ends else max_new_tokens
        score = prefix_sums[row, length - 1].item() / length ** length_penalty
        if score > best_score:
            best_score, best = score, continuation[:length]
    return best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_with_enough_beams_is_exhaustive(length_penalty):
    """With as many beams as there are partial sequences, beam search finds the best-scoring sequence."""
    model = MODELS["gpt"].eval()
    prompt, eos = [3, 7], 4
    out = model.generate(torch.tensor([prompt], device=DEVICE), 3, num_beams=VOCAB * VOCAB, eos_token_id=eos,
                         length_penalty=length_penalty, pad_token_id=0)
    expected = _exhaustive_best(model, prompt, 3, eos, length_penalty)
    assert out[0, 2: 2 + len(expected)].tolist() == expected
    assert (out[0, 2 + len(expected):] == 0).all()


class _FixedLogProbs:
    """A model whose next-token log-probabilities depend only on the last token: after 5 it is sure to end (0),
    after 4 it is unsure, otherwise end tokens 0, 1, 2, 3 take four of the six best candidates of two beams."""

    def init_decoding(self, batch_size, max_length):
        return None

    def decode(self, tokens, state):
        table = torch.full((6, 6), 1 / 6)
        table[5] = torch.tensor([0.99, 0.0025, 0.0025, 0.0025, 0.0025, 1e-9])
        table[[0, 1, 2, 3]] = torch.tensor([0.25, 0.15, 0.14, 0.135, 0.20, 0.125])
        return table.log()[tokens]


def test_beam_search_keeps_num_beams_running_whatever_the_number_of_end_tokens():
    """Of the top 2 * num_beams candidates of the first step four end the sequence: only token 4 kept running and
    the better [5, 0] ((log .125 + log .99) / 2 > log .25) was lost. Hugging Face returns [5, 0]."""
    out = generate(_FixedLogProbs(), torch.tensor([[4, 3]]), 4, num_beams=2, eos_token_id=[0, 1, 2, 3],
                   pad_token_id=0, use_cache=False)
    assert out.tolist() == [[4, 3, 5, 0]]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    first = _generate("gpt", 8, do_sample=True, generator=torch.Generator(DEVICE).manual_seed(5))
    again = _generate("gpt", 8, do_sample=True, generator=torch.Generator(DEVICE).manual_seed(5))
    assert torch.equal(first, again)
    assert torch.equal(_generate("gpt", 8, do_sample=True, top_k=1), _generate("gpt", 8))


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).log_softmax(-1).repeat(20000, 1)
    tokens = sample(logits, temperature=0.5, top_k=3, generator=torch.Generator().manual_seed(0))
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.5]) / 0.5, dim=0)
    frequencies = torch.bincount(tokens, minlength=5).double() / len(tokens)
    assert frequencies[3:].sum() == 0
    # 20000 draws: a frequency's standard error is at most 0.0035; 0.015 is over 4 of them.
    torch.testing.assert_close(frequencies[:3], expected.double(), atol=0.015, rtol=0)


def test_a_tiny_temperature_samples_the_most_likely_token():
    """logits / 1e-45 overflowed to inf and the softmax to NaN, which torch.multinomial refused."""
    logits = torch.tensor([[2.0, 30.0, -1.0], [5.0, 4.0, float("-inf")]])
    assert sample(logits, temperature=1e-45).tolist() == [1, 0]
    assert torch.equal(_generate("gpt", 6, do_sample=True, temperature=1e-45), _generate("gpt", 6))


@pytest.mark.parametrize("token_id", [np.int64(1), torch.tensor(1), [torch.tensor(1)], torch.tensor([1])],
                         ids=["numpy", "0-d tensor", "list of 0-d tensors", "1-d tensor"])
def test_token_ids_of_numpy_and_torch(token_id):
    expected = _generate("gpt", 8, eos_token_id=1, pad_token_id=7)
    assert (expected[:, 5:] == 7).any()  # some sequences stop and are padded
    assert torch.equal(_generate("gpt", 8, eos_token_id=token_id, pad_token_id=np.int32(7)), expected)
    assert torch.equal(_generate("gpt", 8, eos_token_id=1, pad_token_id=torch.tensor(7)), expected)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    kept = filter_logits(probs.log(), top_p=0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.75 >= 0.7
    kept = filter_logits(probs.log()[:, [2, 0, 3, 1]], top_p=0.5).isfinite()
    assert kept.tolist() == [[False, True, False, False]]  # the most likely token alone reaches 0.5, wherever it is
    assert filter_logits(probs.log(), top_p=0.01).isfinite().sum() == 1  # never empty


@pytest.mark.parametrize("options,message", [
    (dict(max_new_tokens=0), "`max_new_tokens` must be an int >= 1, got 0"),
    (dict(temperature=0.0), r"`temperature` must be a number > 0 \(greedy decoding is do_sample=False\), got 0.0"),
    (dict(top_p=1.5), r"`top_p` must be a number in \(0, 1\] or None, got 1.5"),
    (dict(top_k=0), "`top_k` must be an int >= 1 or None, got 0"),
    (dict(num_beams=2, do_sample=True), "`num_beams` must be 1 when do_sample=True"),
    (dict(eos_token_id="</s>"), "`eos_token_id` must be a token id or a list of them, got '</s>'"),
    (dict(eos_token_id=[2, -1]), r"`eos_token_id` must be a token id or a list of them, got \[2, -1\]"),
    # these passed the checks, then failed in torch or in the model with messages naming no argument (True: taken as 1)
    (dict(temperature="0.7"), "`temperature` must be a number > 0 .*, got '0.7'"),
    (dict(top_p="0.9"), r"`top_p` must be a number in \(0, 1\] or None, got '0.9'"),
    (dict(top_k=2.5), "`top_k` must be an int >= 1 or None, got 2.5"),
    (dict(top_k=True), "`top_k` must be an int >= 1 or None, got True"),
    (dict(max_new_tokens=True), "`max_new_tokens` must be an int >= 1, got True"),
    (dict(num_beams=True), "`num_beams` must be an int >= 1, got True"),
    (dict(length_penalty="1"), "`length_penalty` must be a number, got '1'"),
    (dict(eos_token_id=2.0), "`eos_token_id` must be a token id or a list of them, got 2.0"),
    (dict(eos_token_id=True), "`eos_token_id` must be a token id or a list of them, got True"),
    (dict(eos_token_id=torch.tensor(2.0)), r"`eos_token_id` must be a token id .*, got tensor\(2.\)"),
    (dict(pad_token_id=-1), r"`pad_token_id` must be a token id \(an int >= 0\) or None, got -1"),
    (dict(pad_token_id=1.0), r"`pad_token_id` must be a token id \(an int >= 0\) or None, got 1.0"),
])
def test_bad_options(options, message):
    prompt, _ = _inputs("gpt")
    options = {"max_new_tokens": 4, **options}
    with pytest.raises(ValueError, match=message):
        generate(MODELS["gpt"], prompt, options.pop("max_new_tokens"), **options)


def test_bad_prompt():
    with pytest.raises(ValueError, match=r"`prompt` must be a tensor of token ids of shape \(batch, length >= 1\)"):
        generate(MODELS["gpt"], torch.zeros(4, dtype=torch.long), 3)
