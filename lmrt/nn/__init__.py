"""Modules on lmrt's ops, drop-in replacements for their torch.nn counterparts."""

from lmrt.nn.layer_norm import LayerNorm
from lmrt.nn.rms_norm import RMSNorm
from lmrt.nn.softmax import Softmax

__all__ = ["LayerNorm", "RMSNorm", "Softmax"]
