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


def _sinusoids(start: int, end: int, embed_dim: int, base: float, device) -> Tensor:
    """The float64 encodings (end - start, embed_dim) of positions start to end - 1."""
    positions = torch.arange(start, end, dtype=torch.float64, device=device)[:, None]
    angles = positions * torch.exp(torch.arange(0, embed_dim, 2, dtype=torch.float64, device=device)
                                   * (-math.log(base) / embed_dim))
    table = positions.new_zeros(end - start, embed_dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : embed_dim // 2])
    return table


def _rotary_cos_sin(start: int, end: int, head_dim: int, base: float, device) -> tuple[Tensor, Tensor]:
    """The float64 cos and sin (end - start, head_dim / 2) of the rotary angles of positions start to end - 1."""
    positions = torch.arange(start, end, dtype=torch.float64, device=device)[:, None]
    angles = positions * base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    return angles.cos(), angles.sin()


class FixedTables(nn.Module):
    """Base of the encodings whose tables are functions of their settings alone: float32 buffers, not in the state
    dict, computed in float64 on the CPU and rounded once. They are computed again by reset_parameters and after
    every Module._apply: model.bfloat16() would otherwise round them (bfloat16 tables err by 2e-3), and
    Module.to_empty (the meta-device recipe) would leave them uninitialized, which load_state_dict cannot mend."""

    def _tables(self) -> dict[str, Tensor]:
        """The float64 tables by buffer name."""
        raise NotImplementedError

    def _register_tables(self, device) -> None:
        for name, table in self._tables().items():
            self.register_buffer(name, table.float().to(device), persistent=False)

    def reset_parameters(self) -> None:
        device = next(self.buffers()).device
        for name, table in self._tables().items():
            setattr(self, name, table.float().to(device))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.reset_parameters()
        return self


class SinusoidalPositionalEncoding(FixedTables):
    """Adds the fixed sinusoids of Vaswani et al.: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...).

    forward(x, offset=0) with x of shape (batch, length, embed_dim) returns x + PE[offset : offset + length].
    The table is a float32 buffer (see FixedTables): it is not in the state dict and follows the module's device.
    Float64 x gets float64 encodings, computed at each call.
    """

    def __init__(self, embed_dim: int, max_length: int, base: float = 10000.0, device=None):
        super().__init__()
        if embed_dim < 1 or max_length < 1:
            raise ValueError(f"lmrt.nn.SinusoidalPositionalEncoding: `embed_dim` ({embed_dim}) and `max_length` "
                             f"({max_length}) must be >= 1")
        self.embed_dim, self.max_length, self.base = embed_dim, max_length, base
        self._register_tables(device)

    def _tables(self) -> dict[str, Tensor]:
        return {"table": _sinusoids(0, self.max_length, self.embed_dim, self.base, "cpu")}

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        end = offset + x.shape[-2]
        _check_positions("SinusoidalPositionalEncoding", offset, x.shape[-2], self.max_length)
        if x.dtype == torch.float64:  # the float32 table would cap a float64 run's precision near 1e-7
            return x + _sinusoids(offset, end, self.embed_dim, self.base, x.device)
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


class RotaryEmbedding(FixedTables):
    """Rotary position embedding (Su et al.), applied to queries and keys inside attention.

    Pairs (x[i], x[i + d/2]) of each head are rotated by the angle p * base^(-2i/d) at position p (the
    "rotate half" layout of GPT-NeoX and Llama), so that the score of a query and a key depends on their
    relative position only. forward(x, offset=0) takes x of shape (batch, length, heads, head_dim) and rotates in
    float32 with float32 tables (buffers, see FixedTables), or in float64 with angles computed at each call for
    float64 x.
    """

    def __init__(self, head_dim: int, max_length: int, base: float = 10000.0, device=None):
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"lmrt.nn.RotaryEmbedding: `head_dim` must be even and >= 2, got {head_dim}")
        self.head_dim, self.max_length, self.base = head_dim, max_length, base
        self._register_tables(device)

    def _tables(self) -> dict[str, Tensor]:
        cos, sin = _rotary_cos_sin(0, self.max_length, self.head_dim, self.base, "cpu")
        return {"cos": cos, "sin": sin}  # (max_length, head_dim / 2)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"lmrt.nn.RotaryEmbedding: the last dim of `x` must be head_dim={self.head_dim}, "
                             f"got shape {list(x.shape)}")
        length = x.shape[-3]
        _check_positions("RotaryEmbedding", offset, length, self.max_length)
        if x.dtype == torch.float64:  # the float32 tables would cap a float64 run's precision near 1e-7
            cos, sin = _rotary_cos_sin(offset, offset + length, self.head_dim, self.base, x.device)
        else:
            cos, sin = self.cos[offset: offset + length], self.sin[offset: offset + length]
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over the heads
        first, second = x.to(cos.dtype).chunk(2, dim=-1)
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        return rotated.to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_length={self.max_length}, base={self.base}"
