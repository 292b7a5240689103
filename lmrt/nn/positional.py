"""Positional encodings: sinusoidal ("Attention Is All You Need"), learned, and rotary (RoFormer).

Each takes `offset`, the position of the first token it sees, so that a decoding step with a KV cache gets the
positions that follow the cached tokens. A position beyond the table raises a clear error.
"""

import math

import torch
from torch import Tensor, nn


def _check_positions(module: str, offset: int, length: int, max_length: int) -> None:
    if offset < 0:
        raise ValueError(f"lmrt.nn.{module}: `offset` must be >= 0, got {offset}")
    if offset + length > max_length:
        raise ValueError(f"lmrt.nn.{module}: positions {offset} to {offset + length - 1} do not fit the table of "
                         f"max_length={max_length}; the context may be at most {max_length} tokens")


def _sinusoids(positions: Tensor, embed_dim: int, base: float) -> Tensor:
    """The float64 encodings (len(positions), embed_dim) of float64 `positions`."""
    inv_freq = torch.exp(torch.arange(0, embed_dim, 2, dtype=torch.float64, device=positions.device)
                         * (-math.log(base) / embed_dim))
    angles = positions[:, None] * inv_freq
    table = positions.new_zeros(len(positions), embed_dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : embed_dim // 2])
    return table


def _rotary_angles(positions: Tensor, head_dim: int, base: float) -> Tensor:
    """The float64 angles (len(positions), head_dim / 2) of float64 `positions`."""
    return positions[:, None] * base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64,
                                                       device=positions.device) / head_dim)


def _positions(start: int, end: int, device) -> Tensor:
    return torch.arange(start, end, dtype=torch.float64, device=device)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoids of Vaswani et al.: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...).

    forward(x, offset=0) with x of shape (batch, length, embed_dim) returns x + PE[offset : offset + length].
    The table is a non-persistent float32 buffer: it is not in the state dict and follows the module's device. Float64
    x gets float64 encodings, computed at each call.
    """

    def __init__(self, embed_dim: int, max_length: int, base: float = 10000.0, device=None):
        super().__init__()
        if embed_dim < 1 or max_length < 1:
            raise ValueError(f"lmrt.nn.SinusoidalPositionalEncoding: `embed_dim` ({embed_dim}) and `max_length` "
                             f"({max_length}) must be >= 1")
        self.embed_dim, self.max_length, self.base = embed_dim, max_length, base
        self.register_buffer("table", _sinusoids(_positions(0, max_length, device), embed_dim, base).float(),
                             persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        end = offset + x.shape[-2]
        _check_positions("SinusoidalPositionalEncoding", offset, x.shape[-2], self.max_length)
        if x.dtype == torch.float64:  # the float32 table would cap a float64 run's precision near 1e-7
            return x + _sinusoids(_positions(offset, end, x.device), self.embed_dim, self.base)
        return x + self.table[offset: end].to(x.dtype)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, max_length={self.max_length}"


class LearnedPositionalEmbedding(nn.Module):
    """Adds a learned vector per position (GPT-2): forward(x, offset=0) returns x + weight[offset : offset + length]."""

    def __init__(self, max_length: int, embed_dim: int, device=None, dtype=None):
        super().__init__()
        self.max_length, self.embed_dim = max_length, embed_dim
        self.weight = nn.Parameter(torch.empty(max_length, embed_dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        _check_positions("LearnedPositionalEmbedding", offset, x.shape[-2], self.max_length)
        return x + self.weight[offset: offset + x.shape[-2]]

    def extra_repr(self) -> str:
        return f"max_length={self.max_length}, embed_dim={self.embed_dim}"


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al.), applied to queries and keys inside attention.

    Pairs (x[i], x[i + d/2]) of each head are rotated by the angle p * base^(-2i/d) at position p (the
    "rotate half" layout of GPT-NeoX and Llama), so that the score of a query and a key depends on their
    relative position only. forward(x, offset=0) takes x of shape (batch, length, heads, head_dim) and rotates in
    float32 with float32 tables (non-persistent buffers), or in float64 with angles computed at each call for float64
    x.
    """

    def __init__(self, head_dim: int, max_length: int, base: float = 10000.0, device=None):
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"lmrt.nn.RotaryEmbedding: `head_dim` must be even and >= 2, got {head_dim}")
        self.head_dim, self.max_length, self.base = head_dim, max_length, base
        angles = _rotary_angles(_positions(0, max_length, device), head_dim, base)
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # (max_length, head_dim / 2)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) (model.bfloat16(), say) rounds floating buffers: tables of bfloat16 would err by 2e-3, so
        # they are computed again, in float32, on their new device.
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            angles = _rotary_angles(_positions(0, self.max_length, self.cos.device), self.head_dim, self.base)
            self.cos, self.sin = angles.cos().float(), angles.sin().float()
        return self

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"lmrt.nn.RotaryEmbedding: the last dim of `x` must be head_dim={self.head_dim}, "
                             f"got shape {list(x.shape)}")
        length = x.shape[-3]
        _check_positions("RotaryEmbedding", offset, length, self.max_length)
        if x.dtype == torch.float64:  # the float32 tables would cap a float64 run's precision near 1e-7
            angles = _rotary_angles(_positions(offset, offset + length, x.device), self.head_dim, self.base)
            cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        else:
            cos = self.cos[offset: offset + length, None, :]  # broadcast over the heads
            sin = self.sin[offset: offset + length, None, :]
        first, second = x.to(cos.dtype).chunk(2, dim=-1)
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        return rotated.to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_length={self.max_length}, base={self.base}"
