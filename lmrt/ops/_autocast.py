"""torch.autocast on lmrt.ops: each op casts under autocast as its torch.nn.functional counterpart does.

PyTorch's autocast casts the floating inputs of the ops on its lists (ATen's autocast_mode.cpp): to the autocast
dtype for scaled_dot_product_attention, on CPU and CUDA; to float32 for layer_norm and rms_norm on CUDA, where
softmax and log_softmax also compute in float32 unless given a `dtype`. lmrt's custom ops are on no list, so
lmrt.ops applies the same casts before calling them. The casts are differentiable, so the gradients reach the
inputs in their own dtypes. As in autocast, float64 tensors and tensors on another device are left alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOWER_PRECISION = "the autocast dtype"
FLOAT32 = "float32"

# Per op, the device types on which autocast casts its inputs, and to what; on others it leaves them.
POLICIES: dict[str, dict[str, str]] = {
    "scaled_dot_product_attention": {"cpu": LOWER_PRECISION, "cuda": LOWER_PRECISION},
    "layer_norm": {"cuda": FLOAT32},
    "rms_norm": {"cuda": FLOAT32},
    "softmax": {"cuda": FLOAT32},
    "log_softmax": {"cuda": FLOAT32},
}


def autocast_dtype(op: str, input: object) -> torch.dtype | None:
    """The dtype that autocast, if on, casts `op`'s floating inputs to, for a call whose first tensor is `input`;
    None when it leaves them alone (autocast off, or not on `op` on that device, or `input` not eligible)."""
    if not eligible(input, None):
        return None
    device_type = input.device.type
    policy = POLICIES[op].get(device_type)
    if policy is None or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if policy == LOWER_PRECISION else torch.float32


def eligible(t: object, device_type: str | None) -> bool:
    """Whether autocast casts `t`: a floating tensor, not float64, on `device_type` (any device when None)."""
    return (isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and (device_type is None or t.device.type == device_type))


def autocast_inputs(op: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """`tensors` (the first one deciding the device) as autocast casts them for `op`; unchanged when it is off."""
    dtype = autocast_dtype(op, tensors[0])
    if dtype is None:
        return tensors
    device_type = tensors[0].device.type
    return tuple(t.to(dtype) if eligible(t, device_type) else t for t in tensors)
