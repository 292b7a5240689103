"""The C++ CPU kernels round their bfloat16 outputs to nearest even, whichever way the CPU rounds (AVX512-BF16's
vcvtne2ps2bf16 where it has the instruction, at::vec's integer rounding elsewhere; csrc/cpu/float_rows.h): a
forward on bfloat16 input gives its float32 forward's output, on the same values, rounded by torch."""

import pytest
import torch

import lmrt
from tests.conftest import needs_cpp

FORWARDS = {
    "layer_norm": lambda x, weight, bias: lmrt.ops.layer_norm(x, x.shape[-1:], weight.to(x.dtype), bias.to(x.dtype)),
    "rms_norm": lambda x, weight, bias: lmrt.ops.rms_norm(x, x.shape[-1:], weight.to(x.dtype)),
    "softmax": lambda x, weight, bias: lmrt.ops.softmax(x, -1),
    "log_softmax": lambda x, weight, bias: lmrt.ops.log_softmax(x, -1),
}


@needs_cpp
@pytest.mark.parametrize("op", FORWARDS)
@pytest.mark.parametrize("n_cols", [781, 4096, 4097], ids=str)
def test_bfloat16_output_is_the_float32_output_rounded(n_cols, op):
    """The float32 and bfloat16 forwards compute in float32 alike (their rows are read into the same float32
    vectors) and differ in the last store only."""
    x = torch.randn(37, n_cols).to(torch.bfloat16)
    weight, bias = torch.randn(n_cols).to(torch.bfloat16), torch.randn(n_cols).to(torch.bfloat16)
    with lmrt.backend("cpp"):
        rounded = FORWARDS[op](x, weight, bias)
        exact = FORWARDS[op](x.float(), weight, bias)
    assert rounded.dtype == torch.bfloat16
    assert torch.equal(rounded.view(torch.int16), exact.to(torch.bfloat16).view(torch.int16))
