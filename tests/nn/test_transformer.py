"""lmrt.nn.TransformerEncoderLayer and TransformerDecoderLayer against torch.nn's with the same weights (post-norm
and pre-norm, GELU and ReLU, LayerNorm, and RMSNorm with torch.nn.RMSNorm put in the twin's norm slots), with
padding and causal masks, on the torch and triton backends, forward and backward; the two backends agree on the
features torch.nn lacks (grouped-query heads, rotary, SwiGLU); dropout in training mode only; torch.compile with
fullgraph; clear errors for bad configurations.

Tolerance: float32 assert_close defaults. The layers compute what torch.nn's do in float32, in another order
(fused projections, the norms' and attention's own accumulation); errors stay near 1e-6 through a layer at width
24, while a mis-mapped weight, a norm in the wrong place or a lost mask is off by 1e-2 or more.
"""

import pytest
import torch

import lmrt
from tests.conftest import BACKENDS, DEVICE
from tests.nn.test_attention import assert_same_results, causal_mask, mha_to_torch, padding_mask, perturb, run

BATCH, LENGTH, EMBED, HEADS, FFN = 3, 7, 24, 3, 40
MEMORY_LENGTH = 5


def layer_to_torch(tensors: dict) -> dict:
    """An lmrt encoder or decoder layer's parameters (or gradients) under torch.nn's names: self_attn.qkv_proj is
    self_attn.in_proj, cross_attn is multihead_attn, feed_forward.w1/w2 are linear1/linear2, the norms keep theirs."""
    mapped = mha_to_torch(tensors, "self_attn.", "self_attn.")
    if "cross_attn.q_proj.weight" in tensors:
        mapped.update(mha_to_torch(tensors, "cross_attn.", "multihead_attn."))
    for ours, theirs in (("feed_forward.w1", "linear1"), ("feed_forward.w2", "linear2")):
        mapped.update({f"{theirs}.{n}": tensors[f"{ours}.{n}"] for n in ("weight", "bias")})
    mapped.update({name: t for name, t in tensors.items() if name.startswith("norm")})
    return mapped


def torch_twin(ours: torch.nn.Module, torch_cls, norm: str, activation: str, norm_first: bool):
    """torch.nn's layer with our layer's weights, in training mode (dropout 0) so that it never takes its
    inference fast path; RMSNorm layers get torch.nn.RMSNorm in the norm slots its forward calls."""
    theirs = torch_cls(EMBED, HEADS, FFN, dropout=0.0, activation=activation, batch_first=True,
                       norm_first=norm_first, device=DEVICE)
    if norm == "rms":
        for name in ("norm1", "norm2", "norm3"):
            if hasattr(theirs, name):
                setattr(theirs, name, torch.nn.RMSNorm(EMBED, eps=1e-5, device=DEVICE))
    theirs.load_state_dict(layer_to_torch(ours.state_dict()))
    return theirs


