"""lmrt.ops.rms_norm: torch.nn.functional.rms_norm on lmrt's backends, forward and backward."""

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


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """Root-mean-square normalization over the last `len(normalized_shape)` dims; same call as F.rms_norm.

    `eps=None` means the machine epsilon of the float32 (float64 for float64 input) computation, as PyTorch's
    own rms_norm does.
    """
    if not is_compiling():
        output = eager_calls.rms_norm(backends.context_choice, input, normalized_shape, weight, eps)
        if output is not None:
            return output
    input, weight = autocast_inputs("rms_norm", input, weight)
    check_floating("rms_norm", "input", input)
    normalized_shape = check_normalized_shape("rms_norm", input, normalized_shape)
    check_parameter("rms_norm", "weight", weight, input, normalized_shape)
    refuse_forward_ad("rms_norm", input, weight)
    eps = torch.finfo(reference.compute_dtype(input.dtype)).eps if eps is None else eps
    return torch.ops.lmrt.rms_norm_fwd(input, normalized_shape, weight, eps)[0]


@torch.library.custom_op("lmrt::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """(output, rstd), rstd with one float32 entry per row (float64 for float64 input)."""
    dtypes = [t.dtype for t in (input, weight) if t is not None]
    backend = pick_backend("rms_norm", input.device, dtypes)
    if backend == "torch":
        return tuple(as_op_output(t) for t in reference.rms_norm_fwd(input, normalized_shape, weight, eps))
    rows = unit_column_stride(as_rows(input, len(normalized_shape)))
    if backend == "triton":
        from lmrt.kernels.layer_norm import norm_fwd

        y, _, rstd = norm_fwd(rows, flat_parameter(weight), None, eps, is_rms_norm=True)
    else:
        y, rstd = extension_ops().rms_norm_fwd(rows, flat_parameter(weight), eps)
    return as_op_output(y, input.shape), rstd


@rms_norm_fwd.register_fake
def _(input, normalized_shape, weight, eps):
    rows = math.prod(input.shape[: input.dim() - len(normalized_shape)])
    # Contiguous, as every backend returns the output whatever the input's strides.
    return input.new_empty(input.shape), input.new_empty(rows, dtype=reference.compute_dtype(input.dtype))


@torch.library.custom_op("lmrt::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    grad_output: Tensor, input: Tensor, normalized_shape: Sequence[int], rstd: Tensor, weight: Tensor | None,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor]:
    """(grad_input, grad_weight); a gradient that `output_mask` does not ask for is empty."""
    dtypes = [t.dtype for t in (grad_output, input, weight) if t is not None]
    backend = pick_backend("rms_norm", input.device, dtypes)
    if backend == "torch":
        grads = reference.rms_norm_bwd(grad_output, input, normalized_shape, rstd, weight, output_mask)
        return tuple(as_op_output(t) for t in grads)
    ndim = len(normalized_shape)
    dy_rows, x_rows = unit_column_stride(as_rows(grad_output, ndim)), unit_column_stride(as_rows(input, ndim))
    if backend == "triton":
        from lmrt.kernels.layer_norm import norm_bwd

        dx, dw, _ = norm_bwd(dy_rows, x_rows, flat_parameter(weight), None, rstd, compute_dw=output_mask[1],
                             compute_db=False)
    else:
        dx, dw = extension_ops().rms_norm_bwd(dy_rows, x_rows, flat_parameter(weight), rstd, list(output_mask))
    return (
        as_op_output(dx, input.shape) if output_mask[0] else input.new_empty(0),
        as_op_output(dw.to(weight.dtype), weight.shape) if output_mask[1] else input.new_empty(0),
    )


@rms_norm_bwd.register_fake
def _(grad_output, input, normalized_shape, rstd, weight, output_mask):
    return (
        input.new_empty(input.shape) if output_mask[0] else input.new_empty(0),
        weight.new_empty(weight.shape) if output_mask[1] else input.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    input, normalized_shape, weight, _ = inputs
    ctx.save_for_backward(input, weight, output[1])
    ctx.normalized_shape = normalized_shape


def _backward(ctx, grad_output, _grad_rstd):
    input, weight, rstd = ctx.saved_tensors
    needs_input, _, needs_weight, _ = ctx.needs_input_grad
    grad_input, grad_weight = torch.ops.lmrt.rms_norm_bwd(
        grad_output, input, ctx.normalized_shape, rstd, weight, [needs_input, needs_weight]
    )
    return grad_input if needs_input else None, None, grad_weight if needs_weight else None, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
