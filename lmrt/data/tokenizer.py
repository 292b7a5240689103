"""Tokenizers: byte-level (the default, no dependency) and byte-level BPE trained on the user's corpus with the
Hugging Face `tokenizers` library (the optional extra `lmrt[data]`).

Both map any text to ids and back, with three special tokens after the regular ones: <pad>, <bos> and <eos>
(padding, start and end of a sequence, for the encoder-decoder and for generation). A tokenizer is saved as one
JSON file beside the checkpoints (`save`, `load_tokenizer`), so that evaluation and generation decode exactly as
training encoded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
# A byte-level BPE vocabulary holds at least the 256 bytes and the special tokens.
MIN_BPE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class Tokenizer:
    """What every lmrt tokenizer offers: encode, decode, vocab_size, the special ids, and save."""

    kind: str

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        return self.vocab_size - 3

    @property
    def bos_id(self) -> int:
        return self.vocab_size - 2

    @property
    def eos_id(self) -> int:
        return self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def _check_ids(self, ids: list[int]) -> list[int]:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{type(self).__name__}.decode: token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        return ids

    def to_dict(self) -> dict:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        """Write the tokenizer to one JSON file."""
        Path(path).write_text(json.dumps(self.to_json()), encoding="utf-8")

    def to_json(self) -> dict:
        """The tokenizer as plain JSON data (what `save` writes and `tokenizer_from_dict` reads)."""
        return {"kind": self.kind, **self.to_dict()}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0-255, then <pad> 256, <bos> 257, <eos> 258. Covers every text; decoding replaces
    a byte sequence cut in the middle of a character with U+FFFD."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        ids = self._check_ids(list(ids))
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2's scheme) from the Hugging Face `tokenizers` library: merges learned from a corpus on
    top of the 256 byte symbols, so that it covers every text. The special tokens take the last three ids."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self._tokenizer = hf_tokenizer
        # "<eos>" written in a text is text: only the ids say where a sequence ends (ByteTokenizer agrees).
        hf_tokenizer.encode_special_tokens = True
        special = [hf_tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
        size = hf_tokenizer.get_vocab_size()
        if special != list(range(size - 3, size)):
            raise ValueError(f"BPETokenizer: the special tokens {SPECIAL_TOKENS} must take the last three ids of the "
                             f"vocabulary ({size - 3} to {size - 1}), got {special}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn merges from `texts` until the vocabulary (256 bytes, merges, 3 special tokens) has `vocab_size`
        entries, or fewer if the corpus runs out of pairs to merge."""
        tokenizers = _import_tokenizers()
        if vocab_size < MIN_BPE_VOCAB_SIZE:
            raise ValueError(f"BPETokenizer.train: `vocab_size` must be at least {MIN_BPE_VOCAB_SIZE} (the "
                             f"256 bytes and {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer)
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = self._check_ids(list(ids))
        return self._tokenizer.decode([i for i in ids if i < self.pad_id])

    def to_dict(self) -> dict:
        return {"tokenizer": json.loads(self._tokenizer.to_str())}

    @classmethod
    def from_dict(cls, data: dict) -> BPETokenizer:
        """The tokenizer `to_dict` described; ValueError if data["tokenizer"] is not a tokenizers library's one."""
        tokenizers = _import_tokenizers()
        text = json.dumps(data.get("tokenizer"))
        try:
            hf_tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as error:  # what the library raises for JSON that does not describe a tokenizer
            raise ValueError(f"not a tokenizer saved by lmrt: its 'tokenizer' entry must be a tokenizer of the "
                             f"`tokenizers` library ({error})") from None
        return cls(hf_tokenizer)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved at `path` by Tokenizer.save."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"tokenizer file {path} is not a tokenizer saved by lmrt ({error})") from None
    try:
        return tokenizer_from_dict(data)
    except ValueError as error:
        raise ValueError(f"tokenizer file {path}: {error}") from None


def tokenizer_from_dict(data: dict) -> Tokenizer:
    """The tokenizer described by `data`, a saved tokenizer's JSON ({"kind": ..., **to_dict()}), as a checkpoint
    holds it."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == ByteTokenizer.kind:
        return ByteTokenizer()
    if kind == BPETokenizer.kind:
        return BPETokenizer.from_dict(data)
    raise ValueError(f"not a tokenizer saved by lmrt: unknown tokenizer kind {kind!r}; expected 'byte' or 'bpe'")


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("the BPE tokenizer needs the Hugging Face `tokenizers` package: pip install "
                          "'lmrt[data]' (or pip install tokenizers)") from None
    return tokenizers
