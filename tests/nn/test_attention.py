"""lmrt.nn.MultiheadAttention against its plain-PyTorch twins: torch.nn.MultiheadAttention with the same weights
(self and cross, key padding, causal), an explicit grouped-query and rotary computation, on the torch and triton
backends, forward and backward; dropout in training mode only; clear errors for bad configurations and masks.

Tolerance: float32 assert_close defaults (rtol 1.3e-6, atol 1e-5). Every comparison is of float32 results of the
same arithmetic in a different order (a fused projection, another softmax and accumulation order), whose rounding
differences at these sizes (7 keys, widths 20-24, gradients summed over 21 rows) stay near 1e-6: a wrong mask,
head layout or weight slice is off by 1e-2 or more.
"""

import re

import pytest
import torch
import torch.nn.functional as F

import lmrt
from tests.conftest import BACKENDS, DEVICE, EXTENSION_BACKENDS
from tests.nn.test_positional import rotate_complex

BATCH, LENGTH, EMBED, HEADS = 3, 7, 24, 3
MEMORY_LENGTH, MEMORY_DIM = 5, 20


def perturb(module: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter off its initial value, so that norm weights (ones) and biases differ from each other
    and a swapped or dropped parameter shows in the output."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return module


def run(module: torch.nn.Module, inputs, grad_output: torch.Tensor, backend: str = "torch", forward=None, **kwargs):
    """forward(*inputs, **kwargs) (module's own by default) on `backend`; returns the output, the inputs' gradients
    and the module's parameters' gradients (by name) of <output, grad_output>. The backward runs in the backend
    block too."""
    module.zero_grad(set_to_none=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with lmrt.backend(backend):
        output = (module if forward is None else forward)(*leaves, **kwargs)
        output.backward(grad_output)
    return output.detach(), [leaf.grad for leaf in leaves], {n: p.grad for n, p in module.named_parameters()}


def assert_same_results(results, expected, to_expected_names=dict):
    """Outputs, input gradients and parameter gradients equal; `to_expected_names` maps the first results'
    parameter gradients onto the names of the expected ones (the weight mapping of a torch twin)."""
    output, input_grads, param_grads = results
    expected_output, expected_input_grads, expected_param_grads = expected
    torch.testing.assert_close(output, expected_output)
    for i, (grad, expected_grad) in enumerate(zip(input_grads, expected_input_grads, strict=True)):
        torch.testing.assert_close(grad, expected_grad, msg=lambda m, i=i: f"grad of input {i}: {m}")
    mapped = to_expected_names(param_grads)
    assert mapped.keys() == expected_param_grads.keys()
    for name, grad in mapped.items():
        torch.testing.assert_close(grad, expected_param_grads[name], msg=lambda m, n=name: f"grad of {n}: {m}")


def mha_to_torch(tensors: dict, ours: str = "", theirs: str = "") -> dict:
    """Our MultiheadAttention's parameters (or their gradients) under torch.nn.MultiheadAttention's names.

    Self-attention's qkv_proj is torch's in_proj, the same stacked [q; k; v] rows. Cross-attention's q_proj and
    kv_proj ([k; v] rows) are torch's in_proj stacked, or its separate q/k/v_proj_weight when keys are of
    another width (kdim); the biases are always torch's stacked in_proj_bias."""
    mapped = {f"{theirs}out_proj.{n}": tensors[f"{ours}out_proj.{n}"] for n in ("weight", "bias")}
    if f"{ours}qkv_proj.weight" in tensors:
        mapped[f"{theirs}in_proj_weight"] = tensors[f"{ours}qkv_proj.weight"]
        mapped[f"{theirs}in_proj_bias"] = tensors[f"{ours}qkv_proj.bias"]
        return mapped
    mapped[f"{theirs}in_proj_bias"] = torch.cat([tensors[f"{ours}q_proj.bias"], tensors[f"{ours}kv_proj.bias"]])
    q, (k, v) = tensors[f"{ours}q_proj.weight"], tensors[f"{ours}kv_proj.weight"].chunk(2)
    if q.shape[1] == k.shape[1]:
        mapped[f"{theirs}in_proj_weight"] = torch.cat([q, k, v])
    else:
        mapped.update({f"{theirs}q_proj_weight": q, f"{theirs}k_proj_weight": k, f"{theirs}v_proj_weight": v})
    return mapped


def padding_mask(lengths, total: int) -> torch.Tensor:
    """(batch, total) bool, True at the padding after each row's length (torch.nn's convention)."""
    return torch.arange(total, device=DEVICE) >= torch.tensor(lengths, device=DEVICE)[:, None]


def causal_mask(length: int) -> torch.Tensor:
    """torch.nn's causal mask as bools, True where a key is excluded, the type of the padding masks (torch warns
    when it merges a float mask with a bool one)."""
    return torch.nn.Transformer.generate_square_subsequent_mask(length, device=DEVICE).isinf()


# Right padding leaves key 0 unmasked in every row, so that no query (causal or not) sees only padding: torch then
# gives NaN where lmrt gives zeros, a difference of convention these tests do not compare.
SELF_CASES = {"plain": (None, False), "padding": ([7, 4, 1], False), "causal": (None, True),
              "causal-padding": ([5, 7, 2], True)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SELF_CASES)
def test_self_attention_matches_torch(case, backend):
    lengths, is_causal = SELF_CASES[case]
    ours = perturb(lmrt.nn.MultiheadAttention(EMBED, HEADS, device=DEVICE))
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, batch_first=True, device=DEVICE)
    theirs.load_state_dict(mha_to_torch(ours.state_dict()))
    x = torch.randn(BATCH, LENGTH, EMBED, device=DEVICE)
    grad = torch.randn_like(x)
    mask = None if lengths is None else padding_mask(lengths, LENGTH)
    got = run(ours, [x], grad, backend, is_causal=is_causal, key_padding_mask=mask)

    def torch_attention(x):
        attn_mask = causal_mask(LENGTH) if is_causal else None
        return theirs(x, x, x, key_padding_mask=mask, attn_mask=attn_mask, is_causal=is_causal,
                      need_weights=False)[0]

    assert_same_results(got, run(theirs, [x], grad, forward=torch_attention), mha_to_torch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kdim", [EMBED, MEMORY_DIM])
def test_cross_attention_matches_torch(kdim, backend):
    ours = perturb(lmrt.nn.MultiheadAttention(EMBED, HEADS, cross_attention=True, kdim=kdim, device=DEVICE))
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, batch_first=True, kdim=kdim, vdim=kdim, device=DEVICE)
    theirs.load_state_dict(mha_to_torch(ours.state_dict()))
    x = torch.randn(BATCH, LENGTH, EMBED, device=DEVICE)
    memory = torch.randn(BATCH, MEMORY_LENGTH, kdim, device=DEVICE)
    mask = padding_mask([5, 2, 3], MEMORY_LENGTH)
    grad = torch.randn_like(x)
    got = run(ours, [x, memory], grad, backend, key_padding_mask=mask)
    expected = run(theirs, [x, memory], grad,
                   forward=lambda x, m: theirs(x, m, m, key_padding_mask=mask, need_weights=False)[0])
    assert_same_results(got, expected, mha_to_torch)


def explicit_attention(module, x, rotate=None, is_causal=False, key_padding_mask=None):
    """Self-attention written out with the module's weights: slice the fused projection into q, k and v heads,
    rotate q and k with `rotate` (a function of (batch, length, heads, head_dim)), repeat each key/value head for
    its group of query heads, and call torch's scaled_dot_product_attention."""
    heads, kv_heads, head_dim = module.num_heads, module.num_kv_heads, module.head_dim
    batch, length, embed = x.shape
    q, k, v = F.linear(x, module.qkv_proj.weight, module.qkv_proj.bias).split(
        [embed, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(batch, length, -1, head_dim) for t in (q, k, v))
    if rotate is not None:
        q, k = rotate(q), rotate(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    mask = torch.ones(length, length, dtype=torch.bool, device=x.device)
    if is_causal:
        mask = mask.tril()
    if key_padding_mask is not None:
        mask = mask & ~key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return module.out_proj(out.transpose(1, 2).reshape(batch, length, embed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_grouped_query_attention_matches_repeated_heads(num_kv_heads, backend):
    ours = perturb(lmrt.nn.MultiheadAttention(EMBED, 6, num_kv_heads, device=DEVICE))
    assert ours.qkv_proj.weight.shape == (EMBED + 2 * num_kv_heads * 4, EMBED)
    x = torch.randn(BATCH, LENGTH, EMBED, device=DEVICE)
    mask = padding_mask([6, 7, 3], LENGTH)
    grad = torch.randn_like(x)
    got = run(ours, [x], grad, backend, is_causal=True, key_padding_mask=mask)
    expected = run(ours, [x], grad,
                   forward=lambda x: explicit_attention(ours, x, is_causal=True, key_padding_mask=mask))
    assert_same_results(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_attention_matches_explicit(backend):
    rotary = lmrt.nn.RotaryEmbedding(EMBED // HEADS, max_length=16, device=DEVICE)
    ours = perturb(lmrt.nn.MultiheadAttention(EMBED, HEADS, rotary=rotary, device=DEVICE))
    x = torch.randn(BATCH, LENGTH, EMBED, device=DEVICE)
    grad = torch.randn_like(x)
    got = run(ours, [x], grad, backend, is_causal=True)
    expected = run(ours, [x], grad, forward=lambda x: explicit_attention(ours, x, rotate_complex, is_causal=True))
    assert_same_results(got, expected)
    # The rotation must matter, or the comparison above would not test it.
    without = explicit_attention(ours, x, is_causal=True).detach()
    assert (got[0] - without).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_only_in_training(backend):
    if backend in EXTENSION_BACKENDS:
        pytest.skip(f"the {backend} backend has no attention dropout")
    module = perturb(lmrt.nn.MultiheadAttention(EMBED, HEADS, dropout=0.5, device=DEVICE))
    without_dropout = lmrt.nn.MultiheadAttention(EMBED, HEADS, device=DEVICE)
    without_dropout.load_state_dict(module.state_dict())
    x = torch.randn(2, LENGTH, EMBED, device=DEVICE)
    with lmrt.backend(backend), torch.no_grad():
        module.eval()
        assert not module.training
        torch.testing.assert_close(module(x), without_dropout(x), rtol=0, atol=0)
        module.train()
        torch.manual_seed(1)
        first = module(x)
        second = module(x)
        torch.manual_seed(1)
        repeated = module(x)
    assert (first - second).abs().max() > 1e-2, "two training calls should draw different dropout masks"
    assert (first - without_dropout(x)).abs().max() > 1e-2, "dropout should change the training output"
    torch.testing.assert_close(first, repeated, rtol=0, atol=0)


class TestBadConfig:
    def test_heads_must_divide_width(self):
        with pytest.raises(ValueError, match=r"`num_heads` \(5\) must divide `embed_dim` \(24\)"):
            lmrt.nn.MultiheadAttention(24, 5)

    def test_kv_heads_must_divide_heads(self):
        with pytest.raises(ValueError, match=r"`num_kv_heads` \(4\) must divide `num_heads` \(6\)"):
            lmrt.nn.MultiheadAttention(24, 6, num_kv_heads=4)

    @pytest.mark.parametrize("heads", [(0, None), (3, 0)])
    def test_heads_at_least_one(self, heads):
        with pytest.raises(ValueError, match="must be >= 1"):
            lmrt.nn.MultiheadAttention(24, *heads)

    @pytest.mark.parametrize("dropout", [-0.1, 1.0])
    def test_dropout_in_range(self, dropout):
        with pytest.raises(ValueError, match=r"`dropout` must be in \[0, 1\)"):
            lmrt.nn.MultiheadAttention(24, 3, dropout=dropout)

    def test_rotary_head_dim(self):
        with pytest.raises(ValueError, match="`rotary` is for head_dim 4, but the heads are 8 wide"):
            lmrt.nn.MultiheadAttention(24, 3, rotary=lmrt.nn.RotaryEmbedding(4, 16))

    def test_rotary_is_for_self_attention(self):
        # Cross-attention's keys come from memory, which has no positions on the queries' axis: the module
        # rotates the queries alone (by positions that restart at 0 on every cached step), so the scores
        # depend on absolute query positions and a cached decoder disagrees with a full pass. Reject it.
        with pytest.raises(ValueError, match="rotary"):
            lmrt.nn.MultiheadAttention(24, 3, cross_attention=True, rotary=lmrt.nn.RotaryEmbedding(8, 16))

    def test_kdim_is_for_cross_attention(self):
        with pytest.raises(ValueError, match="`kdim` is for cross-attention"):
            lmrt.nn.MultiheadAttention(24, 3, kdim=20)


class TestBadInput:
    module = lmrt.nn.MultiheadAttention(EMBED, HEADS)

    @staticmethod
    def x():
        return torch.randn(BATCH, LENGTH, EMBED)

    def test_memory_for_self_attention(self):
        with pytest.raises(ValueError, match="`memory` is for cross-attention"):
            self.module(self.x(), self.x())

    def test_cross_attention_needs_memory(self):
        module = lmrt.nn.MultiheadAttention(EMBED, HEADS, cross_attention=True)
        with pytest.raises(ValueError, match="cross-attention needs `memory`"):
            module(self.x())

    @pytest.mark.parametrize("shape", [(BATCH, LENGTH + 1), (LENGTH,), (BATCH, 1, LENGTH), (BATCH + 2, LENGTH)],
                             ids=str)
    def test_padding_mask_shape(self, shape):
        expected = re.escape(f"`key_padding_mask` must be a bool tensor of shape ({BATCH}, {LENGTH})")
        with pytest.raises(ValueError, match=expected):
            self.module(self.x(), key_padding_mask=torch.zeros(shape, dtype=torch.bool))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
    def test_padding_mask_dtype(self, dtype):
        with pytest.raises(ValueError, match="`key_padding_mask` must be a bool tensor"):
            self.module(self.x(), key_padding_mask=torch.zeros(BATCH, LENGTH, dtype=dtype))