# Each norm placement meets each activation and each mask; RMSNorm takes one of each placement.
ENCODER_CASES = [(False, "relu", "layer", False), (False, "gelu", "layer", True), (True, "gelu", "layer", False),
                 (True, "relu", "layer", True), (False, "gelu", "rms", True), (True, "relu", "rms", False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_first,activation,norm,is_causal", ENCODER_CASES, ids=str)
def test_encoder_layer_matches_torch(norm_first, activation, norm, is_causal, backend):
    ours = perturb(lmrt.nn.TransformerEncoderLayer(EMBED, HEADS, FFN, activation=activation, norm=norm,
                                                   norm_first=norm_first, device=DEVICE))
    theirs = torch_twin(ours, torch.nn.TransformerEncoderLayer, norm, activation, norm_first)
    x = torch.randn(BATCH, LENGTH, EMBED, device=DEVICE)
    grad = torch.randn_like(x)
    mask = padding_mask([7, 3, 5], LENGTH)
    got = run(ours, [x], grad, backend, key_padding_mask=mask, is_causal=is_causal)
    src_mask = causal_mask(LENGTH) if is_causal else None
    expected = run(theirs, [x], grad, src_mask=src_mask, src_key_padding_mask=mask, is_causal=is_causal)
    assert_same_results(got, expected, layer_to_torch)


DECODER_CASES = [(False, "relu", "layer"), (True, "gelu", "layer"), (True, "gelu", "rms")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_first,activation,norm", DECODER_CASES, ids=str)
def test_decoder_layer_matches_torch(norm_first, activation, norm, backend):
    ours = perturb(lmrt.nn.TransformerDecoderLayer(EMBED, HEADS, FFN, activation=activation, norm=norm,
                                                   norm_first=norm_first, device=DEVICE))
    theirs = torch_twin(ours, torch.nn.TransformerDecoderLayer, norm, activation, norm_first)
    x = torch.randn(BATCH, LENGTH, EMBED, device=DEVICE)
    memory = torch.randn(BATCH, MEMORY_LENGTH, EMBED, device=DEVICE)
    grad = torch.randn_like(x)
    tgt_mask, memory_mask = padding_mask([7, 4, 6], LENGTH), padding_mask([5, 5, 2], MEMORY_LENGTH)
    got = run(ours, [x, memory], grad, backend, tgt_key_padding_mask=tgt_mask, memory_key_padding_mask=memory_mask)
    expected = run(theirs, [x, memory], grad, tgt_mask=causal_mask(LENGTH), tgt_is_causal=True,
                   tgt_key_padding_mask=tgt_mask, memory_key_padding_mask=memory_mask)
    assert_same_results(got, expected, layer_to_torch)


def test_decoder_layer_memory_of_another_width():
    # torch.nn's decoder layer has no memory width of its own; the cross-attention twin of test_attention covers
    # the projection, here the layer must pass memory_dim through and give each batch row its own memory.
    layer = perturb(lmrt.nn.TransformerDecoderLayer(EMBED, HEADS, FFN, memory_dim=20, device=DEVICE))
    assert layer.cross_attn.kv_proj.weight.shape == (2 * EMBED, 20)
    x, memory = torch.randn(BATCH, LENGTH, EMBED, device=DEVICE), torch.randn(BATCH, MEMORY_LENGTH, 20, device=DEVICE)
    out = layer(x, memory)
    torch.testing.assert_close(layer(x[1:2], memory[1:2]), out[1:2])
    assert (layer(x, memory.roll(1, 0)) - out).abs().max() > 1e-2


def test_backends_agree_without_torch_twin():
    # Grouped-query heads, rotary positions, SwiGLU and RMSNorm together, on a causal encoder layer and a decoder
    # layer: the triton backend's kernels against the torch backend's reference.
    rotary = lmrt.nn.RotaryEmbedding(4, max_length=LENGTH, device=DEVICE)
    config = dict(num_kv_heads=2, activation="swiglu", norm="rms", device=DEVICE)
    encoder = perturb(lmrt.nn.TransformerEncoderLayer(EMBED, 6, FFN, rotary=rotary, **config))
    decoder = perturb(lmrt.nn.TransformerDecoderLayer(EMBED, 6, FFN, norm_first=False, memory_dim=20, **config))
    x = torch.randn(BATCH, LENGTH, EMBED, device=DEVICE)
    memory = torch.randn(BATCH, MEMORY_LENGTH, 20, device=DEVICE)
    grad = torch.randn_like(x)
    mask = padding_mask([7, 2, 5], LENGTH)
    for module, inputs, kwargs in ((encoder, [x], dict(key_padding_mask=mask, is_causal=True)),
                                   (decoder, [x, memory], dict(tgt_key_padding_mask=mask))):
        assert_same_results(run(module, inputs, grad, "triton", **kwargs), run(module, inputs, grad, "torch", **kwargs))


def test_dropout_only_in_training():
    layer = perturb(lmrt.nn.TransformerEncoderLayer(EMBED, HEADS, FFN, dropout=0.3, device=DEVICE))
    without_dropout = lmrt.nn.TransformerEncoderLayer(EMBED, HEADS, FFN, device=DEVICE)
    without_dropout.load_state_dict(layer.state_dict())
    x = torch.randn(2, LENGTH, EMBED, device=DEVICE)
    layer.eval()
    torch.testing.assert_close(layer(x), without_dropout(x), rtol=0, atol=0)
    layer.train()
    torch.manual_seed(1)
    first = layer(x)
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
    assert (first - without_dropout(x)).abs().max() > 1e-2


def test_compiles_without_graph_breaks():
    # Not tests.tolerance.check_compiled_matches_eager: that one runs the triton backend and compares the inputs'
    # gradients only, where a layer's parameters' gradients matter as much.
    layer = perturb(lmrt.nn.TransformerEncoderLayer(EMBED, HEADS, FFN, device=DEVICE))
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, LENGTH, EMBED, device=DEVICE)
    grad = torch.randn_like(x)
    mask = padding_mask([7, 4], LENGTH)
    got = run(layer, [x], grad, "torch", forward=compiled, key_padding_mask=mask, is_causal=True)
    assert_same_results(got, run(layer, [x], grad, "torch", key_padding_mask=mask, is_causal=True))


class TestBadConfig:
    @pytest.mark.parametrize("cls", [lmrt.nn.TransformerEncoderLayer, lmrt.nn.TransformerDecoderLayer])
    def test_unknown_norm(self, cls):
        with pytest.raises(ValueError, match=f"lmrt.nn.{cls.__name__}: `norm` must be one of layer, rms, got 'batch'"):
            cls(EMBED, HEADS, FFN, norm="batch")

    def test_unknown_activation(self):
        with pytest.raises(ValueError, match="`activation` must be one of gelu, relu, swiglu, got 'tanh'"):
            lmrt.nn.TransformerEncoderLayer(EMBED, HEADS, FFN, activation="tanh")

    def test_heads_must_divide_width(self):
        with pytest.raises(ValueError, match=r"`num_heads` \(5\) must divide `embed_dim` \(24\)"):
            lmrt.nn.TransformerDecoderLayer(EMBED, 5, FFN)

    def test_kv_heads_must_divide_heads(self):
        with pytest.raises(ValueError, match=r"`num_kv_heads` \(4\) must divide `num_heads` \(6\)"):
            lmrt.nn.TransformerEncoderLayer(EMBED, 6, FFN, num_kv_heads=4)

    @pytest.mark.parametrize("dropouts", [dict(dropout=1.0), dict(dropout=0.1, attention_dropout=-0.5)], ids=str)
    def test_dropout_in_range(self, dropouts):
        with pytest.raises(ValueError, match=r"`dropout` must be in \[0, 1\)"):
            lmrt.nn.TransformerEncoderLayer(EMBED, HEADS, FFN, **dropouts)

    def test_rotary_head_dim(self):
        with pytest.raises(ValueError, match="`rotary` is for head_dim 4, but the heads are 8 wide"):
            lmrt.nn.TransformerDecoderLayer(EMBED, HEADS, FFN, rotary=lmrt.nn.RotaryEmbedding(4, 16))
