"""Datasets for training: context windows for language modelling and source/target pairs for the encoder-decoder.

Both are map-style torch Datasets, so that torch's samplers (RandomSampler, DistributedSampler for several
processes) drive them and a run resumes at an exact position. Token streams are 1-D int tensors or memory-mapped
arrays (lmrt.data.read_token_file): a window is read from the map when it is asked for.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lmrt._settings import is_integer
from lmrt.data.corpus import read_text
from lmrt.models import IGNORE_INDEX


def split_tokens(tokens, validation_fraction: float):
    """(train, validation): the stream's head and its last `validation_fraction` (views, no copy). Deterministic:
    the same corpus always splits the same way."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"`validation_fraction` must be in (0, 1), got {validation_fraction}")
    boundary = len(tokens) - max(1, round(len(tokens) * validation_fraction))
    return tokens[:boundary], tokens[boundary:]


class LanguageModelWindows(Dataset):
    """Windows of `context_length` + 1 tokens, as (idx, targets) = (window[:-1], window[1:]).

    Item i starts at i * context_length + offset: the windows tile the stream without overlap, and `set_epoch`
    draws a new offset in [0, context_length) from (seed, epoch), so that every epoch sees other window
    boundaries while a given epoch is always the same (resumable).
    """

    def __init__(self, tokens, context_length: int, seed: int = 0):
        if context_length < 1:
            raise ValueError(f"`context_length` must be >= 1, got {context_length}")
        if len(tokens) < context_length + 1:
            raise ValueError(f"the token stream has {len(tokens)} tokens; a window of context_length="
                             f"{context_length} needs at least {context_length + 1}")
        if not is_integer(seed):
            raise ValueError(f"`seed` must be an integer, got {seed!r}")
        self.tokens, self.context_length, self.seed = tokens, context_length, int(seed)
        self.offset = 0

    def set_epoch(self, epoch: int) -> None:
        slack = len(self.tokens) - 1 - len(self) * self.context_length  # tokens the windows leave over
        # manual_seed takes [-2**63, 2**64) and seeds with the value modulo 2**64: reducing first keeps every stream
        # that fitted (resumed runs draw the same offsets) and lets any integer seed through.
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + operator.index(epoch)) % 2**64)
        self.offset = int(torch.randint(0, min(self.context_length - 1, slack) + 1, (1,), generator=generator))

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context_length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        start = index * self.context_length + self.offset
        window = torch.as_tensor(np.asarray(self.tokens[start: start + self.context_length + 1]).astype(np.int64))
        return window[:-1], window[1:]


class Seq2SeqPairs(Dataset):
    """Source/target pairs of token ids for the encoder-decoder; `collate` pads a batch of them."""

    def __init__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, bos_id: int, eos_id: int):
        if not pairs:
            raise ValueError("Seq2SeqPairs: no pairs")
        self.pairs, self.pad_id, self.bos_id, self.eos_id = list(pairs), pad_id, bos_id, eos_id

    @classmethod
    def from_tsv(cls, path, tokenizer, max_length: int) -> Seq2SeqPairs:
        """One pair per line of a UTF-8 file, `source<TAB>target`; sides longer than `max_length` tokens (the
        target counts its end token) are cut."""
        if not is_integer(max_length) or max_length < 1:
            raise ValueError(f"`max_length` must be an integer >= 1 (tokens per side), got {max_length!r}")
        pairs = []
        # Lines end at "\n" only (read_text has turned \r\n and \r into it): str.splitlines would also break a
        # field at a form feed, \x1c-\x1e, \x85 or \u2028 and refuse the pieces.
        for number, line in enumerate(read_text(path).split("\n"), start=1):
            if not line.strip():
                continue
            if line.count("\t") != 1:
                raise ValueError(f"{path}, line {number}: expected `source<TAB>target`, got {line[:60]!r}")
            source, target = line.split("\t")
            pairs.append((tokenizer.encode(source)[:max_length], tokenizer.encode(target)[: max_length - 1]))
        return cls(pairs, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)

    @classmethod
    def continuations(cls, tokens, source_length: int, target_length: int, tokenizer) -> Seq2SeqPairs:
        """Pairs from a plain token stream: each source is a chunk of `source_length` tokens and its target the
        `target_length` tokens that follow (the encoder-decoder learns to continue text)."""
        stride = source_length + target_length
        if len(tokens) < stride:
            raise ValueError(f"the token stream has {len(tokens)} tokens, fewer than one pair of {source_length} + "
                             f"{target_length}")
        pairs = []
        for start in range(0, len(tokens) - stride + 1, stride):
            chunk = np.asarray(tokens[start: start + stride]).tolist()
            pairs.append((chunk[:source_length], chunk[source_length:]))
        return cls(pairs, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.pairs[index]

    def collate(self, batch: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[Tensor, Tensor, Tensor]:
        """(src, tgt, targets) padded to the batch's longest: tgt = <bos> + target, targets = target + <eos>, with
        IGNORE_INDEX at padding."""
        src_width = max(len(source) for source, _ in batch)
        tgt_width = max(len(target) for _, target in batch) + 1
        src = torch.full((len(batch), src_width), self.pad_id)
        tgt = torch.full((len(batch), tgt_width), self.pad_id)
        targets = torch.full((len(batch), tgt_width), IGNORE_INDEX)
        for row, (source, target) in enumerate(batch):
            src[row, : len(source)] = torch.tensor(source, dtype=torch.long)
            tgt[row, : len(target) + 1] = torch.tensor([self.bos_id, *target], dtype=torch.long)
            targets[row, : len(target) + 1] = torch.tensor([*target, self.eos_id], dtype=torch.long)
        return src, tgt, targets
