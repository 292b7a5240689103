"""Forward-mode AD is refused with a clear error on every path: the ops have no forward-mode formula, and a custom op
would otherwise give a zero tangent without a word."""

import pytest
import torch
from torch.autograd import forward_ad

import lmrt
from tests.conftest import BACKENDS, DEVICE


def _randn(*shape):
    return torch.randn(*shape, device=DEVICE)


CU_SEQLENS = torch.tensor([0, 3, 7], device=DEVICE, dtype=torch.int32)
# op: a call of it whose first argument is the tensor given a tangent
CALLS = {
    "sdpa": lambda q: lmrt.ops.scaled_dot_product_attention(q, q, q),
    "sdpa_3d": lambda q: lmrt.ops.scaled_dot_product_attention(q[0], q[0], q[0]),  # the Python path on every backend
    "flash_attn_func": lambda q: lmrt.ops.flash_attn_func(q, q, q),
    "flash_attn_varlen_func": lambda q: lmrt.ops.flash_attn_varlen_func(q[0], q[0], q[0], CU_SEQLENS, CU_SEQLENS,
                                                                        4, 4),
    "layer_norm": lambda q: lmrt.ops.layer_norm(q, (8,)),
    "rms_norm": lambda q: lmrt.ops.rms_norm(q, (8,)),
    "softmax": lambda q: lmrt.ops.softmax(q, -1),
    "log_softmax": lambda q: lmrt.ops.log_softmax(q, -1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", CALLS)
def test_jvp_is_refused(op, backend):
    q = _randn(1, 7, 2, 8)
    with lmrt.backend(backend), pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(CALLS[op], (q,), (torch.ones_like(q),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dual_weight_is_refused(backend):
    x, weight = _randn(3, 8), _randn(8)
    with lmrt.backend(backend), forward_ad.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        lmrt.ops.layer_norm(x, (8,), forward_ad.make_dual(weight, torch.ones_like(weight)))


def test_plain_tensors_inside_a_dual_level_are_served():
    x = _randn(3, 8)
    with forward_ad.dual_level():
        torch.testing.assert_close(lmrt.ops.softmax(x, -1), torch.softmax(x, -1))
