"""lmrt.nn.FeedForward against its formula written with the module's weights: w2(act(w1 x)) for GELU and ReLU,
w2(silu(x W_gate^T) * (x W_up^T)) for SwiGLU from the two halves of the fused w1 (the gate first); forward and
backward, parameter gradients included; dropout in training mode only; clear errors for bad configurations.

Tolerance: float32 assert_close defaults; the twin runs the same float32 operations (the fused projection is one
matmul where the twin takes two), so the results agree to rounding, and a swapped half or wrong activation is
off by far more.
"""

import pytest
import torch
import torch.nn.functional as F

import lmrt
from tests.conftest import DEVICE
from tests.nn.test_attention import assert_same_results, perturb, run

EMBED, HIDDEN = 24, 40


def explicit_feed_forward(x, weights, activation):
    """The block's formula from separate leaf tensors: (w1, b1, w2, b2), or (w_gate, b_gate, w_up, b_up, w2, b2)."""
    if activation == "swiglu":
        w_gate, b_gate, w_up, b_up, w2, b2 = weights
        hidden = F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)
    else:
        w1, b1, w2, b2 = weights
        hidden = {"gelu": F.gelu, "relu": F.relu}[activation](F.linear(x, w1, b1))
    return F.linear(hidden, w2, b2)


class ExplicitFeedForward(torch.nn.Module):
    """The twin: the module's weights copied into separate parameters (w1 split into gate and up for SwiGLU)."""

    def __init__(self, module: lmrt.nn.FeedForward):
        super().__init__()
        self.activation = module.activation
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(t.clone()) for t in self.names_of_twin(module.state_dict()).values()])

    def forward(self, x):
        return explicit_feed_forward(x, list(self.weights), self.activation)

    @staticmethod
    def names_of_twin(tensors: dict) -> dict:
        """The module's parameters (or gradients) under the twin's names, w1 split into gate and up for SwiGLU."""
        w1, b1 = tensors["w1.weight"], tensors["w1.bias"]
        gated = len(w1) == 2 * tensors["w2.weight"].shape[1]
        first = [t for pair in zip(w1.chunk(2), b1.chunk(2), strict=True) for t in pair] if gated else [w1, b1]
        return {f"weights.{i}": t for i, t in enumerate([*first, tensors["w2.weight"], tensors["w2.bias"]])}


# FeedForward calls no lmrt op today; running it on both backends keeps the check when a fused kernel comes.
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_matches_formula(activation, backend):
    module = perturb(lmrt.nn.FeedForward(EMBED, HIDDEN, activation, device=DEVICE))
    assert module.w1.weight.shape == ((2 if activation == "swiglu" else 1) * HIDDEN, EMBED)
    twin = ExplicitFeedForward(module)
    x = torch.randn(3, 7, EMBED, device=DEVICE)
    grad = torch.randn_like(x)
    got = run(module, [x], grad, backend)
    assert_same_results(got, run(twin, [x], grad), twin.names_of_twin)


def test_no_bias():
    module = lmrt.nn.FeedForward(EMBED, HIDDEN, "swiglu", bias=False, device=DEVICE)
    assert module.w1.bias is None and module.w2.bias is None
    x = torch.randn(2, 5, EMBED, device=DEVICE)
    gate, up = module.w1.weight.chunk(2)
    torch.testing.assert_close(module(x), (F.silu(x @ gate.T) * (x @ up.T)) @ module.w2.weight.T)


def test_dropout_only_in_training():
    module = lmrt.nn.FeedForward(EMBED, HIDDEN, dropout=0.5, device=DEVICE)
    x = torch.randn(2, 5, EMBED, device=DEVICE)
    expected = explicit_feed_forward(x, [module.w1.weight, module.w1.bias, module.w2.weight, module.w2.bias], "gelu")
    module.eval()
    torch.testing.assert_close(module(x), expected)
    module.train()
    torch.manual_seed(1)
    first = module(x)
    torch.manual_seed(1)
    torch.testing.assert_close(module(x), first, rtol=0, atol=0)
    assert (first - expected).abs().max() > 1e-2
    assert (module(x) - first).abs().max() > 1e-2


class TestBadConfig:
    def test_unknown_activation(self):
        with pytest.raises(ValueError, match="`activation` must be one of gelu, relu, swiglu, got 'tanh'"):
            lmrt.nn.FeedForward(EMBED, HIDDEN, "tanh")

    @pytest.mark.parametrize("sizes", [(0, HIDDEN), (EMBED, 0)])
    def test_sizes_at_least_one(self, sizes):
        with pytest.raises(ValueError, match="must be >= 1"):
            lmrt.nn.FeedForward(*sizes)

    @pytest.mark.parametrize("dropout", [-0.1, 1.5])
    def test_dropout_in_range(self, dropout):
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
            lmrt.nn.FeedForward(EMBED, HIDDEN, dropout=dropout)
