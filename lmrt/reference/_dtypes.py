"""The dtype the references compute in, and the normalized_shape argument as a tuple."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any of `dtypes` is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def shape_tuple(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
