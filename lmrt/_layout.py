"""How the ops see a tensor: as rows to reduce over, without copying when the strides allow it; and how a custom op
hands back a tensor it made in another shape."""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def as_op_output(x: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
    """`x`, made by a custom op, as a tensor of `shape` (by default its own; `x` must be contiguous to take another)
    that shares its memory but is no view: autograd refuses in-place ops (ReLU(inplace=True) after a norm) on a custom
    op's output that is a view of a tensor made inside it. `detach` drops the view relation, not the memory: no
    copy."""
    shape = x.shape if shape is None else shape
    return x if x._base is None and x.shape == shape else x.view(shape).detach()
