"""Under torch.autocast every op casts as its torch.nn.functional counterpart does (lmrt/ops/_autocast.py): the same
output dtype, the same values up to the lower precision, and gradients in each input's own dtype."""

import pytest
import torch
import torch.nn.functional as F

import lmrt
from lmrt.ops import _autocast
from tests.conftest import BACKENDS, DEVICE
from tests.tolerance import ULP_AT_ONE

WIDTH = 24

# op: (lmrt's call, PyTorch's call, the shapes of its tensor arguments, how many of them take gradients: attention's
# mask takes none, as the extension's kernels give none)
OPS = {
    "scaled_dot_product_attention": (
        lambda q, k, v, mask: lmrt.ops.scaled_dot_product_attention(q, k, v, mask),
        lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, mask),
        [(2, 3, 9, 16), (2, 3, 11, 16), (2, 3, 11, 16), (9, 11)], 3,
    ),
    "layer_norm": (
        lambda x, w, b: lmrt.ops.layer_norm(x, (WIDTH,), w, b),
        lambda x, w, b: F.layer_norm(x, (WIDTH,), w, b),
        [(5, WIDTH), (WIDTH,), (WIDTH,)], 3,
    ),
    "rms_norm": (
        lambda x, w: lmrt.ops.rms_norm(x, (WIDTH,), w),
        lambda x, w: F.rms_norm(x, (WIDTH,), w),
        [(5, WIDTH), (WIDTH,)], 2,
    ),
    "softmax": (lambda x: lmrt.ops.softmax(x, -1), lambda x: F.softmax(x, -1), [(5, WIDTH)], 1),
    "log_softmax": (lambda x: lmrt.ops.log_softmax(x, -1), lambda x: F.log_softmax(x, -1), [(5, WIDTH)], 1),
}


def _inputs(op, dtypes):
    _, _, shapes, differentiable = OPS[op]
    return [torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(i < differentiable)
            for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True))]


def _run(fn, inputs):
    """The output of `fn`, and the gradients of its inputs that take one for a fixed random output gradient."""
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, device=DEVICE, dtype=out.dtype, generator=torch.Generator(DEVICE).manual_seed(1))
    return out, torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad_out)


def _assert_close_in(dtype, name, got, expected):
    """Within 8 units in the last place of `dtype` at the result's scale: two computations in that precision that
    round in different orders."""
    assert got.dtype == expected.dtype, f"{name}: dtype {got.dtype}, torch gives {expected.dtype}"
    scale = max(1.0, expected.detach().double().abs().max().item())
    torch.testing.assert_close(got.detach().double(), expected.detach().double(), rtol=0,
                               atol=8 * ULP_AT_ONE[dtype] * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op,input_dtypes", [(op, dtypes) for op in OPS for dtypes in ("float32", "bfloat16")] +
                         [("scaled_dot_product_attention", "mixed")])
def test_same_dtypes_and_values_as_torch(op, input_dtypes, autocast_dtype, backend):
    lmrt_fn, torch_fn, shapes, _ = OPS[op]
    # "mixed": query float32, the others bfloat16 (as after a float32 rotary embedding of the queries), which
    # autocast makes one dtype
    dtypes = {"float32": [torch.float32] * len(shapes), "bfloat16": [torch.bfloat16] * len(shapes),
              "mixed": [torch.float32] + [torch.bfloat16] * (len(shapes) - 1)}[input_dtypes]
    inputs = _inputs(op, dtypes)
    with torch.autocast(DEVICE, dtype=autocast_dtype):
        expected, expected_grads = _run(torch_fn, inputs)
        with lmrt.backend(backend):
            got, grads = _run(lmrt_fn, inputs)
    coarsest = max([expected.dtype, *dtypes], key=ULP_AT_ONE.get)
    _assert_close_in(coarsest, "output", got, expected)
    for i, (grad, expected_grad) in enumerate(zip(grads, expected_grads, strict=True)):
        _assert_close_in(coarsest, f"gradient {i}", grad, expected_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "softmax", "log_softmax"])
def test_the_float32_policy(op, backend, monkeypatch):
    """On CUDA autocast runs the norms and softmax in float32 (PyTorch's autocast lists); tested here on DEVICE by
    giving it that policy: the output is float32 and equals the op on the inputs cast to float32, and the gradients
    come back in bfloat16."""
    monkeypatch.setitem(_autocast.POLICIES, op, {DEVICE: _autocast.FLOAT32})
    lmrt_fn, _, shapes, _ = OPS[op]
    inputs = _inputs(op, [torch.bfloat16] * len(shapes))
    with lmrt.backend(backend):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            got, grads = _run(lmrt_fn, inputs)
        expected, expected_grads = _run(lmrt_fn, [t.detach().float().requires_grad_() for t in inputs])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad, expected_grad.bfloat16())


def test_float64_and_a_given_dtype_are_left_alone():
    x = torch.randn(5, WIDTH, device=DEVICE, dtype=torch.float64)
    q = torch.randn(1, 2, 3, 8, device=DEVICE, dtype=torch.float64)
    with torch.autocast(DEVICE, dtype=torch.bfloat16), lmrt.backend("torch"):
        assert lmrt.ops.scaled_dot_product_attention(q, q, q).dtype == torch.float64
        assert lmrt.ops.layer_norm(x, (WIDTH,)).dtype == torch.float64
        assert lmrt.ops.softmax(x.float(), -1, dtype=torch.float16).dtype == torch.float16  # a given dtype wins
