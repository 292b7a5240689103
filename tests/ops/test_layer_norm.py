import math

import pytest
import torch
import torch.nn.functional as F

import lmrt
from lmrt import reference
from tests.conftest import BACKENDS, DEVICE, DTYPES, MANY_ROWS, needs_cpp
from tests.streaming_stores import check_streamed_rows_match
from tests.tolerance import check_against_torch, check_compiled_matches_eager, forward_backward

# (input shape, number of normalized trailing dims): odd sizes, a row longer than one block, 3-D and 4-D inputs, and
# inputs normalized whole (one row: 1-D, and 2-D over both dims).
SHAPES = [((1, 1), 1), ((7, 97), 1), ((3, 781), 1), ((MANY_ROWS, 781), 1), ((2, 1, 65537), 1), ((4, 9, 33), 1),
          ((2, 3, 5, 24), 2), ((65,), 1), ((3, 33), 2)]


def _inputs(shape, ndim, dtype, affine=(True, True)):
    normalized_shape = shape[len(shape) - ndim :]
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    weight = torch.randn(normalized_shape, device=DEVICE, dtype=dtype) if affine[0] else None
    bias = torch.randn(normalized_shape, device=DEVICE, dtype=dtype) if affine[1] else None
    return x, weight, bias, normalized_shape


