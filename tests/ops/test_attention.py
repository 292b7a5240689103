"""lmrt's attention ops against the float64 reference, flash-attention style.

Each case compares a backend with the exact answer (lmrt.reference in float64) and with PyTorch's own computation
in the inputs' dtype (the matmuls in that dtype, the softmax in float32, as flash-attention's `attention_ref`
with upcast=False): the output's error may be at most 2x PyTorch's, each gradient's at most 3x, plus 4 ulps and
tests.tolerance.attention_floor (the kernels exponentiate in base 2, and from the log-sum-exp).
Small shapes run everywhere (the Triton interpreter on the CPU); the `cuda` grid runs long sequences on a GPU.
"""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lmrt
from lmrt import backends, reference
from lmrt.ops._dispatch import extension_ops
from lmrt.ops.attention import draw_seed
from tests.conftest import BACKENDS, DEVICE, DTYPES, EXTENSION_BACKENDS
from tests.tolerance import (
    LARGEST_EXACT_SCORE,
    assert_within_torch_error,
    attention_floor,
    attention_scores,
    check_against_torch,
    check_compiled_matches_eager,
    forward_backward,
)

# (batch, query heads, key/value heads, Lq, Lk, head dim): lengths that are no multiple of a block, query and
# key lengths that differ both ways, head dims that are no power of two, grouped- and multi-query heads.
SHAPES = [(1, 1, 1, 1, 1, 16), (2, 2, 2, 17, 203, 40), (1, 2, 1, 113, 17, 59), (1, 4, 2, 37, 37, 80),
          (1, 1, 1, 33, 70, 96), (1, 3, 3, 21, 45, 111), (1, 2, 2, 19, 30, 160), (1, 1, 1, 24, 40, 256)]
GPU_SHAPES = [(2, 4, 4, 1023, 1024, 64), (1, 8, 2, 1024, 1023, 128), (2, 4, 1, 113, 2048, 80),
              (1, 2, 2, 2049, 512, 256), (4, 6, 3, 257, 257, 59), (1, 4, 4, 4096, 4096, 128)]


def attention_in_dtype(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, bottom_right=False,
                       dropout_mask=None):
    """PyTorch's computation in the inputs' dtype: q k^T and p v as matmuls in the dtype, softmax in float32."""
    scale = reference.default_scale(q.shape[-1]) if scale is None else scale
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    s = ((q @ k.transpose(-1, -2)) * scale).float()
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask.float()
    if is_causal:
        rows, keys = s.shape[-2:]
        visible = torch.ones(rows, keys, dtype=torch.bool, device=q.device).tril(keys - rows if bottom_right else 0)
        s = s.masked_fill(~visible, -math.inf)
    empty = (s == -math.inf).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    if dropout_mask is not None:
        p = p * dropout_mask / (1 - dropout_p)
    return p.to(v.dtype) @ v


def flash_attn_in_dtype(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, dropout_mask=None):
    """attention_in_dtype on flash-attn's (batch, L, heads, dim) layout with bottom-right causality."""
    out = attention_in_dtype(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, dropout_p, causal,
                             softmax_scale, bottom_right=True, dropout_mask=dropout_mask)
    return out.transpose(1, 2)


def _qkv(batch, heads, kv_heads, rows, keys, head_dim, dtype, head_dim_v=None, scale=1.0):
    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype) * scale

    return (randn(batch, heads, rows, head_dim), randn(batch, kv_heads, keys, head_dim),
            randn(batch, kv_heads, keys, head_dim_v or head_dim))


def _skip_without_full_attention(backend, feature):
    if backend in EXTENSION_BACKENDS:
        pytest.skip(f"the {backend} backend has no {feature} (test_extension_backends_refuse_what_they_lack)")


def _backends_among(names):
    """The BACKENDS parameters (with their skip marks) of the backends in `names`."""
    return [b for b in BACKENDS if getattr(b, "values", [b])[0] in names]


def one_hot_grad_scales(q, k, v, grad_out, scale=None, is_causal=False):
    """The scales at which the query's and key's gradient floors are taken (tests/tolerance.py) when every row's
    softmax is one-hot (one key, or scores far apart). The exact gradients vanish there, as P does not move with the
    scores, but every implementation forms dS = P (dP - D) with dP = dO.v and D = dO.O: equal, but for the roundings
    of two sums of products of magnitude |dO|.|v|. So dq = scale dS k and dk = scale dS^T q are sums of terms of
    magnitude T = P (|dO| |v|^T + |dO|.|O|) times |k| or |q|: the scales are max scale T |k| and max scale T^T |q|.
    q, k, v are (..., heads, length, dim) with as many heads; causality top-left, as F.sdpa's."""
    q, k, v, grad_out = (t.double() for t in (q, k, v, grad_out))
    scale = reference.default_scale(q.shape[-1]) if scale is None else scale
    p = attention_scores(q, k, scale, is_causal=is_causal).softmax(-1)
    out = p @ v
    terms = p * (grad_out.abs() @ v.abs().transpose(-1, -2) + (grad_out * out).abs().sum(-1, keepdim=True))
    return {"query": scale * (terms @ k.abs()).max().item(),
            "key": scale * (terms.transpose(-1, -2) @ q.abs()).max().item()}


def inexact_gradient_rows(q, k, scale=None, attn_mask=None, is_causal=False):
    """The query rows (batch, heads, Lq) whose largest visible score is finite but at least LARGEST_EXACT_SCORE in
    size (a mask of the dtype's minimum over the whole row, say), for which the kernels' gradients are inexact by
    design (README): the tests give them no output gradient, and check their outputs. Causality top-left."""
    row_max = attention_scores(q, k, scale, attn_mask, is_causal).amax(-1)
    return row_max.isfinite() & (row_max.abs() >= LARGEST_EXACT_SCORE)


