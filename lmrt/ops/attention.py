"""lmrt.ops.scaled_dot_product_attention, and the attention custom ops that the flash_attn_* calls share.

One pair of custom ops, `lmrt::attention_fwd` and `lmrt::attention_bwd`, serves every public attention call. They
take (batch, heads, rows, dim) views in any strides (a (batch, rows, heads, dim) tensor transposed is such a
view, so no layout is copied), an optional (batch, heads, Lq, Lk) view of the mask (broadcast dims with stride
0), optional cu_seqlens for packed sequences, the causal alignment, and a dropout seed drawn from torch's
generator, so that dropout is reproducible under torch.manual_seed and the backward regenerates the mask.
"""

import math

import torch
from torch import Tensor
from torch.compiler import is_compiling

from lmrt import backends, reference
from lmrt._layout import as_op_output
from lmrt.ops._autocast import autocast_inputs
from lmrt.ops._checks import check_floating, refuse_forward_ad
from lmrt.ops._dispatch import eager_calls, extension_ops, pick_backend

# The largest head dim the Triton kernels take; larger ones fall back to the reference (or raise, when the
# triton backend was chosen explicitly).
MAX_HEAD_DIM = 256


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Attention over (..., heads, L, E) tensors; same call as F.scaled_dot_product_attention.

    Causal masking is top-left aligned (key j visible to query i when j <= i), as in PyTorch. `attn_mask` is
    boolean (True = take part) or float (added to the scores), broadcastable to (..., heads, L, S). With
    `enable_gqa`, key and value may have fewer heads than query (a divisor of its count); they are not repeated
    in memory. A query that sees no key gets zeros. Dropout applies whenever `dropout_p` > 0.
    """
    if not is_compiling():
        output = eager_calls.attention(backends.context_choice, query, key, value, attn_mask, dropout_p, is_causal,
                                       scale, enable_gqa)
        if output is not None:
            return output
    op = "scaled_dot_product_attention"
    query, key, value, attn_mask = autocast_inputs(op, query, key, value, attn_mask)
    check_attention_inputs(op, query, key, value, keys_dim=-2)
    check_dropout_p(op, dropout_p)
    refuse_forward_ad(op, query, key, value, attn_mask)
    # Batch dims broadcast; a query/key tensor without a heads dim has one head.
    q, k, v = (t if t.dim() >= 3 else t.unsqueeze(0) for t in (query, key, value))
    try:
        batch_shape = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        raise ValueError(f"lmrt.ops.{op}: the batch dims of `query` {list(query.shape)}, `key` {list(key.shape)} "
                         f"and `value` {list(value.shape)} must broadcast") from None
    k, v = _same_kv_heads(op, k, v, enable_gqa)
    n_heads, n_kv_heads = q.shape[-3], k.shape[-3]
    if n_kv_heads != n_heads:
        if n_heads == 1 and not enable_gqa:
            n_heads = n_kv_heads  # broadcast the single query head
        elif n_kv_heads != 1 and not (enable_gqa and n_heads % n_kv_heads == 0):
            need = "a divisor of" if enable_gqa else "equal to (or pass enable_gqa=True for a divisor of)"
            raise ValueError(f"lmrt.ops.{op}: `key` has {n_kv_heads} heads and `query` {n_heads}; key/value heads "
                             f"must be {need} the query heads")
    batch = math.prod(batch_shape)
    q = q.expand(*batch_shape, n_heads, *q.shape[-2:]).reshape(batch, n_heads, *q.shape[-2:])
    k = k.expand(*batch_shape, *k.shape[-3:]).reshape(batch, *k.shape[-3:])
    v = v.expand(*batch_shape, *v.shape[-3:]).reshape(batch, *v.shape[-3:])
    rows, keys = q.shape[2], k.shape[2]
    mask = None
    if attn_mask is not None:
        mask = broadcast_mask(op, attn_mask, (*batch_shape, n_heads, rows, keys), q.device)
    if (not is_compiling() and attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad
            and torch.is_grad_enabled()):
        # The backward will need a backend that gives the mask a gradient: a chosen backend that gives none is
        # refused now rather than after the forward's work (under torch.compile, whose graph the backend choice
        # stays out of, at the backward).
        _backend(q, k, v, mask, dropout_p, False, mask_grad=True)
    scale = reference.default_scale(q.shape[-1]) if scale is None else float(scale)
    out, _ = torch.ops.lmrt.attention_fwd(q, k, v, mask, None, None, rows, keys, float(dropout_p),
                                          draw_seed(q.device, dropout_p), bool(is_causal), False, scale, True)
    return out.reshape(*batch_shape, n_heads, rows, v.shape[-1]) if query.dim() >= 3 else out.reshape(rows, -1)


def _same_kv_heads(op: str, k: Tensor, v: Tensor, enable_gqa: bool) -> tuple[Tensor, Tensor]:
    """`key` and `value` with as many heads as each other, as the kernels take them: a single head broadcast (a
    view), or under `enable_gqa` the fewer heads repeated to the other's count (PyTorch repeats each to the
    query's; repeating to the other's first gives every query head the same key and value heads)."""
    n_k, n_v = k.shape[-3], v.shape[-3]
    if n_k == n_v:
        return k, v
    fewer, more = sorted((n_k, n_v))
    if fewer == 0 or more % fewer or not (fewer == 1 or enable_gqa):
        need = "a divisor of the other's count" if enable_gqa else "1 (or pass enable_gqa=True for a divisor)"
        raise ValueError(f"lmrt.ops.{op}: `key` has {n_k} heads and `value` {n_v}; where they differ, the fewer must "
                         f"be {need}")

    def repeat(t: Tensor) -> Tensor:
        # Each head repeated in place, (h0, h0, h1, h1, ...), as repeat_interleave; a view when t has one head.
        grown = t.unsqueeze(-3).expand(*t.shape[:-2], more // fewer, *t.shape[-2:])
        return grown.reshape(*t.shape[:-3], more, *t.shape[-2:])

    return (repeat(k), v) if n_k < n_v else (k, repeat(v))


def check_attention_inputs(op: str, q: Tensor, k: Tensor, v: Tensor, keys_dim: int, ndim: int | None = None) -> None:
    """Floating tensors of one dtype and device, of `ndim` dims (at least 2 when None), with the head dim of
    query and key equal and as many keys (dim `keys_dim`) in key as in value."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        check_floating(op, name, t)
        if t.dim() < 2 or (ndim is not None and t.dim() != ndim):
            need = f"{ndim} dims" if ndim is not None else "at least 2 dims"
            raise ValueError(f"lmrt.ops.{op}: `{name}` must have {need}, got shape {list(t.shape)}")
    for name, t in (("key", k), ("value", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"lmrt.ops.{op}: `{name}` has dtype {t.dtype} but `query` has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"lmrt.ops.{op}: `{name}` is on {t.device} but `query` is on {q.device}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"lmrt.ops.{op}: the head dim of `key` ({k.shape[-1]}) must equal that of `query` "
                         f"({q.shape[-1]})")
    if k.shape[keys_dim] != v.shape[keys_dim]:
        raise ValueError(f"lmrt.ops.{op}: `key` has {k.shape[keys_dim]} keys but `value` has "
                         f"{v.shape[keys_dim]}; they must match")


def check_dropout_p(op: str, dropout_p: float) -> None:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lmrt.ops.{op}: `dropout_p` must be a float in [0, 1), got {dropout_p!r}")


def broadcast_mask(op: str, attn_mask: Tensor, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """`attn_mask` as a (batch, heads, Lq, Lk) view of its broadcast to `shape` (no copy when the batch dims
    merge, as they do for one batch dim), on the query's `device`."""
    if not isinstance(attn_mask, Tensor) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        got = attn_mask.dtype if isinstance(attn_mask, Tensor) else type(attn_mask).__name__
        raise TypeError(f"lmrt.ops.{op}: `attn_mask` must be a bool or floating-point tensor, got {got}")
    if attn_mask.device != device:
        raise ValueError(f"lmrt.ops.{op}: `attn_mask` is on {attn_mask.device} but `query` is on {device}")
    try:
        expanded = attn_mask.expand(shape)
    except RuntimeError:
        raise ValueError(f"lmrt.ops.{op}: `attn_mask` of shape {list(attn_mask.shape)} does not broadcast to the "
                         f"attention scores' shape {list(shape)} (batch..., heads, L, S)") from None
    return expanded.reshape(math.prod(shape[:-3]), *shape[-3:])


def draw_seed(device: torch.device, dropout_p: float) -> Tensor | None:
    """A dropout seed from torch's generator for `device` (so torch.manual_seed makes dropout reproducible)."""
    if dropout_p <= 0:
        return None
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def _backend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float, packed: bool,
             mask_grad: bool = False) -> str:
    def limits(name: str) -> str | None:
        head_dim = max(q.shape[-1], v.shape[-1])
        if name == "triton" and head_dim > MAX_HEAD_DIM:
            return f"its kernels take head dims up to {MAX_HEAD_DIM}, not {head_dim}"
        if name in ("cpp", "cuda"):
            if dropout_p > 0:
                return "its attention kernels have no dropout"
            if packed:
                return "its attention kernels take no packed sequences (cu_seqlens)"
            if mask_grad:
                return "its attention kernels give no gradient for attn_mask"
        if name == "cuda":
            return extension_ops().cuda_attention_unsupported(q, k, v) or None
        return None

    dtypes = [q.dtype, k.dtype, v.dtype] + ([attn_mask.dtype] if attn_mask is not None and
                                             attn_mask.is_floating_point() else [])
    return pick_backend("attention", q.device, dtypes, limits)


def _grad_like(t: Tensor) -> Tensor:
    """An empty gradient for `t`, laid out as the kernels write it: `t`'s strides when its last dim has unit
    stride (and it is dense), else contiguous."""
    if t.stride(-1) == 1 or t.shape[-1] <= 1:
        return torch.empty_like(t)
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _output_layout(out: Tensor, heads_first: bool) -> Tensor:
    """`out` (batch, heads, rows, dim) stored heads-first, or rows-first and viewed heads-first."""
    if heads_first:
        return out.contiguous()
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("lmrt::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, seed: Tensor | None,
    causal: bool, bottom_right: bool, scale: float, heads_first_out: bool,
) -> tuple[Tensor, Tensor]:
    """(output, float32 log-sum-exp per query row); see kernels/attention.py's `attention_fwd`."""
    if q.shape[1] == 0:  # no query heads: nothing to compute (the kernels' head groups divide by the kv heads)
        return as_op_output(_output_layout(q.new_empty(*q.shape[:3], v.shape[-1]), heads_first_out)), _no_lse(q)
    args = (q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seed, causal,
            bottom_right, scale)
    backend = _backend(q, k, v, attn_mask, dropout_p, cu_seqlens_q is not None)
    if backend == "triton":
        from lmrt.kernels.attention import attention_fwd as triton_attention_fwd

        out, lse = triton_attention_fwd(*args, heads_first_out)
    elif backend in ("cpp", "cuda"):
        out, lse = extension_ops().attention_fwd(q, k, v, attn_mask, causal, bottom_right, scale, heads_first_out)
    else:
        out, lse = reference.attention_fwd(*args)
        out = _output_layout(out, heads_first_out)
    # Rows-first, the output is a transposed view of the tensor the kernels wrote.
    return as_op_output(out), lse


@attention_fwd.register_fake
def _(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seed, causal,
      bottom_right, scale, heads_first_out):
    batch, n_heads, rows, _ = q.shape
    out = q.new_empty(batch, n_heads, rows, v.shape[-1])
    return _output_layout(out, heads_first_out), _no_lse(q)


def _no_lse(q: Tensor) -> Tensor:
    """An unwritten float32 log-sum-exp per query row of `q`."""
    return q.new_empty(q.shape[:3], dtype=torch.float32)


def _mask_grad_dtype(q: Tensor) -> torch.dtype:
    """The dtype of the mask's gradient: the scores', float64 for float64 queries (the torch backend) and float32
    for the kernels' dtypes, whose scores are float32."""
    return reference.compute_dtype(q.dtype)


@torch.library.custom_op("lmrt::attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attn_mask: Tensor | None,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    dropout_p: float, seed: Tensor | None, causal: bool, bottom_right: bool, scale: float, mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d attn_mask): dq, dk, dv like q, k, v; the mask's gradient (batch, Hq, Lq, Lk) in the dtype the
    scores are computed in (`_mask_grad_dtype`) when `mask_grad`, else an empty tensor."""
    if q.shape[1] == 0:  # no query heads: a key/value head that broadcasts over them gets zero gradients
        dmask = q.new_empty((*q.shape[:3], k.shape[2]) if mask_grad else (0,), dtype=_mask_grad_dtype(q))
        return _grad_like(q), _grad_like(k).zero_(), _grad_like(v).zero_(), dmask
    args = (q, k, v, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seed,
            causal, bottom_right, scale)
    backend = _backend(q, k, v, attn_mask, dropout_p, cu_seqlens_q is not None, mask_grad)
    if backend == "triton":
        from lmrt.kernels.attention import attention_bwd as triton_attention_bwd

        dq, dk, dv, dmask = triton_attention_bwd(grad_out, *args, mask_grad)
    elif backend in ("cpp", "cuda"):
        dq, dk, dv = extension_ops().attention_bwd(grad_out, q, k, v, out, lse, attn_mask, causal, bottom_right,
                                                   scale)
        dmask = None
    else:
        grads = reference.attention_bwd(grad_out, *args)
        dq, dk, dv = (_grad_like(t).copy_(g) for t, g in zip((q, k, v), grads[:3], strict=True))
        dmask = grads[3]
    return dq, dk, dv, (dmask if mask_grad else q.new_empty(0, dtype=_mask_grad_dtype(q)))


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
      seed, causal, bottom_right, scale, mask_grad):
    dmask_shape = (*q.shape[:3], k.shape[2]) if mask_grad else (0,)
    return _grad_like(q), _grad_like(k), _grad_like(v), q.new_empty(dmask_shape, dtype=_mask_grad_dtype(q))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k = inputs[:6]
    max_q, max_k, dropout_p, seed, causal, bottom_right, scale = inputs[6:13]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, seed)
    ctx.settings = (max_q, max_k, dropout_p, causal, bottom_right, scale)
    ctx.mask_grad = attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
    max_q, max_k, dropout_p, causal, bottom_right, scale = ctx.settings
    dq, dk, dv, dmask = torch.ops.lmrt.attention_bwd(grad_out, q, k, v, out, lse, attn_mask, cu_seqlens_q,
                                                     cu_seqlens_k, max_q, max_k, dropout_p, seed, causal,
                                                     bottom_right, scale, ctx.mask_grad)
    dmask = dmask.to(attn_mask.dtype) if ctx.mask_grad else None
    return dq, dk, dv, dmask, None, None, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
