import pytest
import torch

import lmrt
from lmrt.models import GPT, IGNORE_INDEX, GPTConfig
from tests.conftest import DEVICE
from tests.models.tasks import assert_backends_agree, copy_batch, train

TINY = dict(vocab_size=13, context_length=24, n_layer=2, n_head=3, n_embd=24)
VARIANTS = {
    "gpt2": {},
    "llama-like": dict(position="rotary", norm="rms", activation="swiglu", n_kv_head=1, bias=False),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_backend_matches_torch_backend(variant):
    model = GPT(GPTConfig(**TINY, **VARIANTS[variant]), device=DEVICE)
    idx = torch.randint(0, 13, (2, 11), device=DEVICE)
    targets = torch.randint(0, 13, (2, 11), device=DEVICE)
    targets[0, :3] = IGNORE_INDEX
    assert_backends_agree(model, (idx, targets))


def test_learns_to_copy():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=12, context_length=16, n_layer=2, n_head=4, n_embd=64))
    losses = train(model, 300, 3e-3, lambda g: copy_batch(32, 6, 12, g))
    assert losses[0] > 2.0 and max(losses[-10:]) < 0.02, losses[::50]
    # It copies a prompt it has never seen, greedily, with the KV cache.
    idx, _ = copy_batch(4, 6, 12, torch.Generator().manual_seed(123))
    model.eval()
    out = model.generate(idx[:, :7], 6)
    assert torch.equal(out[:, 7:], idx[:, :6])


def test_parameter_count_and_initialization():
    config = GPTConfig.gpt2_small()
    with torch.device("meta"):
        model = GPT(config)
    # GPT-2 small's figure: 124M with the padded vocabulary, the head tied to the token embedding.
    assert model.num_parameters() == 124_475_904
    assert model.num_parameters(non_embedding=True) == 124_475_904 - 1024 * 768
    assert model.head.weight is model.token_embedding.weight

    small = GPT(GPTConfig(**TINY))
    residual_std = small.layers[0].self_attn.out_proj.weight.std().item()
    assert residual_std < 0.02 / 1.5  # scaled by 1/sqrt(2 * n_layer) = 0.5
    assert small.layers[0].self_attn.qkv_proj.bias.abs().max() == 0


def test_padding_targets_are_ignored():
    model = GPT(GPTConfig(**TINY), device=DEVICE)
    idx = torch.randint(0, 13, (2, 8), device=DEVICE)
    targets = torch.randint(0, 13, (2, 8), device=DEVICE)
    _, loss = model(idx, targets)
    ignored = targets.clone()
    ignored[:, 4:] = IGNORE_INDEX
    logits, partial = model(idx, ignored)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 13), targets[:, :4].reshape(-1))
    torch.testing.assert_close(partial, expected)
    assert not torch.allclose(partial, loss)


def test_compiled_training_step_matches_eager():
    model = GPT(GPTConfig(**TINY, **VARIANTS["llama-like"]), device=DEVICE)
    idx = torch.randint(0, 13, (2, 9), device=DEVICE)
    targets = torch.randint(0, 13, (2, 9), device=DEVICE)

    def step(idx, targets):
        return model(idx, targets)[1]

    compiled = torch.compile(step, fullgraph=True)
    grads = []
    with lmrt.backend("triton"):
        for fn in (compiled, step):
            model.zero_grad()
            loss = fn(idx, targets)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (compiled_loss, compiled_grads), (eager_loss, eager_grads) = grads
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize("overrides,message", [
    (dict(n_embd=30, n_head=4), r"GPTConfig: `n_head` \(4\) must divide `n_embd` \(30\)"),
    (dict(n_head=4, n_kv_head=3), r"GPTConfig: `n_kv_head` \(3\) must divide `n_head` \(4\)"),
    (dict(position="alibi"), "`position` must be one of learned, rotary, got 'alibi'"),
    (dict(norm="batch"), "`norm` must be one of layer, rms, got 'batch'"),
    (dict(dropout=1.0), r"`dropout` must be in \[0, 1\), got 1.0"),
    (dict(vocab_size=0), "`vocab_size` must be >= 1, got 0"),
    # model_options from a file or --set: "false" was taken as true, "2" failed as a comparison of str and int
    (dict(bias="false"), "GPTConfig: `bias` must be true or false, got 'false'"),
    (dict(n_layer="2"), "GPTConfig: `n_layer` must be an integer, got '2'"),
    (dict(n_embd=32.0), "GPTConfig: `n_embd` must be an integer, got 32.0"),
    (dict(dropout=float("nan")), "GPTConfig: `dropout` must be a finite number, got nan"),
])
def test_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, **overrides})


def test_context_longer_than_the_position_table():
    model = GPT(GPTConfig(**TINY), device=DEVICE)
    with pytest.raises(ValueError, match="25 tokens exceed the context length 24"):
        model(torch.zeros(1, 25, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"decoding 29 tokens \(.*\) exceeds the context length 24"):
        model.generate(torch.zeros(1, 10, dtype=torch.long, device=DEVICE), 20)


def test_token_ids_outside_the_vocabulary():
    model = GPT(GPTConfig(**TINY), device=DEVICE)
    with pytest.raises(ValueError, match=r"`idx` holds token ids from 0 to 13, outside the vocabulary \[0, 13\)"):
        model(torch.tensor([[0, 13]], device=DEVICE))
    with pytest.raises(ValueError, match="`idx` must be an int64 tensor of shape"):
        model(torch.zeros(4, dtype=torch.long, device=DEVICE))


def test_targets_are_checked_like_idx():
    """Targets outside the vocabulary reached cross_entropy: an IndexError on the CPU, a device-side assert that
    poisons the CUDA context on a GPU; int32 targets, which idx accepts, were refused by cross_entropy."""
    model = GPT(GPTConfig(**TINY), device=DEVICE)
    idx = torch.randint(0, 13, (2, 5), device=DEVICE)
    targets = torch.randint(0, 13, (2, 5), device=DEVICE)
    targets[0, :2] = IGNORE_INDEX
    torch.testing.assert_close(model(idx, targets.int())[1], model(idx, targets)[1])
    for value, shown in [(13, "token id 13"), (-1, "token id -1"), (-101, "token id -101")]:
        bad = targets.clone()
        bad[1, 3] = value
        with pytest.raises(ValueError, match=rf"`targets` holds {shown}, outside the vocabulary \[0, 13\) \(and not "
                                             rf"IGNORE_INDEX = -100"):
            model(idx, bad)
    bad[0, 0] = 13
    with pytest.raises(ValueError, match=r"`targets` holds token ids -101 and 13, outside the vocabulary \[0, 13\)"):
        model(idx, bad)
    with pytest.raises(ValueError, match="`targets` must be an int64 tensor of token ids .*, got torch.float32"):
        model(idx, targets.float())