def _check_sdpa(backend, q, k, v, attn_mask=None, one_hot_rows=False, **kwargs):
    """The rule of tests/tolerance.py on every backend, with no output gradient in inexact_gradient_rows;
    `one_hot_rows` where every row's softmax is one-hot (no mask): the query's and key's gradients vanish, their
    floors are taken at one_hot_grad_scales, and attention_floor is left out, as such a row's lse is its maximum plus
    log 1 (measured: at most 0.7 float32 ulps at those scales)."""
    if backend == "cuda" and extension_ops().cuda_attention_unsupported(q, k, v):
        # Chosen explicitly, the backend refuses with the reason; the default order passes such calls to triton.
        with lmrt.backend(backend), pytest.raises(RuntimeError, match="CUDA attention kernels take head dims"):
            lmrt.ops.scaled_dot_product_attention(q, k, v, attn_mask, enable_gqa=True, **kwargs)
        return
    # The extension's kernels give no gradient for a float mask: there it is a constant, not an input.
    constant_mask = backend in EXTENSION_BACKENDS

    def lmrt_fn(q, k, v, mask=attn_mask):
        return lmrt.ops.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, **kwargs)

    def exact_fn(q, k, v, mask=attn_mask):
        return reference.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, **kwargs)

    def torch_fn(q, k, v, mask=attn_mask):
        return attention_in_dtype(q, k, v, mask, **kwargs)

    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)
    grad_out[inexact_gradient_rows(q, k, kwargs.get("scale"), attn_mask, kwargs.get("is_causal", False))] = 0.0
    tensors, names = [q, k, v, attn_mask], ["query", "key", "value", "attn_mask"]
    floor = attention_floor(q, k, kwargs.get("scale"), attn_mask)
    grad_scales = None
    if one_hot_rows:
        floor, grad_scales = 0.0, one_hot_grad_scales(q, k, v, grad_out, kwargs.get("scale"),
                                                        kwargs.get("is_causal", False))
    with lmrt.backend(backend):
        check_against_torch(lmrt_fn, torch_fn, exact_fn, tensors[:3] if constant_mask else tensors, grad_out,
                            names[:3] if constant_mask else names, grad_factor=3.0, floor=floor,
                            grad_scales=grad_scales)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sdpa_matches_reference(shape, dtype, causal, backend):
    # With one key, P = 1 whatever the scores: the query's and key's exact gradients vanish.
    _check_sdpa(backend, *_qkv(*shape, dtype), is_causal=causal, one_hot_rows=shape[4] == 1)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_511_queries_against_512_keys(causal):
    """Lengths one short of a block multiple, over several blocks of queries and keys, on every device (10-15 s on the
    interpreter; GPU_SHAPES has 1023 against 1024)."""
    _check_sdpa("triton", *_qkv(1, 1, 1, 511, 512, 64, torch.float16), is_causal=causal)


@pytest.mark.parametrize("backend", _backends_among(("cpp",)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 1, 70, 1100, 64), (1, 2, 2, 67, 1037, 59)], ids=str)
def test_sdpa_over_several_cpu_key_blocks(shape, dtype, causal, backend):
    """The C++ CPU kernel walks keys 512 at a time (the small shapes fit in one block): two whole blocks and an odd
    tail, queries fewer than keys, so that causality ends inside a block, an odd head dim and a key-padding mask."""
    _check_sdpa(backend, *_qkv(*shape, dtype), is_causal=causal)
    q, k, v = _qkv(*shape, dtype)
    _check_sdpa(backend, q, k, v, attn_mask=torch.arange(shape[4], device=DEVICE) < shape[4] - 300)


