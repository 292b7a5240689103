"""lmrt.ops.layer_norm: torch.nn.functional.layer_norm on lmrt's backends, forward and backward."""

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.compiler import is_compiling

from lmrt import backends, reference
from lmrt._layout import as_op_output, as_rows
from lmrt.ops._autocast import autocast_inputs
from lmrt.ops._checks import check_floating, check_normalized_shape, check_parameter, refuse_forward_ad
from lmrt.ops._dispatch import eager_calls, extension_ops, flat_parameter, pick_backend, unit_column_stride


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization over the last `len(normalized_shape)` dims; same call as F.layer_norm."""
    if not is_compiling():
        output = eager_calls.layer_norm(backends.context_choice, input, normalized_shape, weight, bias, eps)
        if output is not None:
            return output
    input, weight, bias = autocast_inputs("layer_norm", input, weight, bias)
    check_floating("layer_norm", "input", input)
    normalized_shape = check_normalized_shape("layer_norm", input, normalized_shape)
    check_parameter("layer_norm", "weight", weight, input, normalized_shape)
    check_parameter("layer_norm", "bias", bias, input, normalized_shape)
    refuse_forward_ad("layer_norm", input, weight, bias)
    return torch.ops.lmrt.layer_norm_fwd(input, normalized_shape, weight, bias, eps)[0]


@torch.library.custom_op("lmrt::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(output, mean, rstd), mean and rstd with one float32 entry per row (float64 for float64 input)."""
    dtypes = [t.dtype for t in (input, weight, bias) if t is not None]
    backend = pick_backend("layer_norm", input.device, dtypes)
    if backend == "torch":
        return tuple(as_op_output(t) for t in reference.layer_norm_fwd(input, normalized_shape, weight, bias, eps))
    rows = unit_column_stride(as_rows(input, len(normalized_shape)))
    if backend == "triton":
        from lmrt.kernels.layer_norm import norm_fwd

        y, mean, rstd = norm_fwd(rows, flat_parameter(weight), flat_parameter(bias), eps, is_rms_norm=False)
    else:
        y, mean, rstd = extension_ops().layer_norm_fwd(rows, flat_parameter(weight), flat_parameter(bias), eps)
    return as_op_output(y, input.shape), mean, rstd


@layer_norm_fwd.register_fake
def _(input, normalized_shape, weight, bias, eps):
    rows = math.prod(input.shape[: input.dim() - len(normalized_shape)])
    stats_dtype = reference.compute_dtype(input.dtype)
    # Contiguous, as every backend returns the output whatever the input's strides.
    output = input.new_empty(input.shape)
    return output, input.new_empty(rows, dtype=stats_dtype), input.new_empty(rows, dtype=stats_dtype)


@torch.library.custom_op("lmrt::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    grad_output: Tensor, input: Tensor, normalized_shape: Sequence[int], mean: Tensor, rstd: Tensor,
    weight: Tensor | None, bias: Tensor | None, output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) as aten::native_layer_norm_backward; unasked-for ones are empty."""
    dtypes = [t.dtype for t in (grad_output, input, weight, bias) if t is not None]
    backend = pick_backend("layer_norm", input.device, dtypes)
    if backend == "torch":
        grads = reference.layer_norm_bwd(grad_output, input, normalized_shape, mean, rstd, weight, bias, output_mask)
        return tuple(as_op_output(t) for t in grads)
    ndim = len(normalized_shape)
    dy_rows, x_rows = unit_column_stride(as_rows(grad_output, ndim)), unit_column_stride(as_rows(input, ndim))
    if backend == "triton":
        from lmrt.kernels.layer_norm import norm_bwd

        dx, dw, db = norm_bwd(dy_rows, x_rows, flat_parameter(weight), mean, rstd, compute_dw=output_mask[1],
                              compute_db=output_mask[2])
    else:
        dx, dw, db = extension_ops().layer_norm_bwd(dy_rows, x_rows, flat_parameter(weight), mean, rstd,
                                                    list(output_mask))
    return (
        as_op_output(dx, input.shape) if output_mask[0] else input.new_empty(0),
        as_op_output(dw.to(weight.dtype), weight.shape) if output_mask[1] else input.new_empty(0),
        as_op_output(db.to(bias.dtype), bias.shape) if output_mask[2] else input.new_empty(0),
    )


@layer_norm_bwd.register_fake
def _(grad_output, input, normalized_shape, mean, rstd, weight, bias, output_mask):
    return (
        input.new_empty(input.shape) if output_mask[0] else input.new_empty(0),
        weight.new_empty(weight.shape) if output_mask[1] else input.new_empty(0),
        bias.new_empty(bias.shape) if output_mask[2] else input.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    input, normalized_shape, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, weight, bias, mean, rstd)
    ctx.normalized_shape = normalized_shape


def _backward(ctx, grad_output, _grad_mean, _grad_rstd):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    needs_input, _, needs_weight, needs_bias, _ = ctx.needs_input_grad
    grad_input, grad_weight, grad_bias = torch.ops.lmrt.layer_norm_bwd(
        grad_output, input, ctx.normalized_shape, mean, rstd, weight, bias, [needs_input, needs_weight, needs_bias]
    )
    return (
        grad_input if needs_input else None, None,
        grad_weight if needs_weight else None, grad_bias if needs_bias else None, None,
    )


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)

