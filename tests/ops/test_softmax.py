import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lmrt
from lmrt import reference
from tests.conftest import BACKENDS, DEVICE, DTYPES, MANY_ROWS, needs_cpp
from tests.streaming_stores import check_streamed_rows_match
from tests.tolerance import check_against_torch, check_compiled_matches_eager, forward_backward

OPS = {"softmax": (lmrt.ops.softmax, F.softmax, reference.softmax),
       "log_softmax": (lmrt.ops.log_softmax, F.log_softmax, reference.log_softmax)}
# (shape, dim): odd sizes, rows longer than one block (65537, 262144), 3-D and 4-D inputs, reductions over inner dims.
SHAPES = [((1, 1), -1), ((7, 97), -1), ((3, 781), -1), ((MANY_ROWS, 781), -1), ((2, 1, 65537), -1), ((2, 262144), -1),
          ((4, 9, 33), 1), ((4, 9, 33), 0), ((2, 3, 5, 24), -1), ((2, 3, 5, 24), 2)]


def _check(op, x, dim, backend, dtype=None):
    lmrt_fn, torch_fn, exact_fn = OPS[op]

    def run(impl, exact=False):
        # The exact run is float64 throughout; the others write `dtype` when given.
        return lambda x: impl(x, dim, dtype=None if exact else dtype)

    with lmrt.backend(backend):
        grad_output = torch.randn(x.shape, device=x.device, dtype=dtype or x.dtype)
        check_against_torch(run(lmrt_fn), run(torch_fn), run(exact_fn, exact=True), [x], grad_output, ["input"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", SHAPES, ids=str)
def test_matches_reference(shape, dim, dtype, op, backend):
    _check(op, torch.randn(shape, device=DEVICE, dtype=dtype) * 3, dim, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_strided_inputs(op, backend):
    transposed = torch.randn(97, 7, device=DEVICE).t()
    sliced = torch.randn(3, 781, device=DEVICE)[:, 100:600]
    permuted = torch.randn(5, 6, 7, device=DEVICE).permute(2, 0, 1)
    for x in (transposed, sliced, permuted):
        for dim in range(x.dim()):
            _check(op, x, dim, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_output_dtype_argument(dtype, op, backend):
    x = torch.randn(5, 130, device=DEVICE, dtype=torch.float16 if dtype == torch.float32 else torch.float32)
    _check(op, x, -1, backend, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_a_narrower_dtype_casts_the_input_first(op, backend):
    """As F.softmax: dtype=bfloat16 of float32 input is the softmax of the input rounded to bfloat16. Near 100 that
    rounding (up to 0.25, half of bfloat16's spacing there) moves the answer by dozens of bfloat16 ulps, so the result
    is held to half an ulp of the exact softmax of the rounded input (correct rounding), plus float32's few ulps in
    the computation. An op that rounded only its output is checked to miss that bound on most elements, so the test
    can fail."""
    lmrt_fn, torch_fn, _ = OPS[op]
    x = 100 + torch.randn(4, 33, device=DEVICE)
    with lmrt.backend(backend):
        got = lmrt_fn(x, -1, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    expected = torch_fn(x.to(torch.bfloat16).double(), -1)
    # half of bfloat16's ulp at each exact value (8 significant bits), and float32's error in the computation
    bound = 2.0 ** (torch.frexp(expected).exponent - 9) + 2.0**-20 * expected.abs()

    def outside(result):
        return ((result.double() - expected).abs() > bound).double().mean().item()

    assert outside(got) == 0, f"{outside(got):.0%} of the elements are more than half a bfloat16 ulp off"
    uncast = torch_fn(x.double(), -1).to(torch.bfloat16)  # the answer of an op that does not round its input
    assert outside(uncast) > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n_cols", [97, 65537], ids=str)
def test_infinities_follow_torch(n_cols, op, backend):
    """-inf entries give 0 (softmax) or -inf (log_softmax); a row of only -inf gives NaN, as in torch. So do the
    gradients, which PyTorch defines there too: 0 at a -inf entry for softmax, the output gradient itself for
    log_softmax (dx = dy - exp(y) sum(dy), exp(-inf) = 0), NaN over a row of only -inf."""
    x = torch.randn(4, n_cols, device=DEVICE)
    x[0] = float("-inf")
    x[1, : n_cols // 2 + 7] = float("-inf")  # the online pass starts on blocks of -inf only
    x[2, 1::3] = float("-inf")
    lmrt_fn, torch_fn, _ = OPS[op]
    grad_output = torch.randn_like(x)
    with lmrt.backend(backend):
        got = forward_backward(lambda x: lmrt_fn(x, -1), [x], grad_output)
    expected = forward_backward(lambda x: torch_fn(x, -1), [x], grad_output)
    for name, result, torch_result in zip(["output", "grad_input"], got, expected, strict=True):
        torch.testing.assert_close(result, torch_result, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")
    _check(op, x, -1, backend)  # and within the rule against the float64 reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_cols", [97, 32768], ids=str)
def test_a_nan_makes_its_row_nan(n_cols, dtype, op, backend):
    """A NaN makes its whole row NaN, as in torch, however the row max skips it: row 0 NaN in its first half (on
    CUDA two 8192-column tiles of the online pass that hold nothing else), row 1 -inf but for two finite values and
    a NaN (whose thread sees only -inf besides). The CUDA online pass skipped a thread's tiles while its max was
    -inf, and with them its NaN: those rows came out finite."""
    x = torch.randn(3, n_cols, device=DEVICE, dtype=dtype)
    x[0, : n_cols // 2] = math.nan
    x[1] = -math.inf
    x[1, 5], x[1, n_cols * 2 // 3] = 1.0, 2.0
    x[1, n_cols - 7] = math.nan
    lmrt_fn, torch_fn, _ = OPS[op]
    with lmrt.backend(backend):
        y = lmrt_fn(x, -1)
    assert y[:2].isnan().all() and y[2].isfinite().all()
    torch.testing.assert_close(y, torch_fn(x, -1), equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_cols", [781, 4097], ids=str)
def test_a_row_does_not_depend_on_the_other_rows(n_cols, dtype, op, backend):
    """Each row's output and gradient are the same bits in a call of many rows as in a call of that row alone,
    however the call's rows are split into tasks. The C++ backward sums a row in the loop that writes the row before
    it, for rows past two passes' width (4097; float32 softmax and every log-softmax), but the first row of a task on
    its own (any row, alone)."""
    x = torch.randn(MANY_ROWS, n_cols, device=DEVICE, dtype=dtype)
    grad_output = torch.randn_like(x)
    lmrt_fn = OPS[op][0]
    with lmrt.backend(backend):
        together = forward_backward(lambda x: lmrt_fn(x, -1), [x], grad_output)
        for row in (0, 1, MANY_ROWS // 2, MANY_ROWS - 1):
            alone = forward_backward(lambda x: lmrt_fn(x, -1), [x[row : row + 1]], grad_output[row : row + 1])
            for name, whole, single in zip(["output", "grad_input"], together, alone, strict=True):
                assert torch.equal(whole[row : row + 1], single), f"{name} of row {row}"


@needs_cpp
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype,out_dtype", [(t, None) for t in DTYPES] + [(torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("n_cols", [781, 4096, 4097], ids=str)
def test_streaming_stores_write_the_same_bits(n_cols, dtype, out_dtype, op):
    """The C++ forward and backward of a call that outgrows the cache write y's and dx's rows that start aligned
    with streaming stores (one row in 8 to 32 at 781 and 4097 columns, every row at 4096; the backward in two passes
    per row at 781, at 4097 the fused loop but for float16 and bfloat16 softmax; float32 softmax's exponentials kept
    apart from y, bfloat16 input's too when `dtype=torch.float32` asks for a float32 y): the same bits as plain
    stores'."""
    lmrt_fn = OPS[op][0]
    check_streamed_rows_match(lambda x: lmrt_fn(x, -1, dtype=out_dtype), n_cols, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_cols", [781, 65537], ids=str)
def test_large_values_do_not_overflow(n_cols, dtype, op, backend):
    x = torch.randn(3, n_cols, device=DEVICE, dtype=dtype) * 1e4
    _check(op, x, -1, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n_cols", [781, 4097], ids=str)
def test_large_logits_keep_gradients_accurate(n_cols, op, backend):
    """Logits in the hundreds whose softmax is not one-hot: log-softmax must form y = (x - max) - log(sum), exact
    near the maximum, since its gradient dy - exp(y) sum(dy) multiplies y's error there by sum(dy)."""
    x = torch.randn(12, n_cols, device=DEVICE) * 100
    _check(op, x, -1, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_scalar_inputs(backend):
    with lmrt.backend(backend):
        x = torch.randn(0, 5, device=DEVICE, requires_grad=True)
        lmrt.ops.softmax(x, -1).sum().backward()
        assert x.grad.shape == (0, 5)
        for dim in (0, 1):  # over the empty dim too, as F.softmax does
            y = torch.randn(3, 0, 4, device=DEVICE, requires_grad=True)
            lmrt.ops.log_softmax(y, dim).sum().backward()
            assert lmrt.ops.softmax(y, dim).shape == (3, 0, 4) and y.grad.shape == (3, 0, 4)
        scalar = torch.tensor(3.0, device=DEVICE)
        torch.testing.assert_close(lmrt.ops.softmax(scalar, 0), F.softmax(scalar, 0))
    for reference_op in (reference.softmax, reference.log_softmax):  # the tests' exact answers take them too
        reference_op(x, -1).sum().backward()
        torch.testing.assert_close(lmrt.ops.log_softmax(scalar, -1), F.log_softmax(scalar, -1))


@pytest.mark.parametrize("op", OPS)
def test_same_call_as_torch(op, monkeypatch):
    """F's signature, (input, dim, _stacklevel, dtype): the third positional argument was taken as `dtype`, and
    torch.nn.Softmax, which passes `_stacklevel=5`, failed on lmrt's op swapped in for F's. Any integer PyTorch takes
    is a dim."""
    lmrt_fn, torch_fn, _ = OPS[op]
    assert list(inspect.signature(lmrt_fn).parameters) == list(inspect.signature(torch_fn).parameters)
    x = torch.randn(3, 4, 5, device=DEVICE)
    half = x.bfloat16()
    torch.testing.assert_close(lmrt_fn(half, 1, 3, torch.float32), torch_fn(half, 1, 3, torch.float32))
    for dim in (np.int64(1), torch.tensor(1)):
        torch.testing.assert_close(lmrt_fn(x, dim), torch_fn(x, 1))
    module = {"softmax": torch.nn.Softmax, "log_softmax": torch.nn.LogSoftmax}[op](dim=1)
    expected = module(x)
    monkeypatch.setattr(F, op, lmrt_fn)
    torch.testing.assert_close(module(x), expected)


def test_module():
    x = torch.randn(3, 4, 5, device=DEVICE)
    torch.testing.assert_close(lmrt.nn.Softmax(dim=1)(x), torch.nn.Softmax(dim=1)(x))
    with pytest.raises(ValueError, match="`dim` must be given"):
        lmrt.nn.Softmax()(x)


class TestBadInput:
    def test_integer_input(self):
        with pytest.raises(TypeError, match="lmrt.ops.softmax: `input` must be a floating-point tensor"):
            lmrt.ops.softmax(torch.ones(2, 3, dtype=torch.long), -1)

    def test_dim_out_of_range(self):
        with pytest.raises(IndexError, match=r"lmrt.ops.log_softmax: `dim` must be an int in \[-2, 1\].*got 2"):
            lmrt.ops.log_softmax(torch.randn(2, 3), 2)

    @pytest.mark.parametrize("op", OPS)
    def test_no_dim(self, op):
        with pytest.raises(ValueError, match=f"lmrt.ops.{op}: `dim` must be given"):
            OPS[op][0](torch.randn(2, 3))

    def test_integer_output_dtype(self):
        with pytest.raises(TypeError, match="`dtype` must be a floating-point dtype"):
            lmrt.ops.softmax(torch.randn(2, 3), -1, dtype=torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True])
def test_opcheck(log, backend):
    x = torch.randn(4, 6, 7, device=DEVICE)
    with lmrt.backend(backend):
        torch.library.opcheck(torch.ops.lmrt.softmax_fwd.default, (x.clone().requires_grad_(), 1, torch.float32, log))
        y = torch.ops.lmrt.softmax_fwd(x, 1, torch.float32, log)
        torch.library.opcheck(torch.ops.lmrt.softmax_bwd.default, (torch.randn_like(x), y, 1, log, torch.float32))


@pytest.mark.parametrize("op", OPS)
def test_compiles_without_graph_breaks(op):
    lmrt_fn = OPS[op][0]
    x = torch.randn(6, 48, device=DEVICE)

    def step(x):
        return (lmrt_fn(x, -1) * torch.arange(48, device=x.device)).sum()

    check_compiled_matches_eager(step, (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("autocast", [False, True], ids=["no_autocast", "autocast"])
@pytest.mark.parametrize("shape,dim", [((4, 8), -1), ((2, 3, 8), -1), ((2, 3, 8), 1)], ids=str)
def test_output_modified_in_place_as_torch(shape, dim, autocast, op, backend):
    """F.softmax's backward needs its output, so modifying that in place makes the backward raise (autograd's
    version check); lmrt's raises the same error at the same point. It raised at the in-place op instead where the
    custom op returned a view of the kernels' output (triton; cpp under autocast with `dim` last), which autograd
    refuses to modify in place."""
    lmrt_fn, torch_fn, _ = OPS[op]
    for fn in (torch_fn, lmrt_fn):
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        with lmrt.backend(backend), torch.autocast(DEVICE, enabled=autocast):
            y = fn(x, dim)
            y.mul_(2)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim", [2, 1])
def test_no_output_is_a_view(dim, log, backend):
    """No output of the custom ops, backward's included, is a view of a tensor made inside them (the kernels'
    results in their own layout): custom ops return tensors of their own."""
    x = torch.randn(2, 3, 8, device=DEVICE)
    with lmrt.backend(backend):
        y = torch.ops.lmrt.softmax_fwd(x, dim, torch.float32, log)
        dx = torch.ops.lmrt.softmax_bwd(torch.randn_like(x), y, dim, log, torch.float32)
    assert y._base is None and dx._base is None