@pytest.mark.parametrize("backend", _backends_among(("cpp",)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_bfloat16_without_onednn(causal, backend, monkeypatch):
    """With oneDNN off (torch.backends.mkldnn), ATen's brgemm has no bfloat16 kernel, and the C++ kernel multiplies
    bfloat16 inputs in float32, as on CPUs without bfloat16 arithmetic; on CPUs with it, the other tests check the
    bfloat16 products."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    _check_sdpa(backend, *_qkv(1, 2, 1, 70, 1100, 64, torch.bfloat16), is_causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _backends_among(("triton", "cuda")))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_sdpa_matches_reference_long(shape, dtype, causal, backend):
    _check_sdpa(backend, *_qkv(*shape, dtype), is_causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softmax_scale", [None, 0.37], ids=["default_scale", "scale_0.37"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,keys", [(5, 37), (37, 5), (33, 33)], ids=str)
def test_flash_attn_func_bottom_right(rows, keys, dtype, causal, softmax_scale, backend):
    q, k, v = (t.transpose(1, 2) for t in _qkv(2, 4, 2, rows, keys, 64, dtype))
    kwargs = {"softmax_scale": softmax_scale, "causal": causal}
    with lmrt.backend(backend):
        check_against_torch(lambda q, k, v: lmrt.ops.flash_attn_func(q, k, v, **kwargs),
                            lambda q, k, v: flash_attn_in_dtype(q, k, v, **kwargs),
                            lambda q, k, v: reference.flash_attn_func(q, k, v, **kwargs),
                            [q, k, v], torch.randn_like(q), ["q", "k", "v"], grad_factor=3.0,
                            floor=attention_floor(q.transpose(1, 2), k.transpose(1, 2), softmax_scale))
    assert lmrt.ops.flash_attn_func(q, k, v).is_contiguous()  # (batch, L, heads, dim), as flash-attn returns


def _packed(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype):
    q = torch.randn(sum(lengths_q), heads, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(sum(lengths_k), kv_heads, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(sum(lengths_k), kv_heads, head_dim, device=DEVICE, dtype=dtype)

    def offsets(lengths):
        return torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)

    return q, k, v, offsets(lengths_q), offsets(lengths_k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softmax_scale", [None, 0.37], ids=["default_scale", "scale_0.37"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flash_attn_varlen_func(dtype, causal, softmax_scale, backend):
    _skip_without_full_attention(backend, "packed sequences")
    lengths_q, lengths_k = [1, 17, 0, 40, 5], [3, 17, 9, 33, 0]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 4, 2, 40, dtype)
    packed = (cu_q, cu_k, max(lengths_q), max(lengths_k))
    kwargs = {"softmax_scale": softmax_scale, "causal": causal}

    def torch_fn(q, k, v):
        return torch.cat([flash_attn_in_dtype(q[None, a:b], k[None, c:d], v[None, c:d], **kwargs)[0]
                          for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], strict=True)])

    with lmrt.backend(backend):
        check_against_torch(lambda q, k, v: lmrt.ops.flash_attn_varlen_func(q, k, v, *packed, **kwargs),
                            torch_fn,
                            lambda q, k, v: reference.flash_attn_varlen_func(q, k, v, *packed, **kwargs),
                            [q, k, v], torch.randn_like(q), ["q", "k", "v"], grad_factor=3.0,
                            floor=attention_floor(q.transpose(0, 1), k.transpose(0, 1), softmax_scale))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["key_padding", "bool", "additive"])
def test_attn_mask(kind, dtype, backend):
    q, k, v = _qkv(2, 4, 2, 29, 41, 48, dtype)
    if kind == "key_padding":  # (batch, 1, 1, Lk): True for the keys that are real tokens
        mask = torch.arange(41, device=DEVICE) < torch.tensor([41, 23], device=DEVICE)[:, None]
        mask = mask[:, None, None, :]
    elif kind == "bool":  # one pattern per head, broadcast over the batch
        mask = torch.rand(4, 29, 41, device=DEVICE) > 0.3
    else:  # a float bias broadcast over batch and heads, with -inf entries; its gradient is checked too
        mask = torch.randn(29, 41, device=DEVICE, dtype=dtype).masked_fill(torch.rand(29, 41, device=DEVICE) < 0.2,
                                                                           -math.inf)
    _check_sdpa(backend, q, k, v, mask)
    _check_sdpa(backend, q, k, v, mask, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows_give_zeros(kind, backend):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 2, 19, 23, 32, torch.float32))
    hidden = torch.zeros(19, 23, dtype=torch.bool, device=DEVICE)
    hidden[[0, 7, 18]] = True  # rows 0, 7 and 18 see no key
    mask = ~hidden if kind == "bool" else torch.zeros(19, 23, device=DEVICE).masked_fill(hidden, -math.inf)
    with lmrt.backend(backend):
        out = lmrt.ops.scaled_dot_product_attention(q, k, v, mask)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    assert torch.equal(out[:, :, [0, 7, 18]], torch.zeros_like(out[:, :, [0, 7, 18]]))
    assert torch.equal(q.grad[:, :, [0, 7, 18]], torch.zeros_like(q.grad[:, :, [0, 7, 18]]))
    for t in (out, q.grad, k.grad, v.grad):
        assert t.isfinite().all()
    exact = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask)
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5)
    # Every gradient (the rows that see no key must add nothing to dK and dV) within the rule.
    _check_sdpa(backend, q.detach(), k.detach(), v.detach(), mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("extreme", ["min", "max"])
def test_the_dtype_extremes_as_mask_are_finite(extreme, dtype, backend):
    """Hugging Face masks hold torch.finfo(dtype).min, not -inf. Rows masked that way everywhere average the values
    as in PyTorch (every score is the same), not the zeros of a row that sees no key; in base-2 units the float32
    and bfloat16 minimum would overflow to -inf. The maximum would overflow to +inf, and the triton backend's rows
    holding it were NaN. The kernels' gradients of rows whose scores are that large are inexact by design (README),
    so those rows get no output gradient (inexact_gradient_rows); attention_floor, which used to take its bound from
    these scores (1e32 relative, so any gradient passed, and only finiteness was checked), leaves them out."""
    q, k, v = _qkv(2, 2, 2, 19, 23, 32, dtype)
    hidden = torch.rand(19, 23, device=DEVICE) < 0.3
    hidden[[0, 7, 18]] = True  # rows 0, 7 and 18 hold the extreme at every key
    value = getattr(torch.finfo(dtype), extreme)
    mask = torch.zeros(19, 23, device=DEVICE, dtype=dtype).masked_fill(hidden, value)
    _check_sdpa(backend, q, k, v, mask)
    _check_sdpa(backend, q, k, v, mask, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_rows_before_the_first_key_give_zeros(backend):
    """flash-attn's bottom-right causal mask with Lq > Lk hides every key from the first Lq - Lk queries."""
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in _qkv(1, 2, 2, 40, 9, 32, torch.float32))
    with lmrt.backend(backend):
        out = lmrt.ops.flash_attn_func(q, k, v, causal=True)
        out.sum().backward()
    assert torch.equal(out[:, :31], torch.zeros_like(out[:, :31]))
    assert q.grad.isfinite().all() and torch.equal(q.grad[:, :31], torch.zeros_like(q.grad[:, :31]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_nan_scores_make_their_rows_nan(causal, backend):
    """A NaN score makes its row's output NaN, as in PyTorch, and leaves the other rows alone: a query row of NaN
    (every score NaN, so no finite row maximum), and a NaN key past the first 512 (a later key block, after a
    finite maximum). The CPU kernel's row maximum skips NaN for speed; this checks that the NaN still arrives."""
    q, k, v = _qkv(1, 2, 2, 21, 600, 32, torch.float32)
    q[:, 0, 3] = math.nan
    k[:, 1, 550, 0] = math.nan  # every row of head 1 sees key 550 (causal too: bottom-right alignment)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn's layout, for its bottom-right causality
    with lmrt.backend(backend):
        out = lmrt.ops.flash_attn_func(q, k, v, causal=causal).transpose(1, 2)
    assert out[:, 0, 3].isnan().all() and out[:, 1].isnan().all()
    clean = torch.ones(21, dtype=torch.bool, device=DEVICE)
    clean[3] = False
    assert out[:, 0, clean].isfinite().all()
    exact = reference.flash_attn_func(q.double(), k.double(), v.double(), causal=causal).transpose(1, 2)
    torch.testing.assert_close(out[:, 0, clean].double(), exact[:, 0, clean], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_nan_scores_reach_the_gradients(causal, backend):
    """The backward recomputes P = exp(s - lse) from the saved log-sum-exp, so a row with a NaN score must save a NaN
    lse, not the +inf of a row that sees no key (P = 0 there), for the NaN to reach the gradients where
    F.scaled_dot_product_attention's have it: the row's dq, and every key's dK and dV. The CUDA forward saved +inf,
    which left dV finite but at the NaN key. Head 0 has a query of NaN, head 1 a NaN key past the first 512 (after a
    finite row maximum), as in test_nan_scores_make_their_rows_nan; the NaN query is the last, which sees every key
    under bottom-right causality. (A key hidden from a NaN row has P = 0 where a kernel skips it, 0 / NaN in
    PyTorch's softmax: a difference in the NaN pattern that says nothing.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _qkv(1, 2, 2, 21, 600, 32, torch.float32)
    q[:, 0, 20] = math.nan
    k[:, 1, 550, 0] = math.nan
    grad_output = torch.randn(1, 2, 21, 32, device=DEVICE)
    visible = torch.ones(21, 600, dtype=torch.bool, device=DEVICE).tril(600 - 21) if causal else None

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, grad_output)]

    def flash_attn(q, k, v):  # flash-attn's layout, for its bottom-right causality
        return lmrt.ops.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        causal=causal).transpose(1, 2)

    # The math backend: the formula's NaN pattern, not that of whichever fused kernel PyTorch picks on the device.
    with sdpa_kernel(SDPBackend.MATH):
        expected = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=visible))
    with lmrt.backend(backend):
        got = run(flash_attn)
    for name, result, torch_result in zip(["output", "dq", "dk", "dv"], got, expected, strict=True):
        assert torch.equal(result.isnan(), torch_result.isnan()), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_infinite_key_that_no_query_sees_keeps_key_gradients_finite(backend):
    """Key 3 holds +inf where every query is negative, so its scores are -inf: it takes no part, and dK and dV stay
    finite as in PyTorch (dQ is NaN there too: 0 times the infinite key). 5 queries: the last query block of the
    dK/dV pass has rows past the end, whose q = 0 times the infinite key must not reach dK and dV."""
    q = -torch.rand(1, 1, 5, 8, device=DEVICE) - 0.1
    k, v = torch.randn(1, 1, 7, 8, device=DEVICE), torch.randn(1, 1, 7, 8, device=DEVICE)
    k[0, 0, 3, 0] = math.inf

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]

    expected = run(F.scaled_dot_product_attention)
    with lmrt.backend(backend):
        got = run(lmrt.ops.scaled_dot_product_attention)
    for name, result, torch_result in zip(["output", "dq", "dk", "dv"], got, expected, strict=True):
        assert torch.equal(result.isnan(), torch_result.isnan()), name
        torch.testing.assert_close(result.nan_to_num(0.0), torch_result.nan_to_num(0.0), msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_reference_with_the_same_mask(dtype, backend):
    _skip_without_full_attention(backend, "dropout")
    q, k, v = _qkv(2, 4, 2, 37, 45, 40, dtype)
    p = 0.3
    torch.manual_seed(1234)
    seed = draw_seed(torch.device(DEVICE), p)
    keep = reference.dropout_keep_mask(int(seed.item()), (2, 4, 37, 45), p, DEVICE)

    def lmrt_fn(q, k, v):
        torch.manual_seed(1234)  # the op draws the same seed
        return lmrt.ops.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True)

    def torch_fn(q, k, v):
        return attention_in_dtype(q, k, v, dropout_p=p, is_causal=True, dropout_mask=keep)

    def exact_fn(q, k, v):
        return reference.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True,
                                                      dropout_mask=keep)

    with lmrt.backend(backend):
        check_against_torch(lmrt_fn, torch_fn, exact_fn, [q, k, v], torch.randn_like(q), ["query", "key", "value"],
                            grad_factor=3.0, floor=attention_floor(q, k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_fraction_and_mask(p, backend):
    _skip_without_full_attention(backend, "dropout")
    """With q = k = 0 every probability is 1/Lk, and with v = I the output is the kept-and-rescaled mask itself."""
    keys = 96
    q = torch.zeros(2, 3, 64, 16, device=DEVICE)
    k = torch.zeros(2, 3, keys, 16, device=DEVICE)
    v = torch.eye(keys, device=DEVICE).expand(2, 3, keys, keys)
    torch.manual_seed(7)
    with lmrt.backend(backend):
        out = lmrt.ops.scaled_dot_product_attention(q, k, v, dropout_p=p)
    kept = out * keys * (1 - p)
    assert torch.allclose(kept, kept.round(), atol=1e-4), "every entry is 0 or 1/((1-p) Lk)"
    assert abs((kept.round() == 0).double().mean().item() - p) < 0.01
    torch.manual_seed(7)
    seed = int(draw_seed(torch.device(DEVICE), p).item())
    assert torch.equal(kept.round().bool(), reference.dropout_keep_mask(seed, (2, 3, 64, keys), p, DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_reproducible_under_manual_seed(backend):
    _skip_without_full_attention(backend, "dropout")
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 33, 33, 32, torch.float32))
    results = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        with lmrt.backend(backend):
            out = lmrt.ops.flash_attn_func(q, k, v, dropout_p=0.2)
        results.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1], strict=True))
    assert not torch.equal(results[0][0], results[2][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_and_value_head_dim(backend):
    q, k, v = _qkv(2, 2, 2, 17, 29, 24, torch.float32, head_dim_v=40)
    _check_sdpa(backend, q, k, v, scale=0.37)
    _check_sdpa(backend, q, k, v, scale=0.37, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_shapes_and_broadcasting(backend):
    """Extra batch dims, 2-D and 3-D inputs, a key/value batch of 1 and one key/value head broadcast, as F.sdpa,
    forward and backward: a broadcast key or value gets the sum of the gradients of every batch or head it serves."""
    cases = [((2, 3, 4, 9, 16), (2, 3, 4, 11, 16)), ((9, 16), (11, 16)), ((4, 9, 16), (4, 11, 16)),
             ((2, 4, 9, 16), (1, 4, 11, 16)), ((2, 4, 9, 16), (2, 1, 11, 16))]
    for q_shape, k_shape in cases:
        q, k, v = (torch.randn(s, device=DEVICE) for s in (q_shape, k_shape, k_shape))
        grad_out = torch.randn(F.scaled_dot_product_attention(q, k, v).shape, device=DEVICE)
        q_heads, k_heads = (t if t.dim() >= 3 else t[None] for t in (q, k))  # attention_floor's layout
        with lmrt.backend(backend):
            check_against_torch(lmrt.ops.scaled_dot_product_attention, F.scaled_dot_product_attention,
                                reference.scaled_dot_product_attention, [q, k, v], grad_out, ["query", "key", "value"],
                                grad_factor=3.0, floor=attention_floor(q_heads, k_heads))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,gqa", [((4, 1, 4), False), ((4, 4, 1), False), ((1, 1, 4), False),
                                       ((8, 2, 4), True), ((8, 4, 1), True)], ids=str)
def test_key_and_value_head_counts_may_differ(heads, gqa, backend):
    """As F.sdpa: one key or value head broadcasts over the other's (the heads dim is a batch dim), and under
    enable_gqa each of key and value repeats to the query's heads. Forward and every gradient in float64."""
    n_q, n_k, n_v = heads
    q, k, v = (torch.randn(2, n, length, 16, device=DEVICE) for n, length in ((n_q, 9), (n_k, 13), (n_v, 13)))
    grad_out = torch.randn(2, max(heads), 9, 16, device=DEVICE)
    with lmrt.backend(backend):
        got = forward_backward(lambda *t: lmrt.ops.scaled_dot_product_attention(*t, enable_gqa=gqa), (q, k, v),
                               grad_out)
    exact = forward_backward(lambda *t: F.scaled_dot_product_attention(*t, enable_gqa=gqa),
                             [t.double() for t in (q, k, v)], grad_out.double())
    for name, result, expected in zip(["output", "query", "key", "value"], got, exact, strict=True):
        torch.testing.assert_close(result, expected.float(), atol=1e-5, rtol=1e-5, msg=name)


def test_float64_is_float64_accurate_and_large_scores_float32_accurate():
    """Float64 (served by the reference on every device) as exact as F.sdpa's float64, gradients included: the
    reference's backward recomputes the softmax rather than exp(s - lse) from the float32 lse the kernels' contract
    keeps; the gradient of an additive float64 mask too (it was rounded to float32). And on the torch backend in
    float32, scores near 1000 as accurate as F.sdpa's max-subtracted softmax."""
    q, k, v = (torch.randn(1, 2, n, 8, device=DEVICE, dtype=torch.float64) for n in (6, 7, 7))
    mask = torch.randn(2, 6, 7, device=DEVICE, dtype=torch.float64)
    grad_out = torch.randn(1, 2, 6, 8, device=DEVICE, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the default backends' one-time fallback warning for float64
        got = forward_backward(lambda *t: lmrt.ops.scaled_dot_product_attention(*t, scale=3.0), (q, k, v, mask),
                               grad_out)
    exact = forward_backward(lambda *t: F.scaled_dot_product_attention(*t, scale=3.0), (q, k, v, mask), grad_out)
    for name, result, expected in zip(["output", "query", "key", "value", "mask"], got, exact, strict=True):
        assert result.dtype == torch.float64, name
        torch.testing.assert_close(result, expected, atol=1e-12, rtol=1e-12, msg=name)

    q, k, v = (t.float() for t in (q, k, v))
    with lmrt.backend("torch"):
        got = forward_backward(lambda *t: lmrt.ops.scaled_dot_product_attention(*t, scale=40.0), (q, k, v),
                               grad_out.float())
    exact = forward_backward(lambda *t: F.scaled_dot_product_attention(*t, scale=40.0),
                             [t.double() for t in (q, k, v)], grad_out)
    in_dtype = forward_backward(lambda *t: F.scaled_dot_product_attention(*t, scale=40.0), (q, k, v),
                                grad_out.float())
    for name, result, torch_result, expected in zip(["output", "query", "key", "value"], got, in_dtype, exact,
                                                    strict=True):
        # 3x, as attention's gradients elsewhere: at |s| in the hundreds the scores' own rounding (an ulp, 3e-5)
        # dominates, and q.k summed in another order rounds differently. exp(s - lse) was 10-20x off.
        assert_within_torch_error(name, result, torch_result, expected, factor=3.0)


def test_key_and_value_heads_that_do_not_broadcast_are_refused():
    q, k, v = (torch.randn(1, n, 5, 8, device=DEVICE) for n in (4, 2, 4))
    with pytest.raises(ValueError, match="`key` has 2 heads and `value` 4"):
        lmrt.ops.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_are_read_in_place(backend):
    base = torch.randn(2, 33, 4, 3 * 32, device=DEVICE)  # a fused qkv projection, (batch, L, heads, 3 * dim)
    q, k, v = (base[..., i * 32 : (i + 1) * 32].transpose(1, 2) for i in range(3))
    _check_sdpa(backend, q, k, v, is_causal=True)
    _check_sdpa(backend, *(t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,keys", [(0, 7), (7, 0), (0, 0)], ids=str)
def test_empty_sequences(rows, keys, backend):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 2, rows, keys, 16, torch.float32))
    with lmrt.backend(backend):
        out = lmrt.ops.scaled_dot_product_attention(q, k, v)
        out.sum().backward()
    assert out.shape == (2, 2, rows, 16) and torch.equal(out, torch.zeros_like(out))
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_heads", [0, 1])
def test_no_query_heads(kv_heads, backend):
    """Zero query heads, with zero key/value heads or one that broadcasts (F.sdpa and flash-attn take both): an empty
    output, and zero gradients for the broadcast head. The torch backend divided by the key/value head count, the
    extension refused zero heads, and the triton backward left the broadcast head's gradients unwritten."""
    q = torch.randn(2, 0, 5, 8, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 6, 8, device=DEVICE, requires_grad=True) for _ in range(2))
    with lmrt.backend(backend):
        out = lmrt.ops.scaled_dot_product_attention(q, k, v)
        torch.full_like(k, math.nan)  # freed memory holding NaN, which an unwritten gradient may reuse
        out.sum().backward()
        assert out.shape == (2, 0, 5, 8)
        if kv_heads:  # flash-attn's key/value heads divide the query heads
            out = lmrt.ops.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            assert out.shape == (2, 5, 0, 8)
    for t in (k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))
    reference.scaled_dot_product_attention(q, k, v, enable_gqa=True).sum().backward()  # the tests' exact answer


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_output_may_be_modified_in_place(backend):
    """As flash-attn's. The custom op returned a transposed view of the tensor its kernels wrote (rows first), on
    which autograd refused in-place ops at once. The backward needs the output, so a backward after such an edit
    raises, as with F.scaled_dot_product_attention."""
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in _qkv(1, 2, 2, 5, 7, 8, torch.float32))
    with lmrt.backend(backend):
        out = lmrt.ops.flash_attn_func(q, k, v)
        out.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.cuda
def test_extension_checks_the_device_of_lse():
    """torch.ops.lmrt_C.attention_bwd checked the device of every tensor but the saved log-sum-exp: with q on a GPU
    and lse on the CPU, the kernel was given a host pointer."""
    q = torch.randn(1, 2, 4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="`lse` is on cpu but the input is on cuda"):
        extension_ops().attention_bwd(q, q, q, q, q, torch.zeros(1, 2, 4), None, False, False, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_head_dim_attends_uniformly(backend):
    """With head dim 0 every score is 0, so each query averages the values, as in PyTorch (whose default scale,
    1/sqrt(0), would otherwise make the scores 0 * inf)."""
    q, k = torch.randn(2, 3, 5, 0, device=DEVICE), torch.randn(2, 3, 7, 0, device=DEVICE)
    v = torch.randn(2, 3, 7, 4, device=DEVICE)
    for is_causal in (False, True):
        _check_sdpa(backend, q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 2, 5, 17, 128])
def test_backward_stays_finite_with_large_inputs(length, backend):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, length, length, 64, torch.float16, scale=5.0))
    with lmrt.backend(backend):
        out = lmrt.ops.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(torch.randn_like(out))
    for t in (out, q.grad, k.grad, v.grad):
        assert t.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    q, k, v = _qkv(2, 8, 2, 67, 130, 40, torch.float32)  # 4 query heads per key/value head: their dK, dV add up
    mask = torch.randn(67, 130, device=DEVICE)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(backend not in EXTENSION_BACKENDS or t is not mask) for t in (q, k, v, mask)]
        with lmrt.backend(backend):
            out = lmrt.ops.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
            out.backward(torch.ones_like(out))
        grads.append([t.grad for t in leaves if t.requires_grad])
    for first, second in zip(*grads, strict=True):
        assert torch.equal(first, second)


