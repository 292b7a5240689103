"""lmrt.nn's positional encodings against formulas written in the test: the sinusoids of "Attention Is All You
Need" from math.sin/cos, a learned table's rows at an offset, and RoFormer's rotation as a complex product, with
the relative-position property of rotary scores; clear errors for positions beyond the table.

Tolerance: float32 assert_close defaults against float64 formulas (the modules compute their tables in float64 and
round them to float32 once); a wrong frequency, pair layout or offset is off by far more.
"""

import math

import pytest
import torch

import lmrt
from tests.conftest import BACKENDS, DEVICE

# The positional modules call no lmrt op today; running them on both backends keeps the check when kernels come.


def rotate_complex(x: torch.Tensor, offset: int = 0, base: float = 10000.0) -> torch.Tensor:
    """RoFormer's rotation as a complex product, in float64: the pair (x[i], x[i + d/2]) of a head at position p is
    the complex number x[i] + j x[i + d/2], multiplied by exp(j p base^(-2i/d)). x is (batch, length, heads, d),
    its positions offset, offset + 1, ..."""
    half = x.shape[-1] // 2
    positions = torch.arange(offset, offset + x.shape[1], dtype=torch.float64, device=x.device)
    frequencies = base ** (-2 * torch.arange(half, dtype=torch.float64, device=x.device) / (2 * half))
    angles = positions[:, None, None] * frequencies  # broadcast over the heads
    pairs = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([pairs.real, pairs.imag], dim=-1).to(x.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("embed_dim", [6, 7])
def test_sinusoidal_matches_paper_formula(embed_dim, backend):
    max_length, offset, length = 12, 3, 5
    module = lmrt.nn.SinusoidalPositionalEncoding(embed_dim, max_length, device=DEVICE)
    x = torch.randn(2, length, embed_dim, device=DEVICE)
    with lmrt.backend(backend):
        encoding = module(x, offset) - x
    # PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)); odd widths end on a sine.
    expected = torch.tensor([[(math.sin if c % 2 == 0 else math.cos)(p / 10000 ** (2 * (c // 2) / embed_dim))
                              for c in range(embed_dim)] for p in range(offset, offset + length)],
                            dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(encoding, expected.float().expand_as(x))
    x64 = x.double()  # a float64 run keeps float64's precision (a float32 table would be off by ~1e-8)
    torch.testing.assert_close(module(x64, offset) - x64, expected.expand_as(x64), rtol=0, atol=1e-14)
    # The table is fixed: not a parameter, not in the state dict (models saved with it load without it).
    assert list(module.parameters()) == [] and module.state_dict() == {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_adds_rows_at_offset(backend):
    max_length, offset, length = 10, 4, 6
    module = lmrt.nn.LearnedPositionalEmbedding(max_length, 8, device=DEVICE)
    x = torch.randn(3, length, 8, device=DEVICE, requires_grad=True)
    grad = torch.randn(3, length, 8, device=DEVICE)
    with lmrt.backend(backend):
        out = module(x, offset)
        out.backward(grad)
    torch.testing.assert_close(out, x + module.weight[offset: offset + length])
    torch.testing.assert_close(x.grad, grad)
    expected_grad = torch.zeros(max_length, 8, device=DEVICE)
    expected_grad[offset: offset + length] = grad.sum(0)
    torch.testing.assert_close(module.weight.grad, expected_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0, 5])
def test_rotary_matches_complex_rotation(offset, backend):
    module = lmrt.nn.RotaryEmbedding(8, max_length=12, device=DEVICE)
    x = torch.randn(3, 7, 2, 8, device=DEVICE, requires_grad=True)
    grad = torch.randn_like(x)
    with lmrt.backend(backend):
        out = module(x, offset)
        out.backward(grad)
    x64 = x.detach().double().requires_grad_(True)
    expected = rotate_complex(x64, offset)
    expected.backward(grad.double())
    torch.testing.assert_close(out, expected.float())
    torch.testing.assert_close(x.grad, x64.grad.float())


def test_rotary_keeps_dtype():
    module = lmrt.nn.RotaryEmbedding(8, max_length=12, device=DEVICE)
    x = torch.randn(2, 5, 3, 8, device=DEVICE, dtype=torch.bfloat16)
    out = module(x, 2)
    assert out.dtype == torch.bfloat16
    # One bfloat16 rounding of the float32 result: half an ulp of bfloat16 (2^-8) relative.
    torch.testing.assert_close(out, rotate_complex(x.double(), 2).bfloat16(), rtol=2**-8, atol=1e-5)


TABLE_MODULES = {"rotary": lambda device: lmrt.nn.RotaryEmbedding(8, max_length=12, device=device),
                 "sinusoidal": lambda device: lmrt.nn.SinusoidalPositionalEncoding(8, max_length=12, device=device)}


@pytest.mark.parametrize("make", TABLE_MODULES.values(), ids=TABLE_MODULES.keys())
@pytest.mark.parametrize("convert", [lambda m: m.bfloat16(), lambda m: m.bfloat16().float(),
                                     lambda m: m.to(device="meta").to_empty(device=DEVICE)],
                         ids=["bfloat16", "bfloat16-float", "to_empty"])
def test_tables_stay_exact_float32_when_the_module_is_converted(make, convert):
    """model.bfloat16() rounded the tables to bfloat16 (2e-3 off), for good after .float(), and Module.to_empty (the
    meta-device recipe) left them uninitialized, which load_state_dict cannot mend (they are not in the state dict).
    They are computed again after every conversion, so a converted module encodes as a new one does."""
    module, fresh = convert(torch.nn.Sequential(make(DEVICE)))[0], make(DEVICE)
    for name, table in fresh.named_buffers():
        assert module.get_buffer(name).dtype == torch.float32
        torch.testing.assert_close(module.get_buffer(name), table, rtol=0, atol=0)
    x = torch.randn(2, 5, 3, 8, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(module(x), fresh(x), rtol=0, atol=0)


def test_rotary_scores_depend_on_relative_position_only():
    module = lmrt.nn.RotaryEmbedding(8, max_length=40, device=DEVICE)
    q, k = torch.randn(2, 1, 1, 1, 8, device=DEVICE, dtype=torch.float64)

    def score(query_position, key_position):
        return (module(q, query_position) * module(k, key_position)).sum().item()

    for difference in (-3, 0, 5):
        scores = [score(p, p - difference) for p in (10, 17, 30)]
        # float64 throughout (float32 tables would move a score of size ~8 by ~1e-5): equal to rounding.
        assert scores == pytest.approx([scores[0]] * 3, abs=1e-12), f"p - r = {difference}: {scores}"
    assert abs(score(10, 7) - score(10, 5)) > 1e-2, "scores at different distances should differ"


@pytest.mark.parametrize("module,x", [
    (lmrt.nn.SinusoidalPositionalEncoding(8, 12), torch.zeros(2, 5, 8)),
    (lmrt.nn.LearnedPositionalEmbedding(12, 8), torch.zeros(2, 5, 8)),
    (lmrt.nn.RotaryEmbedding(8, 12), torch.zeros(2, 5, 3, 8)),
], ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else "")
def test_position_beyond_table(module, x):
    module(x, offset=7)  # positions 7 to 11: the last row of the table
    with pytest.raises(ValueError, match=r"positions 8 to 12 do not fit the table of max_length=12"):
        module(x, offset=8)
    with pytest.raises(ValueError, match=r"`offset` must be >= 0, got -1"):
        module(x, offset=-1)


class TestBadConfig:
    @pytest.mark.parametrize("head_dim", [7, 0])
    def test_rotary_head_dim_even(self, head_dim):
        with pytest.raises(ValueError, match=f"`head_dim` must be even and >= 2, got {head_dim}"):
            lmrt.nn.RotaryEmbedding(head_dim, 12)

    def test_rotary_input_head_dim(self):
        with pytest.raises(ValueError, match=r"the last dim of `x` must be head_dim=8, got shape \[2, 5, 3, 6\]"):
            lmrt.nn.RotaryEmbedding(8, 12)(torch.zeros(2, 5, 3, 6))

    @pytest.mark.parametrize("sizes", [(0, 12), (8, 0)])
    def test_sinusoidal_sizes(self, sizes):
        with pytest.raises(ValueError, match="must be >= 1"):
            lmrt.nn.SinusoidalPositionalEncoding(*sizes)
