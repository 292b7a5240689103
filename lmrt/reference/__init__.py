"""Plain-PyTorch references of every lmrt op: the ground truth of the tests and the `torch` backend.

Each op has a forward that also returns what its backward saves (mean and rstd, or attention's log-sum-exp),
and a backward written out by hand, so the `torch` backend runs the same contract as the kernels. The
functional forms (`layer_norm`, `softmax`, `scaled_dot_product_attention`, ...) have the torch.nn.functional
signatures and are plain differentiable PyTorch; run in float64 with autograd, they are the "exact" answer the
tests measure every backend against.

Statistics are computed in float32, or in float64 for float64 input.
"""

from lmrt.reference._dtypes import compute_dtype
from lmrt.reference.attention import (
    attention,
    attention_bwd,
    attention_fwd,
    default_scale,
    dropout_keep_mask,
    flash_attn_func,
    flash_attn_varlen_func,
    scaled_dot_product_attention,
)
from lmrt.reference.layer_norm import layer_norm, layer_norm_bwd, layer_norm_fwd
from lmrt.reference.rms_norm import rms_norm, rms_norm_bwd, rms_norm_fwd
from lmrt.reference.softmax import log_softmax, softmax, softmax_bwd, softmax_fwd

__all__ = [
    "attention", "attention_bwd", "attention_fwd", "compute_dtype", "default_scale", "dropout_keep_mask",
    "flash_attn_func", "flash_attn_varlen_func", "layer_norm", "layer_norm_bwd", "layer_norm_fwd", "log_softmax",
    "rms_norm", "rms_norm_bwd", "rms_norm_fwd", "scaled_dot_product_attention", "softmax", "softmax_bwd",
    "softmax_fwd",
]