def test_head_dim_above_the_kernels_falls_back_or_raises(monkeypatch):
    q, k, v = _qkv(1, 1, 1, 5, 5, 288, torch.float32)
    with lmrt.backend("triton"), pytest.raises(RuntimeError, match="'triton' backend was chosen.*head dims up to 256"):
        lmrt.ops.scaled_dot_product_attention(q, k, v)
    monkeypatch.setattr(backends, "_warned", set())  # the warning is once per process: not if an earlier test warned
    monkeypatch.setitem(backends._DEFAULT_ORDER, DEVICE, ("triton", "torch"))
    # The extension's eager call knows the CPU default order (cpp first) without asking Python: leave it out here.
    monkeypatch.setattr(lmrt.ops.attention, "eager_calls", SimpleNamespace(attention=lambda *args: None))
    if backends.unavailable_reason("triton", DEVICE) is None:
        with pytest.warns(UserWarning, match="'triton' backend cannot serve this call.*head dims up to 256"):
            out = lmrt.ops.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("backend", _backends_among(EXTENSION_BACKENDS))
def test_extension_backends_refuse_what_they_lack(backend, monkeypatch):
    """Dropout, packed sequences and a float mask's gradient: a clear error when the backend was chosen (at the
    forward, for the mask's gradient too), the next backend (with one warning) by default."""
    q, k, v = _qkv(1, 2, 2, 9, 12, 16, torch.float32)
    mask = torch.randn(9, 12, device=DEVICE, requires_grad=True)
    cu = torch.tensor([0, 4, 9], device=DEVICE, dtype=torch.int32)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    cases = [("its attention kernels have no dropout", lambda: lmrt.ops.scaled_dot_product_attention(
                 q, k, v, dropout_p=0.5)),
             ("its attention kernels take no packed sequences", lambda: lmrt.ops.flash_attn_varlen_func(
                 *packed, cu, cu, 5, 5)),
             ("its attention kernels give no gradient for attn_mask", lambda: lmrt.ops.scaled_dot_product_attention(
                 q, k, v, mask))]
    for reason, call in cases:
        with lmrt.backend(backend), pytest.raises(RuntimeError, match=f"'{backend}' backend was chosen.*{reason}"):
            call()
    with lmrt.backend(backend), torch.no_grad():  # no gradient wanted: served
        torch.testing.assert_close(lmrt.ops.scaled_dot_product_attention(q, k, v, mask),
                                   F.scaled_dot_product_attention(q, k, v, mask))
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setitem(backends._DEFAULT_ORDER, DEVICE, (backend, "torch"))
    with pytest.warns(UserWarning, match=f"'{backend}' backend cannot serve this call \\(its attention kernels"):
        lmrt.ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v = _qkv(2, 4, 2, 9, 21, 16, torch.float32)
    mask = torch.randn(1, 1, 9, 21, device=DEVICE).expand(2, 4, 9, 21)
    seed = torch.tensor([42], device=DEVICE)
    cu, max_len = torch.tensor([0, 4, 9], device=DEVICE, dtype=torch.int32), 5
    packed = [t[:1, :, :9] for t in (q, k, v)]
    calls = [(q, k, v, None, None, None, 9, 21, 0.0, None, True, False, 0.5, True),
             (q, k, v, mask.clone().requires_grad_(), None, None, 9, 21, 0.0, None, False, False, 0.5, False),
             (q, k, v, None, None, None, 9, 21, 0.25, seed, True, True, 0.5, True),
             (*packed, None, cu, cu, max_len, max_len, 0.0, None, True, True, 0.5, False)]
    if backend in EXTENSION_BACKENDS:  # no mask gradient, dropout or packed sequences there
        calls = calls[:1] + [(*calls[1][:3], mask, *calls[1][4:])]
    with lmrt.backend(backend):
        for args in calls:
            args = [t.clone().requires_grad_() if i < 3 else t for i, t in enumerate(args)]
            torch.library.opcheck(torch.ops.lmrt.attention_fwd.default, args)
            out, lse = torch.ops.lmrt.attention_fwd(*args)
            mask_grad = args[3] is not None and args[3].requires_grad
            plain = [a.detach() if torch.is_tensor(a) else a for a in args]
            bwd_args = (torch.randn_like(out), *plain[:3], out.detach(), lse.detach(), *plain[3:13], mask_grad)
            torch.library.opcheck(torch.ops.lmrt.attention_bwd.default, bwd_args)