def _check(x, weight, bias, normalized_shape, backend, eps=1e-5):
    def run(impl):
        return lambda x, w, b: impl(x, normalized_shape, w, b, eps)

    with lmrt.backend(backend):
        check_against_torch(run(lmrt.ops.layer_norm), run(F.layer_norm), run(reference.layer_norm),
                            [x, weight, bias], torch.randn_like(x), ["input", "weight", "bias"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ndim", SHAPES, ids=str)
def test_matches_reference(shape, ndim, dtype, backend):
    _check(*_inputs(shape, ndim, dtype), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [(False, False), (True, False)], ids=["no_affine", "no_bias"])
@pytest.mark.parametrize("shape", [(7, 97), (2, 20000)], ids=str)
def test_without_weight_or_bias(shape, affine, backend):
    _check(*_inputs(shape, 1, torch.float32, affine), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    transposed = torch.randn(97, 7, device=DEVICE).t()
    sliced = torch.randn(3, 781, device=DEVICE)[:, 100:600]
    expanded = torch.randn(1, 64, device=DEVICE).expand(5, 64)
    for x in (transposed, sliced, expanded):
        n = x.shape[-1]
        _check(x, torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE), (n,), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_keeps_variance(backend):
    x, weight, bias, normalized_shape = _inputs((5, 300), 1, torch.float32)
    _check(x + 1e4, weight, bias, normalized_shape, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_whose_first_elements_stand_apart(backend):
    # The cpp forward estimates each row's mean from its first elements; where they are far from the rest, it
    # must still find the variance accurately.
    x, weight, bias, normalized_shape = _inputs((4, 20000), 1, torch.float32)
    x[:, :128] += 1000.0
    _check(x, weight, bias, normalized_shape, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_cols", [97, 20000], ids=str)
def test_a_nan_makes_its_row_nan(n_cols, backend):
    """A NaN makes its row's output, mean and rstd NaN, and the gradients NaN where PyTorch's are (the row's dx and
    every column's dweight), leaving the other rows alone. The CUDA kernels clamped the variance at 0 with fmaxf,
    which takes a NaN to 0: the saved rstd was finite. On CUDA 97 columns are held in registers, 20000 streamed."""
    x, weight, bias, normalized_shape = _inputs((3, n_cols), 1, torch.float32)
    x[1, n_cols // 3] = math.nan
    grad_output = torch.randn_like(x)

    def run(impl):
        return lambda x, w, b: impl(x, normalized_shape, w, b, 1e-5)

    with lmrt.backend(backend):
        _, mean, rstd = torch.ops.lmrt.layer_norm_fwd(x, list(normalized_shape), weight, bias, 1e-5)
        results = forward_backward(run(lmrt.ops.layer_norm), [x, weight, bias], grad_output)
    expected = [x.mean(-1), torch.rsqrt(x.var(-1, unbiased=False) + 1e-5),
                *forward_backward(run(F.layer_norm), [x, weight, bias], grad_output)]
    names = ["mean", "rstd", "output", "grad_input", "grad_weight", "grad_bias"]
    for name, result, torch_result in zip(names, [mean, rstd, *results], expected, strict=True):
        assert torch.equal(result.isnan(), torch_result.isnan()), name


def long_adversarial_rows(n):
    """Rows of n that a float32 running sum gets wrong by an error growing with n (the cpp kernels once summed each
    vector lane's n / 16 terms one after another): two-valued at a large and at a unit scale, and constant, with a
    constant gradient, whose mean the backward must cancel exactly. Shared with test_rms_norm.py."""
    x = torch.empty(3, n, device=DEVICE)
    x[0, : n // 3], x[0, n // 3 :] = 1e4, -5e3
    x[1, : n // 3], x[1, n // 3 :] = 1.0, -0.5
    x[2] = 1234.5
    return x, torch.full_like(x, 0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_adversarial_rows(backend):
    x, grad_output = long_adversarial_rows(65536)
    weight, bias = torch.randn(65536, device=DEVICE), torch.randn(65536, device=DEVICE)

    def run(impl):
        return lambda x, w, b: impl(x, (65536,), w, b, 1e-5)

    with lmrt.backend(backend):
        check_against_torch(run(lmrt.ops.layer_norm), run(F.layer_norm), run(reference.layer_norm),
                            [x, weight, bias], grad_output, ["input", "weight", "bias"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_precision_weight(backend):
    """A float32 weight and bias with a bfloat16 input, as PyTorch's own layer_norm allows: the output and the
    input's gradient in bfloat16, the weight's and bias's gradients in float32, each within the rule of
    tests/tolerance.py against F.layer_norm. The float32 gradients are what make the check sharp: they carry
    float32's precision, where an error of the normalization (a wrong variance or eps) stands out at once."""
    x, _, _, normalized_shape = _inputs((6, 130), 1, torch.bfloat16)
    weight, bias = torch.randn(130, device=DEVICE), torch.randn(130, device=DEVICE)
    grad_output = torch.randn_like(x)

    def run(impl):
        return lambda x, w, b: impl(x, normalized_shape, w, b, 1e-5)

    with lmrt.backend(backend):
        results = forward_backward(run(lmrt.ops.layer_norm), [x, weight, bias], grad_output)
        check_against_torch(run(lmrt.ops.layer_norm), run(F.layer_norm), run(reference.layer_norm),
                            [x, weight, bias], grad_output, ["input", "weight", "bias"])
    assert [t.dtype for t in results] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_cols", [781, 4096, 4097], ids=str)
def test_streaming_stores_write_the_same_bits(n_cols, dtype):
    """The C++ forward and backward of a call that outgrows the cache write y's and dx's rows that start aligned
    with streaming stores (one row in 8 to 32 at 781 and 4097 columns, every row at 4096): the same bits as plain
    stores'."""
    weight, bias = torch.randn(n_cols, dtype=dtype), torch.randn(n_cols, dtype=dtype)
    check_streamed_rows_match(lambda x: lmrt.ops.layer_norm(x, (n_cols,), weight, bias), n_cols, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 33, device=DEVICE, requires_grad=True)
    weight = torch.randn(33, device=DEVICE, requires_grad=True)
    with lmrt.backend(backend):
        y = lmrt.ops.layer_norm(x, (33,), weight)
        y.sum().backward()
    assert y.shape == (0, 33)
    assert x.grad.shape == (0, 33)
    torch.testing.assert_close(weight.grad, torch.zeros_like(weight))


def test_weight_gradient_is_deterministic():
    x, weight, bias, normalized_shape = _inputs((300, 257), 1, torch.float32)
    grads = []
    for _ in range(2):
        w = weight.clone().requires_grad_(True)
        with lmrt.backend("triton"):
            lmrt.ops.layer_norm(x, normalized_shape, w, bias).pow(2).sum().backward()
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])


def test_float64_falls_back_or_raises():
    x = torch.randn(4, 8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="'triton' backend was chosen.*float64"):
        with lmrt.backend("triton"):
            lmrt.ops.layer_norm(x, (8,))
    torch.testing.assert_close(lmrt.ops.layer_norm(x, (8,)), F.layer_norm(x, (8,)))


class TestBadInput:
    def test_integer_input(self):
        with pytest.raises(TypeError, match="`input` must be a floating-point tensor.*torch.int64"):
            lmrt.ops.layer_norm(torch.ones(2, 3, dtype=torch.long), (3,))

    def test_weight_of_wrong_size(self):
        with pytest.raises(ValueError, match=r"`weight` must have shape normalized_shape=\[3\], got \[4\]"):
            lmrt.ops.layer_norm(torch.randn(2, 3), (3,), torch.ones(4))

    def test_bias_of_wrong_size(self):
        with pytest.raises(ValueError, match=r"`bias` must have shape"):
            lmrt.ops.layer_norm(torch.randn(2, 3), (3,), torch.ones(3), torch.ones(2))

    def test_normalized_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"`normalized_shape` \[4\] must equal the last dimensions of `input`"):
            lmrt.ops.layer_norm(torch.randn(2, 3), (4,))
        with pytest.raises(ValueError, match=r"`normalized_shape` must hold at least one dim, got \[\]"):
            lmrt.ops.layer_norm(torch.randn(2, 3), ())

    @pytest.mark.cuda
    def test_weight_on_another_device(self):
        with pytest.raises(ValueError, match="`weight` is on cpu but `input` is on cuda"):
            lmrt.ops.layer_norm(torch.randn(2, 3, device="cuda"), (3,), torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck(layout, backend):
    """The fake kernels' outputs match the real ones', strides included: contiguous for a transposed input and a
    strided weight too."""
    x, weight, bias, normalized_shape = _inputs((5, 40), 1, torch.float32)
    if layout == "transposed":
        x, weight = x.t().contiguous().t(), torch.stack([weight, weight], -1)[:, 0]
    mean, rstd = x.mean(-1), torch.rsqrt(x.var(-1, unbiased=False) + 1e-5)
    with lmrt.backend(backend):
        torch.library.opcheck(torch.ops.lmrt.layer_norm_fwd.default,
                              (x.clone().requires_grad_(), list(normalized_shape), weight.clone().requires_grad_(),
                               bias, 1e-5))
        torch.library.opcheck(torch.ops.lmrt.layer_norm_bwd.default,
                              (torch.randn_like(x), x, list(normalized_shape), mean, rstd, weight, bias, [True] * 3))


def test_compiles_without_graph_breaks():
    x, weight, bias, normalized_shape = _inputs((6, 48), 1, torch.float32)

    def step(x, weight, bias):
        return lmrt.ops.layer_norm(x, normalized_shape, weight, bias).relu().sum()

    check_compiled_matches_eager(step, (x, weight, bias))


# The in-place tests' cases, here and in test_rms_norm.py: (input shape, normalized dims, float32, float64 or autocast).
IN_PLACE_CASES = pytest.mark.parametrize("shape,ndim,case", [
    (shape, ndim, case) for shape, ndim in [((4, 8), 1), ((2, 3, 8), 2)] for case in ("float32", "float64", "autocast")
], ids=str)


@pytest.mark.parametrize("backend", BACKENDS)
@IN_PLACE_CASES
def test_output_modified_in_place(shape, ndim, case, backend):
    """A residual added in place to the output, then ReLU(inplace=True), as after F.layer_norm: same gradients. The
    custom op returned a view of the kernels' (rows, columns) output, which autograd refuses to modify in place;
    only the eager C++ call (cpp, float32, no autocast) did not. float64 runs on the reference (the kernels take
    none), and under autocast every backend goes through the custom op."""
    if case == "float64" and backend != "torch":
        pytest.skip("the kernels take no float64: the torch backend serves it")
    x, weight, bias, normalized_shape = _inputs(shape, ndim, torch.float64 if case == "float64" else torch.float32)
    residual = torch.randn_like(x)

    def run(impl):
        return lambda x, w, b: F.relu(impl(x, normalized_shape, w, b, 1e-5).add_(residual), inplace=True)

    with lmrt.backend(backend), torch.autocast(DEVICE, enabled=case == "autocast"):
        check_against_torch(run(lmrt.ops.layer_norm), run(F.layer_norm), run(reference.layer_norm),
                            [x, weight, bias], torch.randn_like(x), ["input", "weight", "bias"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_output_is_a_view(backend):
    """No output of the custom ops, backward's included, is a view of a tensor made inside them (the kernels'
    (rows, columns) results): custom ops return tensors of their own."""
    x, weight, bias, normalized_shape = _inputs((2, 3, 8), 2, torch.float32)
    with lmrt.backend(backend):
        outputs = torch.ops.lmrt.layer_norm_fwd(x, list(normalized_shape), weight, bias, 1e-5)
        _, mean, rstd = outputs
        outputs += torch.ops.lmrt.layer_norm_bwd(torch.randn_like(x), x, list(normalized_shape), mean, rstd, weight,
                                                 bias, [True] * 3)
    assert [t._base is None for t in outputs] == [True] * 6
