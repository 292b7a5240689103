"""How the ops see a tensor: as rows to reduce over, without copying when the strides allow it."""

from __future__ import annotations

import math

import torch


def as_rows(x: torch.Tensor, row_ndim: int) -> torch.Tensor:
    """View `x` as (rows, columns), the columns being its last `row_ndim` dims; copies only when no view exists.

    The result may keep a row stride other than the column count (a sliced input); kernels take it as an argument.
    """
    rows = math.prod(x.shape[: x.dim() - row_ndim])
    return x.reshape(rows, math.prod(x.shape[x.dim() - row_ndim :]))


def as_outer_dim_inner(x: torch.Tensor, dim: int) -> torch.Tensor:
    """View `x` as (outer, size of `dim`, inner) so that a reduction over `dim` needs no transpose.

    Any strides that merge into three dims are kept (a transposed or sliced 2-D input is served in place);
    otherwise `x` is copied to a contiguous tensor first.
    """
    shape = (math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1 :]))
    try:
        return x.view(shape)
    except RuntimeError:
        return x.contiguous().view(shape)
