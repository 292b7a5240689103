"""What every lmrt language model shares: the loss, the parameter count, and `generate`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmrt import generation
from lmrt.nn.positional import FixedTables, LearnedPositionalEmbedding

# Target positions holding this value take no part in the loss (padding, or a prompt not to be learned).
IGNORE_INDEX = -100


def language_model_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of `logits` (..., vocab) against `targets` (...), in float32, skipping IGNORE_INDEX;
    `targets` as check_targets passes them."""
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"`targets` must have shape {list(logits.shape[:-1])} (one per position), got "
                         f"{list(targets.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long(),
                           ignore_index=IGNORE_INDEX)


def check_targets(model: str, targets: Tensor, inputs: Tensor, vocab_size: int) -> None:
    """A loss's targets: token ids as the model's `inputs` take them (int64 or int32), on their device, in [0,
    vocab_size) or IGNORE_INDEX (which skips a position). Checked before the forward, as the inputs are: out of
    range, cross_entropy raises an IndexError on the CPU and, on a GPU, a device-side assert that leaves the CUDA
    context unusable; and the range check's device sync there costs nothing, where after the forward it would hold
    back the backward's launches until the forward is done."""
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"lmrt.models.{model}: `targets` must be an int64 tensor of token ids (int32 is taken too), "
                         f"got {targets.dtype}")
    if targets.device != inputs.device:
        raise ValueError(f"lmrt.models.{model}: `targets` must be on the inputs' device {inputs.device}, got "
                         f"{targets.device}")
    id_range = _id_range(targets, ignored=IGNORE_INDEX)
    if id_range is not None:
        low, high = id_range
        if low < 0 or high >= vocab_size:
            outside = [str(v) for v in dict.fromkeys((low, high)) if not 0 <= v < vocab_size]
            raise ValueError(f"lmrt.models.{model}: `targets` holds token id{'s' * (len(outside) > 1)} "
                             f"{' and '.join(outside)}, outside the vocabulary [0, {vocab_size}) (and not "
                             f"IGNORE_INDEX = {IGNORE_INDEX}, which skips a position)")


def check_token_ids(model: str, name: str, tokens: Tensor, vocab_size: int) -> None:
    """Token ids: an integer tensor of shape (batch, length) with values in [0, vocab_size)."""
    if tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 2:
        raise ValueError(f"lmrt.models.{model}: `{name}` must be an int64 tensor of shape (batch, length), got "
                         f"{tokens.dtype} of shape {list(tokens.shape)}")
    id_range = _id_range(tokens)
    if id_range is not None:
        low, high = id_range
        if low < 0 or high >= vocab_size:
            raise ValueError(f"lmrt.models.{model}: `{name}` holds token ids from {low} to {high}, outside the "
                             f"vocabulary [0, {vocab_size})")


def _id_range(tokens: Tensor, ignored: int | None = None) -> tuple[int, int] | None:
    """The smallest and largest of `tokens`, `ignored` counting as 0, with one device sync; None when there are none,
    or under torch.compile (whose graph the sync would break)."""
    if not tokens.numel() or torch.compiler.is_compiling():
        return None
    if ignored is not None:
        tokens = tokens.masked_fill(tokens == ignored, 0)
    return tuple(torch.stack(torch.aminmax(tokens)).tolist())


class LanguageModel(nn.Module):
    """Base of lmrt's models: `num_parameters` and `generate` (see lmrt.generation.generate).

    A subclass implements the decoding protocol that generation uses: `init_decoding(batch_size, max_length,
    **inputs)` returns a state (a KV cache, an LSTM's hidden state, ...) with a `reorder(batch_indices)` method,
    and `decode(tokens, state)` runs new tokens (batch, n) through the model, updating the state, and returns
    their logits (batch, n, vocab).
    """

    def _tied_embedding(self) -> nn.Embedding | None:
        """The token embedding whose weight the output head `head` shares, or None."""
        return None

    def _tie_weights(self) -> None:
        embedding = self._tied_embedding()
        if embedding is not None:
            self.head.weight = embedding.weight

    def _apply(self, fn, recurse=True):
        # Module.to_empty (the meta-device recipe) gives each module a parameter of its own, which would untie the head
        # from the embedding: tie them again after every conversion (a no-op after the others, which keep the tie).
        super()._apply(fn, recurse)
        self._tie_weights()
        return self

    def _reset_norms_and_tables(self) -> None:
        """Unit norms and the positional tables computed again: what each model's reset_parameters does besides its
        random draws (after Module.to_empty, the meta-device recipe, both hold uninitialized memory)."""
        for module in self.modules():
            if isinstance(module, nn.LayerNorm | nn.RMSNorm | FixedTables):
                module.reset_parameters()

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters, shared ones counted once. `non_embedding` leaves out the position tables and the
        token embeddings, except a token embedding tied to the output head, which does the head's work."""
        excluded = set()
        if non_embedding:
            excluded = {id(p) for m in self.modules() if isinstance(m, nn.Embedding | LearnedPositionalEmbedding)
                        for p in m.parameters()}
            excluded -= {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        return sum(p.numel() for p in self.parameters() if id(p) not in excluded)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, **options) -> Tensor:
        """Continue `prompt` (batch, length) by up to `max_new_tokens` tokens; options of lmrt.generation.generate."""
        return generation.generate(self, prompt, max_new_tokens, **options)
