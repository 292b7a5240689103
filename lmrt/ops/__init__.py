"""lmrt's public functional ops: the signatures and semantics of their torch.nn.functional counterparts.

Each is a torch.library custom op (namespace `lmrt`) with a fake implementation and registered autograd, so it
works under torch.compile(fullgraph=True); each call runs on the backend that `lmrt.backends` picks.
"""

from lmrt.ops.layer_norm import layer_norm
from lmrt.ops.rms_norm import rms_norm
from lmrt.ops.softmax import log_softmax, softmax

__all__ = ["layer_norm", "log_softmax", "rms_norm", "softmax"]
