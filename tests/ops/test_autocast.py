"""Under torch.autocast every op casts as its torch.nn.functional counterpart does (lmrt/ops/_autocast.py): the same
output dtype, the same values up to the lower precision, and gradients in each input's own dtype."""

import pytest
import torch
import torch.nn.functional as F

import lmrt
from lmrt import reference
from lmrt.ops import _autocast
from tests.conftest import BACKENDS, DEVICE
from tests.tolerance import assert_within_torch_error, attention_floor

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
# op: the exact answer, the reference's call in float64 (its inputs cast as autocast casts them first)
EXACT = {
    "scaled_dot_product_attention": lambda q, k, v, mask: reference.scaled_dot_product_attention(q, k, v, mask),
    "layer_norm": lambda x, w, b: reference.layer_norm(x, (WIDTH,), w, b),
    # eps=None is float32's epsilon for every input dtype but float64 (the computation's): so here too
    "rms_norm": lambda x, w: reference.rms_norm(x, (WIDTH,), w, torch.finfo(torch.float32).eps),
    "softmax": lambda x: reference.softmax(x, -1),
    "log_softmax": lambda x: reference.log_softmax(x, -1),
}


def _inputs(op, dtypes):
    _, _, shapes, differentiable = OPS[op]
    return [torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(i < differentiable)
            for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True))]


def _run(fn, inputs, grad_dtype=None):
    """The output of `fn`, and the gradients of its inputs that take one for a fixed random output gradient, drawn
    in `grad_dtype` (by default the output's dtype)."""
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, device=DEVICE, dtype=grad_dtype or out.dtype,
                           generator=torch.Generator(DEVICE).manual_seed(1))
    return out, torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad_out.to(out.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op,input_dtypes", [(op, dtypes) for op in OPS for dtypes in ("float32", "bfloat16")] +
                         [("scaled_dot_product_attention", "mixed")])
def test_same_dtypes_and_values_as_torch(op, input_dtypes, autocast_dtype, backend):
    """The output and every gradient within the rule of tests/tolerance.py: the exact answer is the float64
    reference on the inputs as autocast casts them, PyTorch's own error that of its op under the same autocast."""
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
    # Autocast casts every floating input of these calls to one dtype, that of PyTorch's output (attention's to the
    # autocast dtype), or leaves them all alone (the norms and softmax on the CPU): the exact answer's inputs are
    # rounded to it. A gradient with respect to the cast input is the one with respect to the input.
    assert expected.dtype in (autocast_dtype, *dtypes)
    cast = [t.detach().to(expected.dtype).double().requires_grad_(t.requires_grad) for t in inputs]
    exact, exact_grads = _run(EXACT[op], cast, grad_dtype=expected.dtype)
    # Attention's output and gradients take its floor, its gradients 3x, as everywhere (tests/ops/test_attention.py).
    factor, floor = (3.0, attention_floor(*cast[:2], None, cast[3])) if op == "scaled_dot_product_attention" \
        else (2.0, 0.0)
    assert_within_torch_error("output", got, expected, exact, 2.0, floor)
    for i, (grad, expected_grad, exact_grad) in enumerate(zip(grads, expected_grads, exact_grads, strict=True)):
        assert grad.dtype == inputs[i].dtype, f"gradient {i}: dtype {grad.dtype}, the input's is {inputs[i].dtype}"
        assert_within_torch_error(f"gradient {i}", grad, expected_grad, exact_grad, factor, floor)


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
