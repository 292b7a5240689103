"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017) on lmrt's layers.

Token embeddings scaled by sqrt(d_model) plus sinusoidal positions; an encoder of self-attention layers over the
source; a decoder of masked self-attention, cross-attention to the encoder's output, and feed-forward layers;
an output head tied to the target embedding. Post-norm by default, as in the paper (pre-norm adds a final norm
after each stack). Padding: source and target positions equal to `pad_id` are masked out of attention unless
explicit padding masks are given.
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
from lmrt.nn.positional import SinusoidalPositionalEncoding
from lmrt.nn.transformer import NORMS, TransformerDecoderLayer, TransformerEncoderLayer, make_norm


@dataclass
class Seq2SeqConfig:
    """The shape of an encoder-decoder Transformer; the defaults are a small "base" model. `share_embeddings` ties
    the source and target embeddings (one shared vocabulary); the output head is always tied to the target's."""

    src_vocab_size: int = 256
    tgt_vocab_size: int = 256
    max_length: int = 256
    d_model: int = 128
    n_head: int = 4
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    ffn_dim: int = 512
    dropout: float = 0.1
    activation: str = "relu"
    norm: str = "layer"
    norm_first: bool = False
    share_embeddings: bool = False
    pad_id: int | None = 0
    bos_id: int = 1
    eos_id: int = 2
    eps: float = 1e-5

    def __post_init__(self):
        require_types(self)
        require_at_least(self, 1, ("src_vocab_size", "tgt_vocab_size", "max_length", "n_encoder_layers",
                                   "n_decoder_layers", "ffn_dim"))
        require_dropout(self)
        check_heads("lmrt.models.Seq2SeqConfig", self.d_model, self.n_head, self.n_head,
                    names=("d_model", "n_head", "n_head"))
        require_one_of(self, dict(norm=NORMS, activation=ACTIVATIONS))
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(f"Seq2SeqConfig: `share_embeddings` needs one vocabulary, but src_vocab_size is "
                             f"{self.src_vocab_size} and tgt_vocab_size {self.tgt_vocab_size}")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.tgt_vocab_size:
                raise ValueError(f"Seq2SeqConfig: `{name}` ({value}) must be a target token id in "
                                 f"[0, {self.tgt_vocab_size})")


class Seq2SeqState:
    """What decoding keeps between steps: the encoded source, its padding mask, and the decoder's KV caches."""

    def __init__(self, memory: Tensor, memory_padding_mask: Tensor | None, n_layers: int, max_length: int):
        self.memory, self.memory_padding_mask = memory, memory_padding_mask
        self.self_attention = KVCache(n_layers, max_length)
        # An empty source (allowed, as in forward: cross-attention over no keys gives zeros) caches nothing, but a
        # cache needs room for one position.
        self.cross_attention = KVCache(n_layers, max(1, memory.shape[1]))

    def reorder(self, batch_indices: Tensor) -> None:
        self.memory = self.memory.index_select(0, batch_indices)
        if self.memory_padding_mask is not None:
            self.memory_padding_mask = self.memory_padding_mask.index_select(0, batch_indices)
        self.self_attention.reorder(batch_indices)
        self.cross_attention.reorder(batch_indices)