def test_compiles_without_graph_breaks():
    q, k, v = _qkv(2, 4, 2, 19, 27, 32, torch.float32)
    mask = torch.randn(19, 27, device=DEVICE)

    def sdpa_step(q, k, v, mask):
        return lmrt.ops.scaled_dot_product_attention(q, k, v, mask, is_causal=True, enable_gqa=True).sin().sum()

    check_compiled_matches_eager(sdpa_step, (q, k, v, mask))
    # In the default order, where a float mask that requires grad is refused by the extension's backends at the
    # backward (the eager call refuses a chosen one at the forward, outside the graph), the step compiles whole too.
    leaves, eager_leaves = ([t.clone().requires_grad_() for t in (q, k, v, mask)] for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the default order's warning that a backend passed the call on
        torch.compile(sdpa_step, fullgraph=True)(*leaves).backward()
        sdpa_step(*eager_leaves).backward()
    torch.testing.assert_close(leaves[3].grad, eager_leaves[3].grad)

    def flash_step(q, k, v):
        return lmrt.ops.flash_attn_func(q, k, v, causal=True).sin().sum()

    check_compiled_matches_eager(flash_step, [t.transpose(1, 2) for t in (q, k, v)])
    q, k, v, cu_q, cu_k = _packed([3, 9, 1], [5, 2, 8], 4, 2, 32, torch.float32)

    def varlen_step(q, k, v):
        return lmrt.ops.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 8, causal=True).sin().sum()

    check_compiled_matches_eager(varlen_step, (q, k, v))
    q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in _qkv(1, 2, 2, 9, 9, 16, torch.float32))
    check_compiled_matches_eager(lambda q, k, v: lmrt.ops.scaled_dot_product_attention(q, k, v).sum(), (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_traced_call_serves_other_lengths(backend):
    """torch.jit.trace records the lengths that the public calls pass as `max_seqlen_*` as constants: the triton
    kernels took their grid and bounds from them, so a trace taken at 5 queries and 6 keys read 6 of 11 keys (and
    uninitialized rows) at 9 and 11. Unpacked calls now take the lengths from the tensors."""
    def sdpa(q, k, v):
        return lmrt.ops.scaled_dot_product_attention(q, k, v, is_causal=True)

    def flash(q, k, v):
        return lmrt.ops.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        causal=True).transpose(1, 2)

    with lmrt.backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated in favour of export
        for call in (sdpa, flash):
            traced = torch.jit.trace(call, _qkv(1, 2, 2, 5, 6, 16, torch.float32), check_trace=False)
            q, k, v = _qkv(1, 2, 2, 9, 11, 16, torch.float32)
            grad_out = torch.randn_like(q)
            expected = forward_backward(call, [q, k, v], grad_out)
            actual = forward_backward(traced, [q, k, v], grad_out)
            for got, want in zip(actual, expected, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


class TestBadInput:
    def test_dtype_mismatch(self):
        q, k, v = _qkv(1, 1, 1, 4, 4, 8, torch.float32)
        with pytest.raises(TypeError, match="`key` has dtype torch.float16 but `query` has torch.float32"):
            lmrt.ops.scaled_dot_product_attention(q, k.half(), v)

    def test_integer_input(self):
        q = torch.ones(1, 1, 4, 8, dtype=torch.long)
        with pytest.raises(TypeError, match="`query` must be a floating-point tensor"):
            lmrt.ops.scaled_dot_product_attention(q, q, q)

    def test_head_dims_differ(self):
        q, k, v = _qkv(1, 1, 1, 4, 4, 8, torch.float32)
        with pytest.raises(ValueError, match=r"head dim of `key` \(9\) must equal that of `query` \(8\)"):
            lmrt.ops.scaled_dot_product_attention(q, torch.randn(1, 1, 4, 9, device=q.device), v)

    def test_key_value_lengths_differ(self):
        q, k, v = _qkv(1, 1, 1, 4, 4, 8, torch.float32)
        with pytest.raises(ValueError, match="`key` has 4 keys but `value` has 5"):
            lmrt.ops.scaled_dot_product_attention(q, k, torch.randn(1, 1, 5, 8, device=q.device))

    def test_heads_not_a_multiple(self):
        q, k, v = _qkv(1, 6, 4, 4, 4, 8, torch.float32)
        with pytest.raises(ValueError, match="`key` has 4 heads and `query` 6"):
            lmrt.ops.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        with pytest.raises(ValueError, match="same number of heads, a divisor of the query's 6"):
            lmrt.ops.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)))

    def test_gqa_needs_enable_gqa(self):
        q, k, v = _qkv(1, 4, 2, 4, 4, 8, torch.float32)
        with pytest.raises(ValueError, match="pass enable_gqa=True"):
            lmrt.ops.scaled_dot_product_attention(q, k, v)

    def test_mask_that_does_not_broadcast(self):
        q, k, v = _qkv(2, 2, 2, 4, 5, 8, torch.float32)
        with pytest.raises(ValueError, match=r"`attn_mask` of shape \[4, 4\] does not broadcast.*\[2, 2, 4, 5\]"):
            lmrt.ops.scaled_dot_product_attention(q, k, v, torch.ones(4, 4, dtype=torch.bool))

    def test_integer_mask(self):
        q, k, v = _qkv(1, 1, 1, 4, 5, 8, torch.float32)
        with pytest.raises(TypeError, match="`attn_mask` must be a bool or floating-point tensor, got torch.int64"):
            lmrt.ops.scaled_dot_product_attention(q, k, v, torch.ones(4, 5, dtype=torch.long))

    @pytest.mark.parametrize("p", [-0.1, 1.0])
    def test_dropout_p_out_of_range(self, p):
        q, k, v = _qkv(1, 1, 1, 4, 5, 8, torch.float32)
        with pytest.raises(ValueError, match=f"`dropout_p` must be a float in \\[0, 1\\), got {p}"):
            lmrt.ops.scaled_dot_product_attention(q, k, v, dropout_p=p)

    def test_flash_layout_needs_four_dims(self):
        q = torch.randn(4, 2, 8)
        with pytest.raises(ValueError, match=r"`query` must have 4 dims, got shape \[4, 2, 8\]"):
            lmrt.ops.flash_attn_func(q, q, q)

    def test_varlen_offsets(self):
        q, k, v, cu_q, cu_k = _packed([3, 4], [3, 4], 2, 2, 8, torch.float32)
        with pytest.raises(TypeError, match="`cu_seqlens_q` must be a 1-D int32 tensor.*torch.float32"):
            lmrt.ops.flash_attn_varlen_func(q, k, v, cu_q.float(), cu_k, 4, 4)
        with pytest.raises(ValueError, match="`cu_seqlens_q` has 3 offsets and `cu_seqlens_k` 2"):
            lmrt.ops.flash_attn_varlen_func(q, k, v, cu_q, cu_k[:2], 4, 4)
        with pytest.raises(TypeError, match="`max_seqlen_k` must be a non-negative Python int, got tensor"):
            lmrt.ops.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, torch.tensor(4))

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_mask_on_another_device(self, backend):
        """The mask's device went unchecked on the Python path: a CPU mask reached the GPU kernels."""
        q, k, v = _qkv(1, 1, 1, 4, 5, 8, torch.float32)
        with lmrt.backend(backend), pytest.raises(ValueError, match=f"`attn_mask` is on meta but `query` is on "
                                                                     f"{q.device.type}"):
            lmrt.ops.scaled_dot_product_attention(q, k, v, torch.zeros(4, 5, device="meta"))

    @pytest.mark.cuda
    def test_key_on_another_device(self):
        q, k, v = _qkv(1, 1, 1, 4, 5, 8, torch.float32)
        with pytest.raises(ValueError, match="`key` is on cpu but `query` is on cuda"):
            lmrt.ops.scaled_dot_product_attention(q.cuda(), k.cpu(), v.cuda())


