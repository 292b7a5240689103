"""The eager path of the extension backends: on cpp (CPU) or cuda (GPU), lmrt.ops.layer_norm, rms_norm, softmax,
log_softmax and scaled_dot_product_attention call the extension's differentiable operators (torch.ops.lmrt_C.<op>,
csrc/autograd.cpp) instead of the custom ops lmrt::<op>_fwd that torch.compile sees. Both run the same kernels on
the same layouts, so their outputs and gradients must be bitwise equal; the op tests (test_<op>.py) hold the results
to the reference."""

import contextlib

import pytest
import torch

import lmrt
from tests.conftest import DEVICE, DTYPES

BACKEND = "cuda" if DEVICE == "cuda" else "cpp"
pytestmark = pytest.mark.skipif(lmrt.backends.unavailable_reason(BACKEND, DEVICE) is not None,
                                reason=f"backend {BACKEND}: {lmrt.backends.unavailable_reason(BACKEND, DEVICE)}")


def _outputs_and_grads(fn, inputs, grad_output):
    """fn(*inputs) and the gradients of every input that requires grad (None for the others)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    with lmrt.backend(BACKEND):
        out = fn(*leaves)
        differentiable = [t for t in leaves if t is not None and t.requires_grad]
        grads = torch.autograd.grad(out, differentiable, grad_output) if differentiable else ()
    return out, grads


def _check_paths_agree(public_op, custom_op, inputs, grad_node):
    """`public_op` (the eager path) and `custom_op` (the compiled path) give bitwise equal outputs and gradients,
    and the eager path's backward is the extension's Function `grad_node`."""
    with lmrt.backend(BACKEND):
        eager_out = public_op(*inputs)
    if any(t is not None and t.requires_grad for t in inputs):
        assert grad_node in eager_out.grad_fn.name()
    grad_output = torch.randn_like(eager_out)
    eager, eager_grads = _outputs_and_grads(public_op, inputs, grad_output)
    compiled, compiled_grads = _outputs_and_grads(custom_op, inputs, grad_output)
    assert torch.equal(eager, compiled)
    assert eager.dtype == compiled.dtype and eager.shape == compiled.shape
    for a, b in zip(eager_grads, compiled_grads, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def _tensor(shape, dtype, requires_grad=True, present=True):
    return torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(requires_grad) if present else None


# (input shape, normalized trailing dims, weight requires grad, bias requires grad, input requires grad)
NORM_CASES = [((7, 97), 1, True, True, True), ((2, 3, 5, 24), 2, True, True, True), ((3, 781), 1, True, False, True),
              ((4, 33), 1, False, True, False), ((4, 33), 1, True, True, False), ((5, 64), 1, False, False, True),
              ((0, 16), 1, True, True, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NORM_CASES, ids=str)
@pytest.mark.parametrize("bias_present", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("weight_present", [True, False], ids=["weight", "no_weight"])
def test_layer_norm(case, dtype, weight_present, bias_present):
    shape, ndim, weight_grad, bias_grad, input_grad = case
    normalized_shape = shape[len(shape) - ndim :]
    x = _tensor(shape, dtype, input_grad)
    weight = _tensor(normalized_shape, dtype, weight_grad, weight_present)
    bias = _tensor(normalized_shape, dtype, bias_grad, bias_present)
    _check_paths_agree(lambda x, w, b: lmrt.ops.layer_norm(x, normalized_shape, w, b, 1e-5),
                       lambda x, w, b: torch.ops.lmrt.layer_norm_fwd(x, normalized_shape, w, b, 1e-5)[0],
                       [x, weight, bias], "LmrtLayerNormBackward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NORM_CASES, ids=str)
@pytest.mark.parametrize("weight_present", [True, False], ids=["weight", "no_weight"])
def test_rms_norm(case, dtype, weight_present):
    shape, ndim, weight_grad, _, input_grad = case
    normalized_shape = shape[len(shape) - ndim :]
    x = _tensor(shape, dtype, input_grad)
    weight = _tensor(normalized_shape, dtype, weight_grad, weight_present)
    _check_paths_agree(lambda x, w: lmrt.ops.rms_norm(x, normalized_shape, w, 1e-6),
                       lambda x, w: torch.ops.lmrt.rms_norm_fwd(x, normalized_shape, w, 1e-6)[0],
                       [x, weight], "LmrtRmsNormBackward")


@pytest.mark.parametrize("out_dtype", [None, torch.float32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", [((7, 97), -1), ((3, 5, 33), 0), ((3, 5, 33), 1), ((4, 0), 1)], ids=str)
def test_softmax(shape, dim, log, dtype, out_dtype):
    public = lmrt.ops.log_softmax if log else lmrt.ops.softmax
    _check_paths_agree(lambda x: public(x, dim, dtype=out_dtype),
                       lambda x: torch.ops.lmrt.softmax_fwd(x, dim % x.dim(), out_dtype or x.dtype, log),
                       [_tensor(shape, dtype)], "LmrtSoftmaxBackward")


def test_strided_inputs_and_inference_mode():
    transposed = torch.randn(97, 7, device=DEVICE).t().requires_grad_()
    weight = torch.randn(97, device=DEVICE, requires_grad=True)
    _check_paths_agree(lambda x, w: lmrt.ops.layer_norm(x, (97,), w),
                       lambda x, w: torch.ops.lmrt.layer_norm_fwd(x, (97,), w, None, 1e-5)[0],
                       [transposed, weight], "LmrtLayerNormBackward")
    _check_paths_agree(lambda x: lmrt.ops.softmax(x, 0), lambda x: torch.ops.lmrt.softmax_fwd(x, 0, x.dtype, False),
                       [transposed], "LmrtSoftmaxBackward")
    x = torch.randn(5, 97, device=DEVICE)
    with torch.inference_mode(), lmrt.backend(BACKEND):
        assert torch.equal(lmrt.ops.rms_norm(x, (97,), weight.detach(), 1e-6),
                           torch.ops.lmrt.rms_norm_fwd(x, (97,), weight.detach(), 1e-6)[0])


# The eager calls of lmrt._C (csrc/eager_calls.cpp) run a common call in one C call and return None for any other,
# which the Python path then serves, with its checks, fallbacks and error messages.
class _Subclass(torch.Tensor):
    pass


class _Mode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _norm_call(choice=BACKEND, x=None, shape=(8,), weight=None, bias=None, eps=1e-5):
    x = torch.randn(3, 8, device=DEVICE) if x is None else x
    return lmrt._C.layer_norm(choice, x, shape, weight, bias, eps)


@pytest.mark.skipif(not lmrt.backends.extension_status()[0], reason="lmrt._C is not built")
def test_eager_calls_serve_only_calls_the_extension_serves(monkeypatch):
    monkeypatch.delenv("LMRT_BACKEND", raising=False)
    x = torch.randn(3, 8, device=DEVICE)
    assert isinstance(_norm_call(), torch.Tensor)
    assert isinstance(lmrt._C.rms_norm(BACKEND, x, 8, None, None), torch.Tensor)
    assert isinstance(lmrt._C.softmax(BACKEND, x, -1, torch.float32, True), torch.Tensor)
    assert (_norm_call(None) is None) == (DEVICE == "cuda")  # the default order: cpp first on CPUs, triton on GPUs
    for choice in ("torch", "triton", "cuda" if DEVICE == "cpu" else "cpp"):
        assert _norm_call(choice) is None
    monkeypatch.setenv("LMRT_BACKEND", "torch")
    assert _norm_call(None) is None
    assert isinstance(_norm_call(BACKEND), torch.Tensor)  # lmrt.backend(name) wins over LMRT_BACKEND


@pytest.mark.parametrize("choice", [None, "cpp", "torch"])
def test_meta_tensors_give_meta_outputs(choice):
    """Shape inference, and models built under torch.device("meta"): each op gives a meta output, as F does. The
    eager call asked autocast about the meta device, which throws for it, so every op raised whatever the backend."""
    x = torch.randn(4, 8, device="meta")
    q = x[None, None]
    with contextlib.nullcontext() if choice is None else lmrt.backend(choice):
        outputs = [lmrt.ops.layer_norm(x, (8,)), lmrt.ops.rms_norm(x, (8,)), lmrt.ops.softmax(x, -1),
                   lmrt.ops.scaled_dot_product_attention(q, q, q)]
    assert [(t.device.type, t.shape) for t in outputs] == [("meta", x.shape)] * 3 + [("meta", q.shape)]


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("normalized_shape", [[5], [], [3, 7, 1], [1, 7]], ids=str)
def test_extension_norms_check_normalized_shape(op, normalized_shape):
    """torch.ops.lmrt_C's norms, called directly: they read only the length of `normalized_shape`, so (5,) on a
    (3, 7) input normalized the rows of 7, and () each element alone."""
    x = torch.randn(3, 7, device=DEVICE)
    extra = (None, None, 1e-5) if op == "layer_norm" else (None, 1e-5)
    with pytest.raises(RuntimeError, match=r"`normalized_shape` must be the last dims of the input's shape \[3, 7\]"):
        getattr(torch.ops.lmrt_C, op)(x, normalized_shape, *extra)
    torch.testing.assert_close(getattr(torch.ops.lmrt_C, op)(x, [3, 7], *extra),
                               getattr(torch.nn.functional, op)(x, [3, 7], *extra))


@pytest.mark.skipif(not lmrt.backends.extension_status()[0], reason="lmrt._C is not built")
def test_eager_calls_leave_other_calls_to_python():
    x = torch.randn(3, 8, device=DEVICE)
    weight = torch.randn(8, device=DEVICE)
    declined = [
        _norm_call(x=x.double()), _norm_call(x=x.as_subclass(_Subclass)), _norm_call(shape=(4,)),
        _norm_call(shape=(3, 8, 1)), _norm_call(shape=[torch.tensor(8)]), _norm_call(weight=weight[:4]),
        _norm_call(weight=weight.double()), _norm_call(bias=weight.to(torch.int32)), _norm_call(eps="1e-5"),
        lmrt._C.rms_norm(BACKEND, x, 8, weight, "small"),
        lmrt._C.softmax(BACKEND, x[0, 0], 0, None, False), lmrt._C.softmax(BACKEND, x, 2, None, False),
        lmrt._C.softmax(BACKEND, x, -3, None, False), lmrt._C.softmax(BACKEND, x, 1, torch.float64, False),
        lmrt._C.softmax(BACKEND, x, 1.0, None, False),
    ]
    assert all(output is None for output in declined)
    with _Mode():
        assert _norm_call() is None
    with pytest.raises(TypeError, match="expected 6 positional arguments, got 2"):
        lmrt._C.layer_norm(BACKEND, x)
    # The calls it declines still run, on the Python path, and a subclass keeps its type as with torch's own ops.
    with lmrt.backend(BACKEND):
        out = lmrt.ops.layer_norm(x.as_subclass(_Subclass), (8,))
    assert type(out) is _Subclass and torch.equal(out.as_subclass(torch.Tensor), _norm_call(x=x))


def _attention_inputs(dtype, heads=(4, 4), q_len=5, k_len=7, head_dims=(16, 16), batch=2, requires_grad=True):
    q = _tensor((batch, heads[0], q_len, head_dims[0]), dtype, requires_grad)
    k = _tensor((batch, heads[1], k_len, head_dims[0]), dtype, requires_grad)
    v = _tensor((batch, heads[1], k_len, head_dims[1]), dtype, requires_grad)
    return q, k, v


# (query and key/value heads, q_len, k_len, head dims of q/k and v, causal, mask: None, "bool" or "float")
ATTENTION_CASES = [((4, 4), 5, 7, (16, 16), False, None), ((4, 4), 9, 9, (24, 40), True, None),
                   ((4, 2), 6, 11, (16, 16), True, None), ((4, 1), 1, 13, (32, 32), False, None),
                   ((2, 2), 7, 5, (16, 8), False, "bool"), ((2, 2), 4, 6, (16, 16), True, "float")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_attention(case, dtype):
    heads, q_len, k_len, head_dims, causal, mask_kind = case
    q, k, v = _attention_inputs(dtype, heads, q_len, k_len, head_dims)
    batch = q.shape[0]
    mask = None
    if mask_kind == "bool":  # a key-padding mask, broadcast over heads and queries
        mask = torch.rand(batch, 1, 1, k_len, device=DEVICE) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(heads[0], q_len, k_len, device=DEVICE, dtype=dtype)
    gqa = heads[0] != heads[1]
    scale = 1 / head_dims[0] ** 0.5
    expanded = None if mask is None else mask.expand(batch, heads[0], q_len, k_len)
    _check_paths_agree(
        lambda q, k, v: lmrt.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                              enable_gqa=gqa),
        lambda q, k, v: torch.ops.lmrt.attention_fwd(q, k, v, expanded, None, None, q_len, k_len, 0.0, None, causal,
                                                     False, scale, True)[0],
        [q, k, v], "LmrtAttentionBackward")


def test_attention_on_transposed_views():
    # (batch, rows, heads, dim) tensors viewed heads-first, as lmrt.nn.MultiheadAttention passes them.
    q, k, v = (torch.randn(2, 6, 3, 16, device=DEVICE).transpose(1, 2).requires_grad_() for _ in range(3))
    _check_paths_agree(
        lambda q, k, v: lmrt.ops.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3),
        lambda q, k, v: torch.ops.lmrt.attention_fwd(q, k, v, None, None, None, 6, 6, 0.0, None, True, False, 0.3,
                                                     True)[0],
        [q, k, v], "LmrtAttentionBackward")


@pytest.mark.skipif(not lmrt.backends.extension_status()[0], reason="lmrt._C is not built")
def test_attention_eager_call_leaves_other_calls_to_python():
    q, k, v = _attention_inputs(torch.float32, heads=(4, 2))

    def call(q=q, k=k, v=v, mask=None, dropout_p=0.0, causal=False, scale=None, gqa=True, choice=BACKEND):
        return lmrt._C.attention(choice, q, k, v, mask, dropout_p, causal, scale, gqa)

    assert isinstance(call(), torch.Tensor) and isinstance(call(dropout_p=0, scale=1), torch.Tensor)
    float_mask = torch.zeros(5, 7, device=DEVICE)
    declined = [
        call(gqa=False), call(dropout_p=0.1), call(mask=float_mask.requires_grad_()), call(q=q[0]),
        call(k=k[:1], v=v[:1]), call(k=k.double(), v=v.double()), call(q=q[:, :1], gqa=False),
        call(k=k[:, :1].expand(-1, 3, -1, -1), v=v[:, :1].expand(-1, 3, -1, -1)), call(v=v[:, :, :6]),
        call(k=k[..., :8]), call(mask=torch.ones(5, 6, device=DEVICE, dtype=torch.bool)),
        call(mask=torch.ones(5, 7, device=DEVICE, dtype=torch.int32)), call(causal=1), call(scale="0.1"),
        call(choice="torch"),
    ]
    assert all(output is None for output in declined)
    with _Mode():
        assert call() is None
    # A declined call still runs, on the Python path: here a query head broadcast over the key heads.
    with lmrt.backend(BACKEND):
        single = lmrt.ops.scaled_dot_product_attention(q[:, :1], k, v)
    assert torch.allclose(single, torch.nn.functional.scaled_dot_product_attention(q[:, :1].expand(-1, 2, -1, -1),
                                                                                   k, v), atol=1e-5)


def _eager_ops():
    """(name, the eager call on a (3, 8) float32 input x, its backward node's name)."""
    weight = torch.randn(8, device=DEVICE, requires_grad=True)
    q, k, v = _attention_inputs(torch.float32, heads=(2, 2), q_len=3, k_len=3, head_dims=(8, 8), batch=1)
    return [("layer_norm", lambda x: lmrt.ops.layer_norm(x, (8,), weight), "LmrtLayerNormBackward"),
            ("rms_norm", lambda x: lmrt.ops.rms_norm(x, (8,), weight), "LmrtRmsNormBackward"),
            ("softmax", lambda x: lmrt.ops.softmax(x, -1), "LmrtSoftmaxBackward"),
            ("attention", lambda x: lmrt.ops.scaled_dot_product_attention(x.view(1, 1, 3, 8).expand(1, 2, 3, 8), k,
                                                                          v), "LmrtAttentionBackward")]


@pytest.mark.parametrize("op", _eager_ops(), ids=lambda op: op[0])
def test_eager_nodes_keep_autograd_semantics(op):
    name, fn, node = op
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    with lmrt.backend(BACKEND):
        out = fn(x)
        assert out.grad_fn.name() == node
        out.sum().backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            out.sum().backward()  # the saved tensors were freed by the first backward
        out = fn(x * 1)
        grad_input = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
        assert torch.equal(torch.autograd.grad(out.sum(), x)[0], grad_input)  # retain_graph kept them
        y = x * 1
        out = fn(y)
        (out if name == "softmax" else y).add_(1)  # modifies a tensor the backward needs (softmax's: its output)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            out = fn(x)
        assert packed and torch.equal(torch.autograd.grad(out.sum(), x)[0], grad_input)
        with torch.no_grad():
            assert fn(x).grad_fn is None


@pytest.mark.parametrize("op", _eager_ops(), ids=lambda op: op[0])
def test_eager_nodes_refuse_forward_mode_ad(op):
    name, fn, _ = op
    import torch.autograd.forward_ad as fwAD

    with lmrt.backend(BACKEND), fwAD.dual_level():
        dual = fwAD.make_dual(torch.randn(3, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE))
        with pytest.raises(RuntimeError, match=f"lmrt_C::{name}: forward-mode AD is not supported"):
            fn(dual)


@pytest.mark.parametrize("op", _eager_ops(), ids=lambda op: op[0])
def test_eager_nodes_refuse_double_backward(op):
    """Higher-order gradients (a gradient penalty, say) raise rather than come out silently wrong: the kernels'
    gradients have no graph of their own. A backward with create_graph=True is refused, torch.func.grad's too, with a
    message that names it; one without still runs."""
    name, fn, _ = op
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    with lmrt.backend(BACKEND):
        out = fn(x)
        with pytest.raises(RuntimeError, match=f"lmrt_C::{name}: no double backward"):
            torch.autograd.grad(out.pow(3).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="under torch.func.grad"):  # whose backward builds a graph
            torch.func.grad(lambda x: fn(x).pow(3).sum())(x.detach())
        torch.autograd.grad(fn(x).pow(3).sum(), x)
