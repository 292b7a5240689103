import torch

from lmrt import ops


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm on lmrt.ops.rms_norm: same arguments, parameters and state_dict keys."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(input, self.normalized_shape, self.weight, self.eps)