def test_no_warning_on_the_default_path():
    q, k, v = _qkv(1, 2, 2, 8, 8, 16, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lmrt.ops.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_dropout_matches_reference_with_the_same_mask(backend):
    _skip_without_full_attention(backend, "dropout")
    lengths_q, lengths_k = [7, 1, 30], [12, 19, 4]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 4, 2, 32, torch.float32)
    packed, p = (cu_q, cu_k, max(lengths_q), max(lengths_k)), 0.25
    torch.manual_seed(99)
    keep = reference.dropout_keep_mask(int(draw_seed(torch.device(DEVICE), p).item()), (3, 4, 30, 19), p, DEVICE)

    def lmrt_fn(q, k, v):
        torch.manual_seed(99)
        return lmrt.ops.flash_attn_varlen_func(q, k, v, *packed, dropout_p=p, causal=True)

    def exact_fn(q, k, v):
        return reference.flash_attn_varlen_func(q, k, v, *packed, dropout_p=p, causal=True, dropout_mask=keep)

    with lmrt.backend(backend):
        check_against_torch(lmrt_fn, exact_fn, exact_fn, [q, k, v], torch.randn_like(q), ["q", "k", "v"],
                            floor=attention_floor(q.transpose(0, 1), k.transpose(0, 1)))


def test_dropout_under_compile_is_reproducible():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 33, 33, 16, torch.float32))
    step = torch.compile(lambda q, k, v: lmrt.ops.scaled_dot_product_attention(q, k, v, dropout_p=0.3).sum(),
                         fullgraph=True)
    losses = []
    with lmrt.backend("triton"):
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            loss = step(q, k, v)
            loss.backward()
            losses.append(loss.item())
    assert losses[0] == losses[1] != losses[2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("large", ["scale", "inputs"])
def test_scores_past_two_to_the_31_stay_finite(large, is_causal, backend):
    """Scores of 1e12 (scale 1e12, or q and k near 1e6 at the default scale), which F.sdpa takes: the cpp kernels
    once took exp's argument as the exact product scale q.k minus the row max of its rounded values, off by up to
    half an ulp of the max (here thousands), so the max's own key got exp = inf or 0 and its row NaN, forward and
    backward. The triton (and CUDA) backward recomputes P in base 2 from the saved natural-log lse times log2 e,
    whose rounding here is past exp2's range: P above 1 was inf and dq NaN. P is clamped at 1 now; the gradients of
    a row whose lse came back below its max are still off (README, Attention), so only their finiteness is checked."""
    q, k, v = _qkv(1, 2, 2, 16, 37, 8, torch.float32)
    kwargs = {"scale": 1e12, "is_causal": is_causal}
    if large == "inputs":
        q, k, kwargs = q * 1e6, k * 1e6, {"is_causal": is_causal}
    with lmrt.backend(backend):
        got = forward_backward(lambda *t: lmrt.ops.scaled_dot_product_attention(*t, **kwargs), (q, k, v),
                               torch.randn_like(q))
    for name, result in zip(["output", "query", "key", "value"], got, strict=True):
        assert result.isfinite().all(), name
    # F.sdpa's own query gradient has NaN rows here on the CPU: the gradients go to the float64 reference. Scores
    # thousands apart make every row's softmax one-hot.
    torch.testing.assert_close(got[0], F.scaled_dot_product_attention(q, k, v, **kwargs))
    if backend in ("cpp", "torch"):
        _check_sdpa(backend, q, k, v, one_hot_rows=True, **kwargs)
