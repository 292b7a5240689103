"""The LSTM language model baseline (Zaremba et al. 2014, with tied weights as Press & Wolf 2017).

Token embedding, a multi-layer torch.nn.LSTM (cuDNN on a GPU), dropout, and an output head tied to the
embedding: the same forward(idx, targets) -> (logits, loss) and generation protocol as GPT, so the trainer and
the benchmarks treat both alike. When the hidden width differs from the embedding's and the weights are tied, a
linear layer maps the LSTM's output to the embedding width.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmrt._settings import require_at_least, require_dropout, require_types
from lmrt.models._common import LanguageModel, check_targets, check_token_ids, language_model_loss


@dataclass
class LSTMConfig:
    """The shape of an LSTM language model. `context_length` bounds the training windows and a generated sequence,
    as for GPT; the recurrence itself has no limit."""

    vocab_size: int = 256
    context_length: int = 256
    n_layer: int = 2
    n_embd: int = 128
    hidden_size: int = 256
    dropout: float = 0.0
    tie_weights: bool = True

    def __post_init__(self):
        require_types(self)
        require_at_least(self, 1, ("vocab_size", "context_length", "n_layer", "n_embd", "hidden_size"))
        require_dropout(self)


class LSTMState:
    """An LSTM's hidden and cell states between decoding steps, (layers, batch, width) each; None before the first."""

    def __init__(self):
        self.hidden: tuple[Tensor, Tensor] | None = None

    def reorder(self, batch_indices: Tensor) -> None:
        if self.hidden is not None:
            self.hidden = tuple(t.index_select(1, batch_indices) for t in self.hidden)


class LSTMLanguageModel(LanguageModel):
    """An LSTM language model; see LSTMConfig."""

    def __init__(self, config: LSTMConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = dict(device=device, dtype=dtype)
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd, **factory)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(config.n_embd, config.hidden_size, config.n_layer, batch_first=True,
                            dropout=config.dropout if config.n_layer > 1 else 0.0, **factory)
        project = config.tie_weights and config.hidden_size != config.n_embd
        self.projection = nn.Linear(config.hidden_size, config.n_embd, bias=False, **factory) if project else None
        output_width = config.n_embd if config.tie_weights else config.hidden_size
        self.head = nn.Linear(output_width, config.vocab_size, **factory)
        self.reset_parameters()
        self._tie_weights()

    def _tied_embedding(self) -> nn.Embedding | None:
        return self.token_embedding if self.config.tie_weights else None

    def reset_parameters(self) -> None:
        """Uniform(-0.1, 0.1) embeddings (Zaremba et al.), the LSTM's own uniform(+-1/sqrt(hidden)) init with the
        forget gates' biases at 1 (Jozefowicz et al. 2015: remember by default), a zero output bias, and the
        projection to the tied embeddings' width, if any, at nn.Linear's own init."""
        nn.init.uniform_(self.token_embedding.weight, -0.1, 0.1)
        self.lstm.reset_parameters()
        hidden = self.config.hidden_size
        for name, param in self.lstm.named_parameters():
            if name.startswith("bias_ih"):  # gate order i, f, g, o: the forget gate's slice
                with torch.no_grad():
                    param[hidden: 2 * hidden].fill_(1.0)
                    self.lstm.get_parameter(name.replace("ih", "hh"))[hidden: 2 * hidden].zero_()
        nn.init.zeros_(self.head.bias)
        if not self.config.tie_weights:
            nn.init.uniform_(self.head.weight, -0.1, 0.1)
        if self.projection is not None:
            self.projection.reset_parameters()

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, state: LSTMState | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """Logits (batch, length, vocab) for token ids `idx` (batch, length), and the loss against `targets` or None.
        With `state` (from init_decoding), `idx` continues from it and the state moves past `idx`."""
        check_token_ids("LSTMLanguageModel", "idx", idx, self.config.vocab_size)
        if targets is not None:
            check_targets("LSTMLanguageModel", targets, idx, self.config.vocab_size)
        x = self.dropout(self.token_embedding(idx))
        output, hidden = self._recurrence(x, None if state is None else state.hidden)
        if state is not None:
            state.hidden = hidden
        if self.projection is not None:
            output = self.projection(output)
        logits = self.head(self.dropout(output))
        return logits, None if targets is None else language_model_loss(logits, targets)

    def _recurrence(self, x: Tensor, hidden: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """self.lstm over `x`. Under CPU autocast, where oneDNN has no LSTM kernel for the autocast dtype on this CPU,
        the recurrence runs in float32 (the rest of the model stays in the autocast dtype)."""
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            if not _cpu_lstm_runs_in(dtype):
                with torch.autocast("cpu", enabled=False):
                    return self.lstm(x.float(), None if hidden is None else tuple(t.float() for t in hidden))
        return self.lstm(x, hidden)

    def init_decoding(self, batch_size: int, max_length: int) -> LSTMState:
        if max_length > self.config.context_length:
            raise ValueError(f"lmrt.models.LSTMLanguageModel: decoding {max_length} tokens (the prompt and every new "
                             f"one but the last) exceeds the context length {self.config.context_length}")
        return LSTMState()

    def decode(self, tokens: Tensor, state: LSTMState) -> Tensor:
        return self(tokens, state=state)[0]


@functools.cache
def _cpu_lstm_runs_in(dtype: torch.dtype) -> bool:
    """Whether torch.nn.LSTM runs under CPU autocast to `dtype` on this CPU. oneDNN serves it, and its bfloat16 and
    float16 LSTM kernels need AVX-512 (float16 more): elsewhere the call fails ("could not create a primitive
    descriptor for the LSTM forward propagation primitive"), and the path without oneDNN is some 100x slower. The
    probe's initialization draws from a forked generator: a run resumed with its saved random state must draw the
    same dropout masks as the uninterrupted one."""
    with torch.random.fork_rng(devices=[]):
        lstm = nn.LSTM(1, 1)
    try:
        with torch.autocast("cpu", dtype=dtype):
            lstm(torch.zeros(1, 1, 1))
    except RuntimeError:
        return False
    return True
