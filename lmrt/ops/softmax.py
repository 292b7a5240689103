"""lmrt.ops.softmax and lmrt.ops.log_softmax: the torch.nn.functional calls on lmrt's backends."""

import math

import torch
from torch import Tensor
from torch.compiler import is_compiling

from lmrt import backends, reference
from lmrt._layout import as_op_output, as_outer_dim_inner
from lmrt.ops._autocast import autocast_dtype
from lmrt.ops._checks import check_dim, check_floating, refuse_forward_ad
from lmrt.ops._dispatch import eager_calls, extension_ops, pick_backend, unit_column_stride


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None) -> Tensor:
    """Softmax over `dim`; same call as F.softmax (`_stacklevel` is taken and unused), except that `dim` must be
    given. With `dtype`, the input is cast to it first, as in F.softmax; an upcast (bfloat16 to float32, say) is
    exact, so the kernels read the input as it is and write `dtype`."""
    return _softmax(input, _given_dim("softmax", dim), dtype, log=False)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
                ) -> Tensor:
    """Log-softmax over `dim`; same call as F.log_softmax, except that `dim` must be given."""
    return _softmax(input, _given_dim("log_softmax", dim), dtype, log=True)


def _given_dim(op: str, dim: int | None) -> int:
    """`dim` as given, or an error for None: F's implicit choice of a dim for None is deprecated."""
    if dim is None:
        raise ValueError(f"lmrt.ops.{op}: `dim` must be given; F.{op}'s implicit choice of a dim for dim=None is "
                         "deprecated and not supported")
    return dim


def _op_name(log: bool) -> str:
    return "log_softmax" if log else "softmax"


def _cast_rounds(input: Tensor, dtype: torch.dtype | None) -> bool:
    """Whether casting floating `input` to floating `dtype` rounds it (float32 to bfloat16, say); bad arguments are
    left to the checks."""
    return (isinstance(input, Tensor) and input.is_floating_point() and isinstance(dtype, torch.dtype)
            and dtype.is_floating_point and torch.promote_types(input.dtype, dtype) != dtype)


def _softmax(input: Tensor, dim: int, dtype: torch.dtype | None, log: bool) -> Tensor:
    if _cast_rounds(input, dtype):
        input = input.to(dtype)  # F.softmax casts before the softmax
    if not is_compiling():
        output = eager_calls.softmax(backends.context_choice, input, dim, dtype, log)
        if output is not None:
            return output
    op = _op_name(log)
    if dtype is None:
        # float32 under autocast on CUDA, as F.softmax: an upcast, which the kernels fuse. (The eager call above
        # declines every call under autocast.)
        dtype = autocast_dtype(op, input)
    check_floating(op, "input", input)
    dim = check_dim(op, input, dim)
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"lmrt.ops.{op}: `dtype` must be a floating-point dtype, got {dtype}")
    refuse_forward_ad(op, input)
    out_dtype = input.dtype if dtype is None else dtype
    if input.dim() == 0:
        return _softmax(input.reshape(1), 0, dtype, log).reshape(())
    return torch.ops.lmrt.softmax_fwd(input, dim, out_dtype, log)


@torch.library.custom_op("lmrt::softmax_fwd", mutates_args=())
def softmax_fwd(input: Tensor, dim: int, out_dtype: torch.dtype, log: bool) -> Tensor:
    """Softmax, or log-softmax when `log`, of `input` over `dim`, written contiguous in `out_dtype`."""
    backend = pick_backend(_op_name(log), input.device, (input.dtype, out_dtype))
    if backend == "triton":
        from lmrt.kernels.softmax import softmax_fwd as triton_softmax_fwd

        return as_op_output(triton_softmax_fwd(as_outer_dim_inner(input, dim), out_dtype, log), input.shape)
    if backend in ("cpp", "cuda"):
        y = extension_ops().softmax_fwd(unit_column_stride(_dim_last_rows(input, dim)), out_dtype, log)
        return _from_dim_last_rows(y, input.shape, dim)
    return reference.softmax_fwd(input, dim, out_dtype, log).contiguous()


@softmax_fwd.register_fake
def _(input, dim, out_dtype, log):
    return torch.empty(input.shape, dtype=out_dtype, device=input.device)


@torch.library.custom_op("lmrt::softmax_bwd", mutates_args=())
def softmax_bwd(grad_output: Tensor, output: Tensor, dim: int, log: bool, input_dtype: torch.dtype) -> Tensor:
    """Gradient of `softmax_fwd` with respect to its input, from its output; contiguous, in `input_dtype`."""
    dtypes = (grad_output.dtype, output.dtype, input_dtype)
    backend = pick_backend(_op_name(log), output.device, dtypes)
    if backend == "triton":
        from lmrt.kernels.softmax import softmax_bwd as triton_softmax_bwd

        dy, y = as_outer_dim_inner(grad_output, dim), as_outer_dim_inner(output, dim)
        return as_op_output(triton_softmax_bwd(dy, y, input_dtype, log), output.shape)
    if backend in ("cpp", "cuda"):
        dy, y = (unit_column_stride(_dim_last_rows(t, dim)) for t in (grad_output, output))
        return _from_dim_last_rows(extension_ops().softmax_bwd(dy, y, input_dtype, log), output.shape, dim)
    return reference.softmax_bwd(grad_output, output, dim, log, input_dtype).contiguous()


def _dim_last_rows(x: Tensor, dim: int) -> Tensor:
    """`x` as (rows, size of `dim`) with `dim` moved last: the layout of the extension's row kernels (a view when
    `dim` is already last, else a copy)."""
    moved = x.movedim(dim, -1)
    return moved.reshape(math.prod(moved.shape[:-1]), x.shape[dim])


def _from_dim_last_rows(rows: Tensor, shape: torch.Size, dim: int) -> Tensor:
    """The contiguous tensor of `shape` whose `dim`, moved last, the (rows, size of `dim`) matrix `rows` holds (no
    view of `rows`, and no copy when `dim` is last)."""
    moved_shape = [*shape[:dim], *shape[dim + 1 :], shape[dim]]
    return as_op_output(rows.view(moved_shape).movedim(-1, dim).contiguous(), shape)


@softmax_bwd.register_fake
def _(grad_output, output, dim, log, input_dtype):
    return torch.empty(output.shape, dtype=input_dtype, device=output.device)


def _setup_context(ctx, inputs, output):
    input, dim, _, log = inputs
    ctx.save_for_backward(output)
    ctx.dim, ctx.log, ctx.input_dtype = dim, log, input.dtype


def _backward(ctx, grad_output):
    (output,) = ctx.saved_tensors
    return torch.ops.lmrt.softmax_bwd(grad_output, output, ctx.dim, ctx.log, ctx.input_dtype), None, None, None


softmax_fwd.register_autograd(_backward, setup_context=_setup_context)
