"""Triton's float32 -> bfloat16 conversion rounds to nearest even, on a GPU and under the tests' interpreter
(tests/triton_interpreter.py), as torch's does: the error rule of the bfloat16 tests assumes it."""

import pytest
import torch

from lmrt import backends
from tests.conftest import DEVICE

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _store_as_bfloat16(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n).to(tl.bfloat16), mask=offsets < n)


@pytest.mark.skipif(backends.unavailable_reason("triton", DEVICE) is not None, reason="needs Triton on DEVICE")
def test_float32_to_bfloat16_rounds_to_nearest_even():
    one = 0x3F800000
    # Below, at and above half of bfloat16's spacing, ties to even both ways, a carry into the exponent, the largest
    # finite values (one rounds to infinity), infinities, signed zero, a subnormal, NaN; then random values.
    bits = [one + 0x7FFF, one + 0x8000, one + 0x8001, one + 0x18000, 0x3F807FFF, 0x3FFFFFFF, 0x7F7F7FFF, 0x7F7FFFFF,
            0x7F800000, 0xFF800000, 0x80000000, 0x00018000, 0x7FC00000, 0xBF818000]
    special = torch.tensor([b - 2**32 if b >= 2**31 else b for b in bits], dtype=torch.int32).view(torch.float32)
    x = torch.cat([special, torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,))]).to(DEVICE)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _store_as_bfloat16[(1,)](x, y, x.numel(), BLOCK=1024)
    expected = x.to(torch.bfloat16)
    assert torch.equal(y.isnan(), expected.isnan())
    ok = y.isnan() | (y.view(torch.int16) == expected.view(torch.int16))
    assert ok.all(), f"{(~ok).sum().item()} of {x.numel()} values rounded otherwise, e.g. {x[~ok][:4].tolist()}"
