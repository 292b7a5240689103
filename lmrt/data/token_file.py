"""Pre-tokenized corpora on disk, read through a memory map so that a corpus larger than memory trains.

Format (`.bin`): a 16-byte header, the magic b"LMRTTOK1", then the token width in bytes and the vocabulary size as
little-endian uint32, followed by the token ids as little-endian unsigned integers of that width (2 bytes when the
vocabulary fits in 65536 ids, else 4).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from lmrt._settings import is_integer

MAGIC = b"LMRTTOK1"
HEADER = struct.Struct("<8sII")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_MAX_VOCAB = (1 << 32) - 1  # the largest vocabulary size the header's uint32 holds
_CHECK_CHUNK = 1 << 24  # tokens per chunk when scanning a file for ids outside the vocabulary


def write_token_file(path: str | Path, ids, vocab_size: int) -> None:
    """Write token `ids` (ints in [0, vocab_size): Python ints, a NumPy integer array or an integer tensor) to
    `path`, through a temporary file renamed into place."""
    if not is_integer(vocab_size) or not 1 <= vocab_size <= _MAX_VOCAB:
        raise ValueError(f"`vocab_size` must be an integer in [1, {_MAX_VOCAB}] (the header stores it as a uint32), "
                         f"got {vocab_size!r}")
    vocab_size = int(vocab_size)
    width = 2 if vocab_size <= 1 << 16 else 4
    array = _integer_ids(ids)
    if array.size:
        low, high = int(array.min()), int(array.max())  # Python ints: the true values, whatever the dtype
        if low < 0 or high >= vocab_size:
            raise ValueError(f"`ids`: token ids range from {low} to {high}, outside the vocabulary [0, {vocab_size})")
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(HEADER.pack(MAGIC, width, vocab_size))
        file.write(array.astype(_DTYPES[width]).tobytes())
    temporary.replace(path)


def _integer_ids(ids) -> np.ndarray:
    """`ids` as an integer array without converting its values: a float id is refused, not truncated, and ids too
    large for int64 (numpy.uint64, big Python ints) keep their value for the range check."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu()
    array = np.asarray(ids)
    if array.dtype == object and all(is_integer(i) for i in array.flat):
        return array  # what numpy makes of Python ints beyond int64: the range check reports their true value
    if array.size and not np.issubdtype(array.dtype, np.integer):  # an empty list comes out as float64
        raise ValueError(f"`ids` must be integer token ids (Python ints, a NumPy integer array or an integer tensor), "
                         f"got {array.dtype} ids (the first is {array.ravel()[:1].tolist()[0]!r})")
    return array


def is_token_file(path: str | Path) -> bool:
    """Whether `path` is meant as a file of token ids: a .bin name, any case (read_token_file then checks its
    header), or a file that starts with the magic, whatever its name (as UTF-8 text, a byte-level corpus's ids
    decode without an error)."""
    path = Path(path)
    if path.suffix.lower() == ".bin":
        return True
    try:
        with open(path, "rb") as file:
            return file.read(len(MAGIC)) == MAGIC
    except OSError:  # missing, a folder, unreadable: not a token file (reading it as text says what is wrong)
        return False


def tokenizer_path(path: str | Path) -> Path:
    """Where the tokenizer that wrote token file `path` is kept: beside it, `corpus.bin` -> `corpus.tokenizer.json`
    (`lmrt tokenize` writes it there, `lmrt train --data corpus.bin` reads it)."""
    return Path(path).with_suffix(".tokenizer.json")


def read_token_file(path: str | Path, vocab_size: int | None = None) -> np.memmap:
    """The token ids of `path` as a read-only memory-mapped 1-D array. With `vocab_size`, checks that the file was
    written for that vocabulary and that every id fits it (the tokenizer must cover the corpus)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} does not exist")
    with open(path, "rb") as file:
        header = file.read(HEADER.size)
    if len(header) < HEADER.size or header[:8] != MAGIC:
        raise ValueError(f"{path} is not an lmrt token file (no {MAGIC.decode()} header); write one with "
                         f"lmrt.data.write_token_file")
    _, width, file_vocab_size = HEADER.unpack(header)
    if width not in _DTYPES or (path.stat().st_size - HEADER.size) % width:
        raise ValueError(f"token file {path} is corrupt: token width {width}, {path.stat().st_size} bytes")
    if vocab_size is not None and file_vocab_size > vocab_size:
        raise ValueError(f"token file {path} was written for a vocabulary of {file_vocab_size} ids; the tokenizer "
                         f"has {vocab_size}")
    if path.stat().st_size == HEADER.size:
        raise ValueError(f"token file {path} holds no tokens")
    tokens = np.memmap(path, dtype=_DTYPES[width], mode="r", offset=HEADER.size)
    if vocab_size is not None:
        for start in range(0, len(tokens), _CHECK_CHUNK):
            largest = int(tokens[start: start + _CHECK_CHUNK].max())
            if largest >= vocab_size:
                raise ValueError(f"token file {path} holds id {largest}, outside the tokenizer's vocabulary "
                                 f"[0, {vocab_size})")
    return tokens
