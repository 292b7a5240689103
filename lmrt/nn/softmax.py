import torch

from lmrt import ops


class Softmax(torch.nn.Softmax):
    """torch.nn.Softmax on lmrt.ops.softmax: same arguments."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.dim is None:
            raise ValueError("lmrt.nn.Softmax: `dim` must be given; the implicit choice of torch.nn.Softmax(dim=None) "
                             "is deprecated and not supported")
        return ops.softmax(input, self.dim)
