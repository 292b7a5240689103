"""Multi-head attention on lmrt.ops.scaled_dot_product_attention: self or cross, causal, key padding, grouped-query
heads, a fused projection, dropout, rotary positions and a KV cache.

Tensors are batch-first, (batch, length, embed_dim). The projections give (batch, length, heads, head_dim) views
that are transposed, not copied, to the (batch, heads, length, head_dim) the op takes: it reads any strides. The
cached keys and values are views into the cache's buffers, read in place as well.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmrt import ops
from lmrt.nn.kv_cache import LayerKVCache
from lmrt.nn.positional import RotaryEmbedding


def check_heads(owner: str, embed_dim: int, num_heads: int, num_kv_heads: int,
                names: tuple[str, str, str] = ("embed_dim", "num_heads", "num_kv_heads")) -> None:
    """Heads that divide the width, and key/value heads that divide the query heads; the errors name `owner` (a
    qualified class name) and its own `names` of the three."""
    width, heads, kv_heads = names
    if embed_dim < 1 or num_heads < 1 or num_kv_heads < 1:
        raise ValueError(f"{owner}: `{width}` ({embed_dim}), `{heads}` ({num_heads}) and `{kv_heads}` "
                         f"({num_kv_heads}) must be >= 1")
    if embed_dim % num_heads:
        raise ValueError(f"{owner}: `{heads}` ({num_heads}) must divide `{width}` ({embed_dim})")
    if num_heads % num_kv_heads:
        raise ValueError(f"{owner}: `{kv_heads}` ({num_kv_heads}) must divide `{heads}` ({num_heads})")


class MultiheadAttention(nn.Module):
    """Multi-head attention, batch-first.

    Self-attention (`cross_attention=False`) projects queries, keys and values with one fused linear layer whose
    weight stacks [W_q; W_k; W_v] (the layout of torch.nn.MultiheadAttention's `in_proj_weight`). Cross-attention
    projects the queries with `q_proj` and the keys and values of `memory` (width `kdim`) with one fused `kv_proj`.
    With `num_kv_heads` < `num_heads`, groups of query heads share key/value heads (grouped-query attention; 1 is
    multi-query attention), without repeating them in memory. `rotary`, if given, rotates queries and keys by their
    positions. `dropout` is the attention-probability dropout, active in training mode.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, *, dropout: float = 0.0,
                 bias: bool = True, cross_attention: bool = False, kdim: int | None = None,
                 rotary: RotaryEmbedding | None = None, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_heads("lmrt.nn.MultiheadAttention", embed_dim, num_heads, num_kv_heads)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lmrt.nn.MultiheadAttention: `dropout` must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout, self.cross_attention = dropout, cross_attention
        if rotary is not None and rotary.head_dim != self.head_dim:
            raise ValueError(f"lmrt.nn.MultiheadAttention: `rotary` is for head_dim {rotary.head_dim}, but the heads "
                             f"are {self.head_dim} wide")
        if rotary is not None and cross_attention:
            raise ValueError("lmrt.nn.MultiheadAttention: `rotary` is for self-attention; cross-attention keys come "
                             "from memory and have no positions")
        self.rotary = rotary
        factory = dict(device=device, dtype=dtype)
        kv_width = 2 * num_kv_heads * self.head_dim
        if cross_attention:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
            self.kv_proj = nn.Linear(embed_dim if kdim is None else kdim, kv_width, bias=bias, **factory)
        else:
            if kdim is not None:
                raise ValueError("lmrt.nn.MultiheadAttention: `kdim` is for cross-attention; self-attention keys "
                                 "come from the queries' own width")
            self.qkv_proj = nn.Linear(embed_dim, embed_dim + kv_width, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(self, query: Tensor, memory: Tensor | None = None, *, is_causal: bool = False,
                key_padding_mask: Tensor | None = None, cache: LayerKVCache | None = None) -> Tensor:
        """Attend from `query` (batch, L, embed_dim) to itself, or to `memory` (batch, S, kdim) in cross-attention.

        `is_causal`: query i sees keys up to its own position (with a cache, the cached keys and itself).
        `key_padding_mask`: (batch, keys) bool, True where a key is padding and must be ignored (the convention
        of torch.nn.MultiheadAttention); with a self-attention cache it covers the cached keys and the new ones.
        `cache`: self-attention appends the new keys and values and attends to everything cached, at positions
        that continue after the cached ones; cross-attention projects `memory` once, on the first call, and
        reuses it afterwards (`memory` may then be None).
        """
        batch, length, _ = query.shape
        cached = cache is not None and cache.length > 0
        if self.cross_attention and memory is None and not cached:
            raise ValueError("lmrt.nn.MultiheadAttention: cross-attention needs `memory`")
        if not self.cross_attention and memory is not None:
            raise ValueError("lmrt.nn.MultiheadAttention: `memory` is for cross-attention; this module does "
                             "self-attention (cross_attention=False)")
        offset = 0 if cache is None or self.cross_attention else cache.length
        keys = (cache.length if cached else memory.shape[1]) if self.cross_attention else offset + length
        _check_padding_mask(key_padding_mask, batch, keys)  # before the cache grows: a refused call leaves it alone
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        if self.cross_attention:
            q = self.q_proj(query).view(batch, length, heads, head_dim)
            if cached:
                k, v = cache.cached()
            else:
                kv = self.kv_proj(memory).view(batch, memory.shape[1], 2 * kv_heads, head_dim)
                k, v = kv.transpose(1, 2).split(kv_heads, dim=1)
                if cache is not None:
                    k, v = cache.append(k, v)
        else:
            qkv = self.qkv_proj(query).view(batch, length, heads + 2 * kv_heads, head_dim)
            q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
            if self.rotary is not None:
                k = self.rotary(k, offset)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                k, v = cache.append(k, v)
        if self.rotary is not None:
            q = self.rotary(q, offset)
        q = q.transpose(1, 2)
        mask, is_causal = self._mask(key_padding_mask, is_causal, length, k.shape[2], offset, query.device)
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               enable_gqa=kv_heads != heads)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))

    def _mask(self, key_padding_mask: Tensor | None, is_causal: bool, length: int, keys: int, offset: int,
              device: torch.device) -> tuple[Tensor | None, bool]:
        """The op's (mask, is_causal) for this call: the op's causal alignment is top-left, which is the right one
        only when the queries start at position 0; later queries (a cached prefix) get an explicit mask."""
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        if not is_causal or offset == 0 or length == 1:  # one new query sees every cached key
            return mask, is_causal and offset == 0
        positions = torch.arange(offset, offset + length, device=device)
        causal = positions[:, None] >= torch.arange(keys, device=device)
        return (causal if mask is None else mask & causal), False

    def extra_repr(self) -> str:
        kind = "cross" if self.cross_attention else "self"
        return (f"{kind}-attention, embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, dropout={self.dropout}")


def _check_padding_mask(key_padding_mask: Tensor | None, batch: int, keys: int) -> None:
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or
                                         key_padding_mask.shape != (batch, keys)):
        raise ValueError(f"lmrt.nn.MultiheadAttention: `key_padding_mask` must be a bool tensor of shape ({batch}, "
                         f"{keys}), got {key_padding_mask.dtype} of shape {list(key_padding_mask.shape)}")
