import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import lmrt
from lmrt import reference
from tests.conftest import BACKENDS, DEVICE, DTYPES, needs_cpp
from tests.ops.test_layer_norm import IN_PLACE_CASES, SHAPES, long_adversarial_rows
from tests.streaming_stores import check_streamed_rows_match
from tests.tolerance import check_against_torch, check_compiled_matches_eager, forward_backward


def _check(x, weight, normalized_shape, backend, eps=None):
    def run(impl):
        return lambda x, w: impl(x, normalized_shape, w, eps)

    with lmrt.backend(backend):
        check_against_torch(run(lmrt.ops.rms_norm), run(F.rms_norm), run(reference.rms_norm),
                            [x, weight], torch.randn_like(x), ["input", "weight"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ndim", SHAPES, ids=str)
def test_matches_reference(shape, ndim, dtype, backend):
    normalized_shape = shape[len(shape) - ndim :]
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    _check(x, torch.randn(normalized_shape, device=DEVICE, dtype=dtype), normalized_shape, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 97), (2, 20000)], ids=str)
def test_without_weight(shape, backend):
    _check(torch.randn(shape, device=DEVICE), None, shape[-1:], backend, eps=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradient_over_many_rows(backend):
    """The weight gradient sums 65536 rows: a long float32 running sum per column would exceed PyTorch's error."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter takes minutes over 65536 rows; a GPU runs this case")
    x = torch.randn(65536, 16, device=DEVICE) + 0.5  # x_hat * dy has a nonzero mean, so dweight grows with the rows
    _check(x, torch.randn(16, device=DEVICE), (16,), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_adversarial_rows(backend):
    x, grad_output = long_adversarial_rows(65536)
    with lmrt.backend(backend):
        check_against_torch(lambda x, w: lmrt.ops.rms_norm(x, (65536,), w, 1e-6),
                            lambda x, w: F.rms_norm(x, (65536,), w, 1e-6),
                            lambda x, w: reference.rms_norm(x, (65536,), w, 1e-6),
                            [x, torch.randn(65536, device=DEVICE)], grad_output, ["input", "weight"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_cols", [97, 20000], ids=str)
def test_a_nan_makes_its_row_nan(n_cols, backend):
    """A NaN makes its row's output and rstd NaN, and the gradients NaN where PyTorch's are (the row's dx and every
    column's dweight), leaving the other rows alone. The CUDA kernels clamped the mean square at 0 with fmaxf,
    which takes a NaN to 0: rstd was finite, and so was the output beside the NaN. On CUDA 97 columns are held in
    registers, 20000 streamed."""
    x, weight = torch.randn(3, n_cols, device=DEVICE), torch.randn(n_cols, device=DEVICE)
    x[1, n_cols // 3] = math.nan
    grad_output = torch.randn_like(x)

    def run(impl):
        return lambda x, w: impl(x, (n_cols,), w, 1e-6)

    with lmrt.backend(backend):
        _, rstd = torch.ops.lmrt.rms_norm_fwd(x, [n_cols], weight, 1e-6)
        results = forward_backward(run(lmrt.ops.rms_norm), [x, weight], grad_output)
    expected = [torch.rsqrt(x.pow(2).mean(-1) + 1e-6), *forward_backward(run(F.rms_norm), [x, weight], grad_output)]
    for name, result, torch_result in zip(["rstd", "output", "grad_input", "grad_weight"], [rstd, *results], expected,
                                          strict=True):
        assert torch.equal(result.isnan(), torch_result.isnan()), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    for x in (torch.randn(97, 7, device=DEVICE).t(), torch.randn(3, 781, device=DEVICE)[:, 100:600]):
        _check(x, torch.randn(x.shape[-1], device=DEVICE), x.shape[-1:], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_precision_weight(backend):
    """As test_layer_norm.py's test of the same name: a float32 weight with a bfloat16 input, the output and the
    input's gradient in bfloat16, the weight's gradient in float32, within the rule against F.rms_norm."""
    x, weight = torch.randn(6, 130, device=DEVICE, dtype=torch.bfloat16), torch.randn(130, device=DEVICE)
    grad_output = torch.randn_like(x)

    def run(impl):
        return lambda x, w: impl(x, (130,), w, 1e-6)

    with lmrt.backend(backend), warnings.catch_warnings():
        # F.rms_norm warns that mixed dtypes keep it off its fused kernel
        warnings.filterwarnings("ignore", "Mismatch dtype between input and weight", UserWarning)
        results = forward_backward(run(lmrt.ops.rms_norm), [x, weight], grad_output)
        check_against_torch(run(lmrt.ops.rms_norm), run(F.rms_norm), run(reference.rms_norm), [x, weight],
                            grad_output, ["input", "weight"])
    assert [t.dtype for t in results] == [torch.bfloat16, torch.bfloat16, torch.float32]


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_cols", [781, 4096, 4097], ids=str)
def test_streaming_stores_write_the_same_bits(n_cols, dtype):
    """As LayerNorm's (tests/ops/test_layer_norm.py)."""
    weight = torch.randn(n_cols, dtype=dtype)
    check_streamed_rows_match(lambda x: lmrt.ops.rms_norm(x, (n_cols,), weight), n_cols, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(2, 0, 16, device=DEVICE, requires_grad=True)
    weight = torch.ones(16, device=DEVICE, requires_grad=True)
    with lmrt.backend(backend):
        lmrt.ops.rms_norm(x, 16, weight).sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(weight.grad, torch.zeros_like(weight))


def test_default_eps_is_that_of_the_computation():
    """PyTorch takes float32's epsilon for float16 input (it computes in float32), not float16's."""
    x = torch.full((2, 8), 1e-4, device=DEVICE, dtype=torch.float16)
    torch.testing.assert_close(lmrt.ops.rms_norm(x, (8,)), F.rms_norm(x, (8,)))


class TestBadInput:
    def test_integer_input(self):
        with pytest.raises(TypeError, match="`input` must be a floating-point tensor"):
            lmrt.ops.rms_norm(torch.ones(2, 3, dtype=torch.int32), (3,))

    def test_weight_of_wrong_size(self):
        with pytest.raises(ValueError, match=r"`weight` must have shape normalized_shape=\[2, 3\], got \[3\]"):
            lmrt.ops.rms_norm(torch.randn(4, 2, 3), (2, 3), torch.ones(3))

    def test_normalized_shape_mismatch(self):
        with pytest.raises(ValueError, match="`normalized_shape`"):
            lmrt.ops.rms_norm(torch.randn(2, 3), (2, 2))

    @pytest.mark.cuda
    def test_weight_on_another_device(self):
        with pytest.raises(ValueError, match="`weight` is on cpu but `input` is on cuda"):
            lmrt.ops.rms_norm(torch.randn(2, 3, device="cuda"), (3,), torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck(layout, backend):
    """The fake kernels' outputs match the real ones', strides included: contiguous for a transposed input and a
    strided weight too."""
    x, weight = torch.randn(5, 40, device=DEVICE), torch.randn(40, device=DEVICE)
    if layout == "transposed":
        x, weight = x.t().contiguous().t(), torch.stack([weight, weight], -1)[:, 0]
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
    with lmrt.backend(backend):
        torch.library.opcheck(torch.ops.lmrt.rms_norm_fwd.default,
                              (x.clone().requires_grad_(), [40], weight.clone().requires_grad_(), 1e-6))
        torch.library.opcheck(torch.ops.lmrt.rms_norm_bwd.default,
                              (torch.randn_like(x), x, [40], rstd, weight, [True, True]))


def test_compiles_without_graph_breaks():
    x, weight = torch.randn(6, 48, device=DEVICE), torch.randn(48, device=DEVICE)

    def step(x, weight):
        return lmrt.ops.rms_norm(x, (48,), weight).relu().sum()

    check_compiled_matches_eager(step, (x, weight))


@pytest.mark.parametrize("backend", BACKENDS)
@IN_PLACE_CASES
def test_output_modified_in_place(shape, ndim, case, backend):
    """As test_layer_norm.py's test of the same name: a residual added in place, then ReLU(inplace=True)."""
    if case == "float64" and backend != "torch":
        pytest.skip("the kernels take no float64: the torch backend serves it")
    dtype = torch.float64 if case == "float64" else torch.float32
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    normalized_shape = shape[len(shape) - ndim :]
    weight, residual = torch.randn(normalized_shape, device=DEVICE, dtype=dtype), torch.randn_like(x)

    def run(impl):
        return lambda x, w: F.relu(impl(x, normalized_shape, w, 1e-6).add_(residual), inplace=True)

    with lmrt.backend(backend), torch.autocast(DEVICE, enabled=case == "autocast"):
        check_against_torch(run(lmrt.ops.rms_norm), run(F.rms_norm), run(reference.rms_norm),
                            [x, weight], torch.randn_like(x), ["input", "weight"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_output_is_a_view(backend):
    """No output of the custom ops, backward's included, is a view of a tensor made inside them (the kernels'
    (rows, columns) results): custom ops return tensors of their own."""
    x, weight = torch.randn(2, 3, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    with lmrt.backend(backend):
        outputs = torch.ops.lmrt.rms_norm_fwd(x, [3, 8], weight, 1e-6)
        outputs += torch.ops.lmrt.rms_norm_bwd(torch.randn_like(x), x, [3, 8], outputs[1], weight, [True, True])
    assert [t._base is None for t in outputs] == [True] * 4
