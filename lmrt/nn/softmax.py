import torch

from lmrt import ops


class Softmax(torch.nn.Softmax):
    """torch.nn.Softmax on lmrt.ops.softmax: same arguments, except that `dim` must be given (torch's implicit choice
    for dim=None is deprecated; here it raises a ValueError at the first call)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.dim is None:
            raise ValueError("lmrt.nn.Softmax: `dim` must be given; the implicit choice of torch.nn.Softmax(dim=None) "
                             "is deprecated and not supported")
        return ops.softmax(input, self.dim)
