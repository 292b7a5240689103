"""GPT: a decoder-only Transformer language model (Radford et al. 2019) on lmrt's layers.

Token embedding plus positions (learned, as GPT-2, or rotary), a stack of pre-norm causal Transformer layers, a
final norm, and an output head tied to the token embedding. forward(idx, targets) returns the logits and, given
targets, the mean cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmrt._settings import require_at_least, require_dropout, require_one_of, require_types
from lmrt.models._common import LanguageModel, check_targets, check_token_ids, language_model_loss
from lmrt.nn.attention import check_heads
from lmrt.nn.feed_forward import ACTIVATIONS
from lmrt.nn.kv_cache import KVCache
from lmrt.nn.positional import LearnedPositionalEmbedding, RotaryEmbedding
from lmrt.nn.transformer import NORMS, TransformerEncoderLayer, make_norm

POSITIONS = ("learned", "rotary")


@dataclass
class GPTConfig:
    """The shape of a GPT. `ffn_dim` defaults to 4 * n_embd (GELU), or the multiple of 64 nearest 8/3 * n_embd for
    SwiGLU, which keeps the parameter count. `n_kv_head` < `n_head` gives grouped-query attention."""

    vocab_size: int = 256
    context_length: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: int | None = None
    ffn_dim: int | None = None
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layer"
    activation: str = "gelu"
    position: str = "learned"
    tie_weights: bool = True
    eps: float = 1e-5

    def __post_init__(self):
        require_types(self)
        require_at_least(self, 1, ("vocab_size", "context_length", "n_layer"))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        check_heads("lmrt.models.GPTConfig", self.n_embd, self.n_head, self.n_kv_head,
                    names=("n_embd", "n_head", "n_kv_head"))
        require_one_of(self, dict(norm=NORMS, activation=ACTIVATIONS, position=POSITIONS))
        require_dropout(self)
        if self.ffn_dim is None:
            swiglu_width = max(64, round(8 * self.n_embd / 3 / 64) * 64)
            self.ffn_dim = swiglu_width if self.activation == "swiglu" else 4 * self.n_embd

    @classmethod
    def gpt2_small(cls, **overrides) -> GPTConfig:
        """GPT-2 small: 12 layers, 12 heads, width 768, context 1024, GPT-2's 50257 tokens padded to 50304 (a
        multiple of 64, faster matmuls); 124M parameters."""
        return cls(**{**dict(vocab_size=50304, context_length=1024, n_layer=12, n_head=12, n_embd=768), **overrides})


class GPT(LanguageModel):
    """A decoder-only Transformer language model; see GPTConfig."""

    def __init__(self, config: GPTConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = dict(device=device, dtype=dtype)
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd, **factory)
        head_dim = config.n_embd // config.n_head
        self.rotary = (RotaryEmbedding(head_dim, config.context_length, device=device)
                       if config.position == "rotary" else None)
        self.position_embedding = (LearnedPositionalEmbedding(config.context_length, config.n_embd, **factory)
                                   if config.position == "learned" else None)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(config.n_embd, config.n_head, config.ffn_dim, num_kv_heads=config.n_kv_head,
                                    dropout=config.dropout, activation=config.activation, norm=config.norm,
                                    norm_first=True, eps=config.eps, bias=config.bias, rotary=self.rotary, **factory)
            for _ in range(config.n_layer))
        self.final_norm = make_norm("GPT", config.norm, config.n_embd, config.eps, config.bias, factory)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False, **factory)
        self.reset_parameters()
        self._tie_weights()

    def _tied_embedding(self) -> nn.Embedding | None:
        return self.token_embedding if self.config.tie_weights else None

    def reset_parameters(self) -> None:
        """GPT-2's initialization: N(0, 0.02) weights, zero biases, unit norms, and the projections that feed the
        residual stream scaled by 1/sqrt(2 * n_layer), so that the stream's variance does not grow with depth."""
        self._reset_norms_and_tables()
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding | LearnedPositionalEmbedding):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for layer in self.layers:
            for projection in (layer.self_attn.out_proj, layer.feed_forward.w2):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, cache: KVCache | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """Logits (batch, length, vocab) for token ids `idx` (batch, length), and the loss against `targets`
        (batch, length; IGNORE_INDEX = -100 skips a position) or None. With `cache` (from init_decoding), `idx`
        continues the cached tokens."""
        check_token_ids("GPT", "idx", idx, self.config.vocab_size)
        if targets is not None:
            check_targets("GPT", targets, idx, self.config.vocab_size)
        offset = 0 if cache is None else cache.length
        if offset + idx.shape[1] > self.config.context_length:
            raise ValueError(f"lmrt.models.GPT: {offset + idx.shape[1]} tokens exceed the context length "
                             f"{self.config.context_length}")
        x = self.token_embedding(idx)
        if self.position_embedding is not None:
            x = self.position_embedding(x, offset)
        x = self.dropout(x)
        for index, layer in enumerate(self.layers):
            x = layer(x, is_causal=True, cache=None if cache is None else cache[index])
        logits = self.head(self.final_norm(x))
        return logits, None if targets is None else language_model_loss(logits, targets)

    def init_decoding(self, batch_size: int, max_length: int) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_length` tokens."""
        if max_length > self.config.context_length:
            raise ValueError(f"lmrt.models.GPT: decoding {max_length} tokens (the prompt and every new one but the "
                             f"last) exceeds the context length {self.config.context_length}")
        return KVCache(self.config.n_layer, max_length)

    def decode(self, tokens: Tensor, state: KVCache) -> Tensor:
        return self(tokens, cache=state)[0]

    @torch.no_grad()
    def estimate_mfu(self, tokens_per_second: float, peak_flops: float) -> float:
        """Model FLOPs utilization of a training run at `tokens_per_second` on hardware of `peak_flops` FLOP/s:
        6 FLOPs per parameter per token (forward and backward matmuls) plus the attention scores' 12 * layers *
        width * context per token (PaLM, appendix B)."""
        config = self.config
        flops_per_token = 6 * self.num_parameters(non_embedding=True) + 12 * config.n_layer * config.n_embd * \
            config.context_length
        return flops_per_token * tokens_per_second / peak_flops
