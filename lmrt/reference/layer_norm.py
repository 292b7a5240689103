"""LayerNorm: forward with its saved statistics, a hand-written backward, and the F.layer_norm form."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmrt._layout import as_rows
from lmrt.reference._dtypes import compute_dtype, shape_tuple


def layer_norm_fwd(
    input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, mean, rstd); mean and rstd have one entry per row; the output contiguous, as the kernels write
    it."""
    x = as_rows(input, len(normalized_shape)).to(compute_dtype(input.dtype))
    mean = x.mean(-1)
    centered = x - mean[:, None]
    rstd = torch.rsqrt((centered * centered).mean(-1) + eps)
    y = centered * rstd[:, None]
    if weight is not None:
        y = y * weight.reshape(-1)
    if bias is not None:
        y = y + bias.reshape(-1)
    return y.to(input.dtype).reshape(input.shape).contiguous(), mean, rstd


def layer_norm_bwd(
    grad_output: torch.Tensor, input: torch.Tensor, normalized_shape: Sequence[int], mean: torch.Tensor,
    rstd: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias), as aten::native_layer_norm_backward; a gradient that
    `output_mask` does not ask for is an empty tensor."""
    return _norm_bwd(grad_output, input, normalized_shape, mean, rstd, weight, bias, output_mask)


def _norm_bwd(grad_output, input, normalized_shape, mean, rstd, weight, bias, output_mask):
    """LayerNorm's backward, or RMSNorm's when `mean` is None (no centering, no bias)."""
    dtype = compute_dtype(input.dtype)
    x = as_rows(input, len(normalized_shape)).to(dtype)
    dy = as_rows(grad_output, len(normalized_shape)).to(dtype)
    x_hat = (x if mean is None else x - mean[:, None]) * rstd[:, None]
    w_dy = dy if weight is None else dy * weight.reshape(-1).to(dtype)
    grad_x = w_dy - x_hat * (x_hat * w_dy).mean(-1, keepdim=True)
    if mean is not None:
        grad_x = grad_x - w_dy.mean(-1, keepdim=True)
    grad_x = (grad_x * rstd[:, None]).to(input.dtype).reshape(input.shape).contiguous()
    grad_w = (dy * x_hat).sum(0).to(weight.dtype).reshape(weight.shape) if output_mask[1] else input.new_empty(0)
    grad_b = dy.sum(0).to(bias.dtype).reshape(bias.shape) if output_mask[2] else input.new_empty(0)
    return (grad_x if output_mask[0] else input.new_empty(0)), grad_w, grad_b


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return layer_norm_fwd(input, shape_tuple(normalized_shape), weight, bias, eps)[0]
