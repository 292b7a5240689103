"""Softmax and log-softmax: forward, a backward from the output, and the F.softmax / F.log_softmax forms."""

from __future__ import annotations

import torch

from lmrt.reference._dtypes import compute_dtype


def softmax_fwd(input: torch.Tensor, dim: int, out_dtype: torch.dtype, log: bool) -> torch.Tensor:
    """softmax (or log_softmax when `log`) over `dim`, written in `out_dtype`."""
    if input.numel() == 0:  # amax cannot reduce an empty dim; a copy keeps the result in input's autograd graph
        return input.to(out_dtype, copy=True)
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


def softmax(input, dim, dtype=None):
    return softmax_fwd(input, dim, dtype or input.dtype, log=False)


def log_softmax(input, dim, dtype=None):
    return softmax_fwd(input, dim, dtype or input.dtype, log=True)
