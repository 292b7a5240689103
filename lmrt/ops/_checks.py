"""Input checks shared by the ops: each error names the op, the argument, what it got and what it needs."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch.autograd import forward_ad


def check_floating(op: str, name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"lmrt.ops.{op}: `{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"lmrt.ops.{op}: `{name}` must be a floating-point tensor (float32, float16 or bfloat16), "
                        f"got {tensor.dtype}")


def check_normalized_shape(op: str, input: torch.Tensor, normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    """`normalized_shape` as a tuple, checked to be the trailing dims of `input`."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape:
        raise ValueError(f"lmrt.ops.{op}: `normalized_shape` must hold at least one dim, got []")
    if len(shape) > input.dim() or tuple(input.shape[input.dim() - len(shape) :]) != shape:
        raise ValueError(f"lmrt.ops.{op}: `normalized_shape` {list(shape)} must equal the last dimensions of "
                         f"`input`, whose shape is {list(input.shape)}")
    return shape


def check_parameter(
    op: str, name: str, param: torch.Tensor | None, input: torch.Tensor, normalized_shape: tuple[int, ...]
) -> None:
    """A weight or bias: floating point, of shape `normalized_shape`, on `input`'s device."""
    if param is None:
        return
    check_floating(op, name, param)
    if tuple(param.shape) != normalized_shape:
        raise ValueError(f"lmrt.ops.{op}: `{name}` must have shape normalized_shape={list(normalized_shape)}, "
                         f"got {list(param.shape)}")
    if param.device != input.device:
        raise ValueError(f"lmrt.ops.{op}: `{name}` is on {param.device} but `input` is on {input.device}; "
                         "they must be on the same device")


def check_dim(op: str, input: torch.Tensor, dim: int) -> int:
    """`dim` made a non-negative int (from any integer PyTorch takes: a NumPy one, a 0-dim integer tensor); a 0-dim
    tensor counts as having one dim, as in torch.softmax."""
    ndim = max(input.dim(), 1)
    try:
        index = operator.index(dim)
    except TypeError:
        index = None
    if index is None or not -ndim <= index < ndim:
        raise IndexError(f"lmrt.ops.{op}: `dim` must be an int in [{-ndim}, {ndim - 1}] for `input` of shape "
                         f"{list(input.shape)}, got {dim!r}")
    return index % ndim


def refuse_forward_ad(op: str, *tensors: torch.Tensor | None) -> None:
    """Refuse dual tensors (torch.func.jvp, torch.autograd.forward_ad): lmrt's custom ops have no forward-mode
    formula, and PyTorch would give them a zero tangent without a word. lmrt._C's eager path refuses them too."""
    if forward_ad._current_level < 0:  # no dual level entered: no tensor can carry a tangent
        return
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and forward_ad.unpack_dual(tensor).tangent is not None:
            raise RuntimeError(f"lmrt.ops.{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
                               "supported; use the reverse mode (backward)")
