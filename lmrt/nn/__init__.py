"""Modules on lmrt's ops: drop-in replacements for torch.nn's norms and softmax, and the Transformer layers."""

from lmrt.nn.attention import MultiheadAttention
from lmrt.nn.feed_forward import FeedForward
from lmrt.nn.kv_cache import KVCache, LayerKVCache
from lmrt.nn.layer_norm import LayerNorm
from lmrt.nn.positional import LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding
from lmrt.nn.rms_norm import RMSNorm
from lmrt.nn.softmax import Softmax
from lmrt.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = [
    "FeedForward", "KVCache", "LayerKVCache", "LayerNorm", "LearnedPositionalEmbedding", "MultiheadAttention",
    "RMSNorm", "RotaryEmbedding", "SinusoidalPositionalEncoding", "Softmax", "TransformerDecoderLayer",
    "TransformerEncoderLayer",
]
