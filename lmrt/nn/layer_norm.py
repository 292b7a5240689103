import torch

from lmrt import ops


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on lmrt.ops.layer_norm: same arguments, parameters and state_dict keys.

    A subclass, so `isinstance(m, torch.nn.LayerNorm)` holds and state dicts load both ways.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
