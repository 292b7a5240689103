"""RMSNorm: forward with its saved statistics, a hand-written backward, and the F.rms_norm form."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmrt._layout import as_rows
from lmrt.reference._dtypes import compute_dtype, shape_tuple
from lmrt.reference.layer_norm import _norm_bwd


def rms_norm_fwd(
    input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, rstd); rstd has one entry per row; the output contiguous, as the kernels write it."""
    x = as_rows(input, len(normalized_shape)).to(compute_dtype(input.dtype))
    rstd = torch.rsqrt((x * x).mean(-1) + eps)
    y = x * rstd[:, None]
    if weight is not None:
        y = y * weight.reshape(-1)
    return y.to(input.dtype).reshape(input.shape).contiguous(), rstd


def rms_norm_bwd(
    grad_output: torch.Tensor, input: torch.Tensor, normalized_shape: Sequence[int], rstd: torch.Tensor,
    weight: torch.Tensor | None, output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight); a gradient that `output_mask` does not ask for is an empty tensor."""
    grad_input, grad_weight, _ = _norm_bwd(grad_output, input, normalized_shape, None, rstd, weight, None,
                                           (*output_mask, False))
    return grad_input, grad_weight


def rms_norm(input, normalized_shape, weight=None, eps=None):
    eps = torch.finfo(compute_dtype(input.dtype)).eps if eps is None else eps
    return rms_norm_fwd(input, shape_tuple(normalized_shape), weight, eps)[0]
