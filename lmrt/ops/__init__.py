"""lmrt's public functional ops: the signatures and semantics of their torch.nn.functional counterparts
(and of the flash-attn package's calls for `flash_attn_func` and `flash_attn_varlen_func`).

Each is a torch.library custom op (namespace `lmrt`) with a fake implementation and registered autograd, so it
works under torch.compile(fullgraph=True); each call runs on the backend that `lmrt.backends` picks.
"""

from lmrt.ops.attention import scaled_dot_product_attention
from lmrt.ops.flash_attn import flash_attn_func, flash_attn_varlen_func
from lmrt.ops.layer_norm import layer_norm
from lmrt.ops.rms_norm import rms_norm
from lmrt.ops.softmax import log_softmax, softmax

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "layer_norm", "log_softmax", "rms_norm",
           "scaled_dot_product_attention", "softmax"]
