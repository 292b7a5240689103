"""Transformer encoder and decoder layers on lmrt's attention and norms, pre-norm or post-norm.

Post-norm (`norm_first=False`, the original Transformer): x = norm(x + dropout(sublayer(x))) after each sublayer.
Pre-norm (`norm_first=True`, GPT-2 and most models since): x = x + dropout(sublayer(norm(x))), which trains
deep stacks without warmup tricks; a model then adds a final norm after its last layer. The sublayers and
dropouts sit where torch.nn.TransformerEncoderLayer and TransformerDecoderLayer put them.
"""

from __future__ import annotations

from torch import Tensor, nn

from lmrt.nn.attention import MultiheadAttention
from lmrt.nn.feed_forward import FeedForward
from lmrt.nn.kv_cache import LayerKVCache
from lmrt.nn.layer_norm import LayerNorm
from lmrt.nn.positional import RotaryEmbedding
from lmrt.nn.rms_norm import RMSNorm

NORMS = ("layer", "rms")


def make_norm(module: str, kind: str, embed_dim: int, eps: float, bias: bool, factory: dict) -> nn.Module:
    """lmrt's LayerNorm ("layer") or RMSNorm ("rms") over the last dim."""
    if kind == "layer":
        return LayerNorm(embed_dim, eps=eps, bias=bias, **factory)
    if kind == "rms":
        return RMSNorm(embed_dim, eps=eps, **factory)
    raise ValueError(f"lmrt.nn.{module}: `norm` must be one of {', '.join(NORMS)}, got {kind!r}")


class TransformerEncoderLayer(nn.Module):
    """Self-attention and a feed-forward block, each with a residual connection and a norm.

    forward(x, key_padding_mask=None, is_causal=False, cache=None): x is (batch, length, embed_dim);
    `key_padding_mask` (batch, keys) is True at padding keys; `is_causal` makes it a decoder-only (GPT) block;
    `cache` is the self-attention's LayerKVCache for incremental decoding.
    """

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, *, num_kv_heads: int | None = None,
                 dropout: float = 0.0, attention_dropout: float | None = None, activation: str = "gelu",
                 norm: str = "layer", norm_first: bool = True, eps: float = 1e-5, bias: bool = True,
                 rotary: RotaryEmbedding | None = None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.norm_first = norm_first
        self.self_attn = MultiheadAttention(embed_dim, num_heads, num_kv_heads, dropout=attention_dropout,
                                            bias=bias, rotary=rotary, **factory)
        self.feed_forward = FeedForward(embed_dim, ffn_dim, activation, dropout=dropout, bias=bias, **factory)
        self.norm1 = make_norm("TransformerEncoderLayer", norm, embed_dim, eps, bias, factory)
        self.norm2 = make_norm("TransformerEncoderLayer", norm, embed_dim, eps, bias, factory)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, is_causal: bool = False,
                cache: LayerKVCache | None = None) -> Tensor:
        def attend(h):
            return self.dropout1(self.self_attn(h, is_causal=is_causal, key_padding_mask=key_padding_mask,
                                                cache=cache))

        def feed_forward(h):
            return self.dropout2(self.feed_forward(h))

        if self.norm_first:
            x = x + attend(self.norm1(x))
            return x + feed_forward(self.norm2(x))
        x = self.norm1(x + attend(x))
        return self.norm2(x + feed_forward(x))


class TransformerDecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder's output (`memory`), and a feed-forward block.

    forward(x, memory, tgt_key_padding_mask=None, memory_key_padding_mask=None, cache=None, cross_cache=None):
    the padding masks are True at padding keys; `cache` is the self-attention's LayerKVCache and `cross_cache`
    the cross-attention's (the projected memory, computed on the first step and reused).
    """

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, *, num_kv_heads: int | None = None,
                 dropout: float = 0.0, attention_dropout: float | None = None, activation: str = "gelu",
                 norm: str = "layer", norm_first: bool = True, eps: float = 1e-5, bias: bool = True,
                 memory_dim: int | None = None, rotary: RotaryEmbedding | None = None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.norm_first = norm_first
        self.self_attn = MultiheadAttention(embed_dim, num_heads, num_kv_heads, dropout=attention_dropout,
                                            bias=bias, rotary=rotary, **factory)
        self.cross_attn = MultiheadAttention(embed_dim, num_heads, num_kv_heads, dropout=attention_dropout,
                                             bias=bias, cross_attention=True, kdim=memory_dim, **factory)
        self.feed_forward = FeedForward(embed_dim, ffn_dim, activation, dropout=dropout, bias=bias, **factory)
        self.norm1, self.norm2, self.norm3 = (make_norm("TransformerDecoderLayer", norm, embed_dim, eps, bias, factory)
                                              for _ in range(3))
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor | None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, cache: LayerKVCache | None = None,
                cross_cache: LayerKVCache | None = None) -> Tensor:
        def attend(h):
            return self.dropout1(self.self_attn(h, is_causal=True, key_padding_mask=tgt_key_padding_mask,
                                                cache=cache))

        def attend_memory(h):
            return self.dropout2(self.cross_attn(h, memory, key_padding_mask=memory_key_padding_mask,
                                                 cache=cross_cache))

        def feed_forward(h):
            return self.dropout3(self.feed_forward(h))

        if self.norm_first:
            x = x + attend(self.norm1(x))
            x = x + attend_memory(self.norm2(x))
            return x + feed_forward(self.norm3(x))
        x = self.norm1(x + attend(x))
        x = self.norm2(x + attend_memory(x))
        return self.norm3(x + feed_forward(x))