class Seq2SeqTransformer(LanguageModel):
    """An encoder-decoder Transformer; see Seq2SeqConfig.

    forward(src, tgt, targets=None) returns the logits for every target position and the loss against `targets`
    (usually `tgt` shifted left by one: tgt starts with bos_id, targets end with eos_id). generate(src, ...)
    decodes from bos_id.
    """

    def __init__(self, config: Seq2SeqConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = dict(device=device, dtype=dtype)
        d_model = config.d_model
        self.tgt_embedding = nn.Embedding(config.tgt_vocab_size, d_model, **factory)
        self.src_embedding = (self.tgt_embedding if config.share_embeddings
                              else nn.Embedding(config.src_vocab_size, d_model, **factory))
        self.positions = SinusoidalPositionalEncoding(d_model, config.max_length, device=device)
        self.dropout = nn.Dropout(config.dropout)
        layer_options = dict(dropout=config.dropout, activation=config.activation, norm=config.norm,
                             norm_first=config.norm_first, eps=config.eps, **factory)
        self.encoder_layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, config.n_head, config.ffn_dim, **layer_options)
            for _ in range(config.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, config.n_head, config.ffn_dim, **layer_options)
            for _ in range(config.n_decoder_layers))
        final_norm = (lambda: make_norm("Seq2SeqTransformer", config.norm, d_model, config.eps, True, factory)) \
            if config.norm_first else nn.Identity
        self.encoder_norm, self.decoder_norm = final_norm(), final_norm()
        self.head = nn.Linear(d_model, config.tgt_vocab_size, bias=False, **factory)
        self.reset_parameters()
        self._tie_weights()

    def _tied_embedding(self) -> nn.Embedding:
        return self.tgt_embedding

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices and zero biases (as torch.nn.Transformer), unit norms, and N(0, d_model^-1/2)
        embeddings, which the sqrt(d_model) scaling brings to unit variance next to the unit-amplitude sinusoids."""
        self._reset_norms_and_tables()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # In a fixed order (a set of the two modules would follow their addresses), each shared one once.
        for embedding in dict.fromkeys((self.src_embedding, self.tgt_embedding)):
            nn.init.normal_(embedding.weight, std=self.config.d_model ** -0.5)

    def _padding_mask(self, name: str, tokens: Tensor, mask: Tensor | None) -> Tensor | None:
        if mask is not None:
            if mask.shape != tokens.shape or mask.dtype != torch.bool:
                raise ValueError(f"lmrt.models.Seq2SeqTransformer: `{name}` must be a bool tensor of shape "
                                 f"{list(tokens.shape)}, got {mask.dtype} of shape {list(mask.shape)}")
            return mask
        return None if self.config.pad_id is None else tokens == self.config.pad_id

    def _embed(self, embedding: nn.Embedding, tokens: Tensor, offset: int = 0) -> Tensor:
        return self.dropout(self.positions(embedding(tokens) * math.sqrt(self.config.d_model), offset))

    def encode(self, src: Tensor, src_key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The encoder's output (batch, S, d_model) for source ids `src` (batch, S), and the padding mask used."""
        check_token_ids("Seq2SeqTransformer", "src", src, self.config.src_vocab_size)
        padding = self._padding_mask("src_key_padding_mask", src, src_key_padding_mask)
        x = self._embed(self.src_embedding, src)
        for layer in self.encoder_layers:
            x = layer(x, key_padding_mask=padding)
        return self.encoder_norm(x), padding

    def decode_memory(self, tgt: Tensor, memory: Tensor, memory_padding_mask: Tensor | None,
                      tgt_key_padding_mask: Tensor | None = None, state: Seq2SeqState | None = None) -> Tensor:
        """Logits (batch, T, tgt_vocab) for target ids `tgt` (batch, T) attending to `memory`; with `state`, `tgt`
        continues the cached target tokens."""
        check_token_ids("Seq2SeqTransformer", "tgt", tgt, self.config.tgt_vocab_size)
        offset = 0 if state is None else state.self_attention.length
        padding = None if state is not None else self._padding_mask("tgt_key_padding_mask", tgt, tgt_key_padding_mask)
        x = self._embed(self.tgt_embedding, tgt, offset)
        for index, layer in enumerate(self.decoder_layers):
            caches = (None, None) if state is None else (state.self_attention[index], state.cross_attention[index])
            x = layer(x, memory, tgt_key_padding_mask=padding, memory_key_padding_mask=memory_padding_mask,
                      cache=caches[0], cross_cache=caches[1])
        return self.head(self.decoder_norm(x))

    def forward(self, src: Tensor, tgt: Tensor, targets: Tensor | None = None, *,
                src_key_padding_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """Logits (batch, T, tgt_vocab) and the loss against `targets` (batch, T; -100 skips a position) or None.

        Padding masks are (batch, length) bools, True at padding; by default the positions holding `pad_id`."""
        if targets is not None:
            check_targets("Seq2SeqTransformer", targets, tgt, self.config.tgt_vocab_size)
        memory, memory_padding = self.encode(src, src_key_padding_mask)
        logits = self.decode_memory(tgt, memory, memory_padding, tgt_key_padding_mask)
        return logits, None if targets is None else language_model_loss(logits, targets)

    def init_decoding(self, batch_size: int, max_length: int, src: Tensor,
                      src_key_padding_mask: Tensor | None = None) -> Seq2SeqState:
        """Encode `src` and set up the decoder's caches for target sequences of up to `max_length` tokens."""
        if src.shape[0] != batch_size:
            raise ValueError(f"lmrt.models.Seq2SeqTransformer: `src` has {src.shape[0]} sequences, expected "
                             f"{batch_size}")
        if max_length > self.config.max_length:
            raise ValueError(f"lmrt.models.Seq2SeqTransformer: decoding {max_length} target tokens (the start and "
                             f"every new one but the last) exceeds max_length {self.config.max_length}")
        memory, padding = self.encode(src, src_key_padding_mask)
        return Seq2SeqState(memory, padding, self.config.n_decoder_layers, max_length)

    def decode(self, tokens: Tensor, state: Seq2SeqState) -> Tensor:
        return self.decode_memory(tokens, state.memory, state.memory_padding_mask, state=state)

    def generate(self, src: Tensor, max_new_tokens: int, **options) -> Tensor:
        """Translate `src` (batch, S): target sequences (batch, 1 + generated) that start with bos_id and stop at
        eos_id; options of lmrt.generation.generate (sampling, beams, ...)."""
        options.setdefault("eos_token_id", self.config.eos_id)
        if self.config.pad_id is not None:
            options.setdefault("pad_token_id", self.config.pad_id)
        prompt = src.new_full((src.shape[0], 1), self.config.bos_id)
        return super().generate(prompt, max_new_tokens, src=src, **options)

