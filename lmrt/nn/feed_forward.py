"""The position-wise feed-forward block of a Transformer layer: GELU (or ReLU) or SwiGLU."""

import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("gelu", "relu", "swiglu")


class FeedForward(nn.Module):
    """Linear, activation, dropout, linear.

    "gelu" and "relu": w2(dropout(act(w1 x))), as in GPT-2 and torch.nn.TransformerEncoderLayer. "swiglu"
    (Shazeer, 2020): w2(dropout(silu(x W_gate) * (x W_up))), with the gate and up projections fused into one
    linear layer `w1` of twice the hidden width (the gate first). A SwiGLU layer with hidden width 8/3 * d has the
    parameters of a GELU layer with 4 * d.
    """

    def __init__(self, embed_dim: int, hidden_dim: int, activation: str = "gelu", *, dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"lmrt.nn.FeedForward: `activation` must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {activation!r}")
        if embed_dim < 1 or hidden_dim < 1:
            raise ValueError(f"lmrt.nn.FeedForward: `embed_dim` ({embed_dim}) and `hidden_dim` ({hidden_dim}) "
                             f"must be >= 1")
        self.activation = activation
        factory = dict(device=device, dtype=dtype)
        gated = activation == "swiglu"
        self.w1 = nn.Linear(embed_dim, 2 * hidden_dim if gated else hidden_dim, bias=bias, **factory)
        self.w2 = nn.Linear(hidden_dim, embed_dim, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.w1(x)
        if self.activation == "swiglu":
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        elif self.activation == "gelu":
            hidden = F.gelu(hidden)
        else:
            hidden = F.relu(hidden)
        return self.w2(self.dropout(hidden))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
