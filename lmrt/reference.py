"""Plain-PyTorch references of every lmrt op: the ground truth of the tests and the `torch` backend.

Each op has a forward that also returns what its backward saves (mean and rstd), and a backward written out
by hand, so the `torch` backend runs the same contract as the kernels. The functional forms at the bottom
(`layer_norm`, `softmax`, ...) have the torch.nn.functional signatures; run in float64 with autograd, they are
the "exact" answer the tests measure every backend against.

Statistics are computed in float32, or in float64 for float64 input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmrt._layout import as_rows


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any of `dtypes` is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def layer_norm_fwd(
    input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, mean, rstd); mean and rstd have one entry per row."""
    x = as_rows(input, len(normalized_shape)).to(compute_dtype(input.dtype))
    mean = x.mean(-1)
    centered = x - mean[:, None]
    rstd = torch.rsqrt((centered * centered).mean(-1) + eps)
    y = centered * rstd[:, None]
    if weight is not None:
        y = y * weight.reshape(-1)
    if bias is not None:
        y = y + bias.reshape(-1)
    return y.to(input.dtype).reshape(input.shape), mean, rstd


def layer_norm_bwd(
    grad_output: torch.Tensor, input: torch.Tensor, normalized_shape: Sequence[int], mean: torch.Tensor,
    rstd: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias), as aten::native_layer_norm_backward; a gradient that
    `output_mask` does not ask for is an empty tensor."""
    return _norm_bwd(grad_output, input, normalized_shape, mean, rstd, weight, bias, output_mask)


def rms_norm_fwd(
    input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, rstd); rstd has one entry per row."""
    x = as_rows(input, len(normalized_shape)).to(compute_dtype(input.dtype))
    rstd = torch.rsqrt((x * x).mean(-1) + eps)
    y = x * rstd[:, None]
    if weight is not None:
        y = y * weight.reshape(-1)
    return y.to(input.dtype).reshape(input.shape), rstd


def rms_norm_bwd(
    grad_output: torch.Tensor, input: torch.Tensor, normalized_shape: Sequence[int], rstd: torch.Tensor,
    weight: torch.Tensor | None, output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight); a gradient that `output_mask` does not ask for is an empty tensor."""
    grad_input, grad_weight, _ = _norm_bwd(grad_output, input, normalized_shape, None, rstd, weight, None,
                                           (*output_mask, False))
    return grad_input, grad_weight


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
    grad_x = (grad_x * rstd[:, None]).to(input.dtype).reshape(input.shape)
    grad_w = (dy * x_hat).sum(0).to(weight.dtype).reshape(weight.shape) if output_mask[1] else input.new_empty(0)
    grad_b = dy.sum(0).to(bias.dtype).reshape(bias.shape) if output_mask[2] else input.new_empty(0)
    return (grad_x if output_mask[0] else input.new_empty(0)), grad_w, grad_b


def softmax_fwd(input: torch.Tensor, dim: int, out_dtype: torch.dtype, log: bool) -> torch.Tensor:
    """softmax (or log_softmax when `log`) over `dim`, written in `out_dtype`."""
    x = input.to(compute_dtype(input.dtype, out_dtype))
    shifted = x - x.amax(dim, keepdim=True)
    if log:
        y = shifted - shifted.exp().sum(dim, keepdim=True).log()
    else:
        exp = shifted.exp()
        y = exp / exp.sum(dim, keepdim=True)
    return y.to(out_dtype)


def softmax_bwd(
    grad_output: torch.Tensor, output: torch.Tensor, dim: int, log: bool, input_dtype: torch.dtype,
) -> torch.Tensor:
    """Gradient of softmax (or log_softmax) with respect to its input, from the forward's output."""
    dtype = compute_dtype(output.dtype, input_dtype)
    dy, y = grad_output.to(dtype), output.to(dtype)
    if log:
        grad_input = dy - y.exp() * dy.sum(dim, keepdim=True)
    else:
        grad_input = y * (dy - (dy * y).sum(dim, keepdim=True))
    return grad_input.to(input_dtype)


# The torch.nn.functional signatures, differentiable through autograd.

def _shape_tuple(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return layer_norm_fwd(input, _shape_tuple(normalized_shape), weight, bias, eps)[0]


def rms_norm(input, normalized_shape, weight=None, eps=None):
    eps = torch.finfo(compute_dtype(input.dtype)).eps if eps is None else eps
    return rms_norm_fwd(input, _shape_tuple(normalized_shape), weight, eps)[0]


def softmax(input, dim, dtype=None):
    return softmax_fwd(input, dim, dtype or input.dtype, log=False)


def log_softmax(input, dim, dtype=None):
    return softmax_fwd(input, dim, dtype or input.dtype, log=True)
