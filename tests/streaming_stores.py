"""What the tests of the C++ CPU kernels' streaming stores (csrc/cpu/streaming_stores.h) share: a call large enough
that its forward and its backward write their outputs by streaming stores, against calls on its slices, small enough
for plain stores."""

from pathlib import Path

import pytest
import torch

import lmrt
from tests.tolerance import forward_backward


def last_level_cache_bytes() -> int:
    """The largest cache of CPU 0 as Linux's sysfs gives it, as streaming_stores.h reads it; 0 if unknown."""
    sizes = []
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip()
        sizes.append(int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1))
    return max(sizes, default=0)


def check_streamed_rows_match(fn, n_cols: int, dtype: torch.dtype) -> None:
    """fn(x) of a row-wise op on the cpp backend, x of shape (rows, n_cols): with enough rows that the forward
    (which reads x and writes y, 2 elements per element of x) and the backward (3: dy and x or y read, dx written)
    each move more bytes than half the last-level cache, whose kernels then write the rows of y and dx that start
    aligned by streaming stores, the output and x's gradient are the same bits as from calls on slices of a quarter
    of the cache's bytes, which store plainly."""
    cache = last_level_cache_bytes()
    if not 0 < cache <= 256 << 20:
        pytest.skip(f"a last-level cache of {cache} bytes (sysfs): unknown, or too large a call to outgrow it")
    rows = cache // (2 * 2 * n_cols * dtype.itemsize) + 64
    x = torch.randn(rows, n_cols, dtype=dtype)
    grad_output = torch.randn_like(x)
    with lmrt.backend("cpp"):
        whole = forward_backward(fn, [x], grad_output)
        part = max(1, cache // (4 * 3 * n_cols * dtype.itemsize))
        for begin in range(0, rows, part):
            rows_part = slice(begin, begin + part)
            alone = forward_backward(fn, [x[rows_part]], grad_output[rows_part])
            for name, streamed, stored in zip(["output", "grad_input"], whole, alone, strict=True):
                assert torch.equal(streamed[rows_part], stored), f"{name}, rows from {begin}"
