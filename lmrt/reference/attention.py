"""Scaled-dot-product attention in plain PyTorch: the `torch` backend and the tests' ground truth.

`attention_fwd` and `attention_bwd` follow the kernels' contract on the canonical (batch, heads, rows, dim)
layout: the forward returns the output and the row log-sum-exp (+inf for a row that sees no key), and the
backward recomputes the probabilities from the scores, as exactly as the forward did. `attention`,
`scaled_dot_product_attention`, `flash_attn_func` and `flash_attn_varlen_func` are plain differentiable functions
with the public call signatures.

Dropout draws the same Philox 4x32-10 stream as the Triton kernels (`tl.rand`): the keep mask of element
(sequence, head, query, key) is a function of the seed and that element's flat index, so every backend drops
the same probabilities for the same seed, and the tests can rebuild the mask a kernel used.
"""

from __future__ import annotations

import math

import torch

from lmrt.reference._dtypes import compute_dtype

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_UINT_TO_UNIFORM = 4.6566127342e-10  # tl.rand's scale: the largest x with (2**31 - 1) * x < 1 in float32


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product of the 32-bit constant `a` and 32-bit values `b` (in int64),
    from 16-bit limbs so that no intermediate overflows int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_lo, lo_hi, hi_lo = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo
    carry = ((lo_lo >> 16) + (lo_hi & 0xFFFF) + (hi_lo & 0xFFFF)) >> 16
    high = a_hi * b_hi + (lo_hi >> 16) + (hi_lo >> 16) + carry
    low = (lo_lo + ((lo_hi + hi_lo) << 16)) & _MASK32
    return high, low


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """tl.rand(seed, offsets): float32 uniforms in [0, 1) from Philox 4x32 with 10 rounds, bit for bit."""
    key0, key1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2, c3 = torch.zeros_like(offsets), torch.zeros_like(offsets)
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ key0, lo_b, hi_a ^ c3 ^ key1, lo_a
        key0, key1 = (key0 + _PHILOX_KEY_A) & _MASK32, (key1 + _PHILOX_KEY_B) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # the uint32 read as int32
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_UINT_TO_UNIFORM, dtype=torch.float32)


def dropout_keep_mask(seed: int, shape: tuple[int, int, int, int], dropout_p: float, device) -> torch.Tensor:
    """The boolean keep mask of attention dropout over (sequences, heads, query rows, keys) for `seed`.

    Element (s, h, i, j) is kept when its uniform draw at flat index ((s * heads + h) * rows + i) * keys + j
    is at least `dropout_p` (compared in float32), as in the kernels.
    """
    offsets = torch.arange(math.prod(shape), dtype=torch.int64, device=device).view(shape)
    return philox_uniform(seed, offsets) >= torch.tensor(dropout_p, dtype=torch.float32)


def _visible(rows: int, keys: int, causal: bool, bottom_right: bool, device) -> torch.Tensor | None:
    """Causal visibility (rows, keys): key j is visible to query i when j <= i (+ keys - rows if bottom_right)."""
    if not causal:
        return None
    shift = keys - rows if bottom_right else 0
    return torch.ones(rows, keys, dtype=torch.bool, device=device).tril(shift)


def _scores(q, k, attn_mask, causal, bottom_right, scale, dtype):
    """scale * q k^T plus the additive mask, -inf where a boolean mask or causality hides a key."""
    k = _repeat_heads(k, q.shape[-3], dtype)
    s = scale * (q.to(dtype) @ k.transpose(-1, -2))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask.to(dtype)
    visible = _visible(q.shape[-2], k.shape[-2], causal, bottom_right, q.device)
    return s if visible is None else s.masked_fill(~visible, -math.inf)


def _probabilities(s: torch.Tensor) -> torch.Tensor:
    """softmax(s) over the keys as torch.softmax computes it, exp(s - max) / sum, and 0 in a row that sees no key.
    exp(s - lse) would carry the rounding of lse (float32's for the kernels' saved one), an ulp of the largest
    score: 6e-5 relative at scores near 1000."""
    empty = (s == -math.inf).all(-1, keepdim=True)
    return torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)


def _group_size(n_heads: int, n_kv_heads: int) -> int:
    """Query heads per key/value head; with no key/value heads there are no query heads either."""
    return n_heads // n_kv_heads if n_kv_heads else 1


def _repeat_heads(t: torch.Tensor, n_heads: int, dtype) -> torch.Tensor:
    return t.to(dtype).repeat_interleave(_group_size(n_heads, t.shape[-3]), dim=-3)


def _sum_groups(grad: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Sum a per-query-head gradient over each key/value head's group of query heads."""
    batch, n_heads, *rest = grad.shape
    return grad.view(batch, n_kv_heads, _group_size(n_heads, n_kv_heads), *rest).sum(2)


def _dense_fwd(q, k, v, attn_mask, keep, causal, bottom_right, scale, dropout_p):
    dtype = compute_dtype(q.dtype)
    s = _scores(q, k, attn_mask, causal, bottom_right, scale, dtype)
    lse = torch.logsumexp(s, -1)
    lse = lse.masked_fill(lse == -math.inf, math.inf)  # a row that sees no key: the kernels' exp(s - lse) is 0
    p = _probabilities(s)
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return (p @ _repeat_heads(v, q.shape[-3], dtype)).to(q.dtype), lse.to(torch.float32)


def _dense_bwd(dout, q, k, v, out, attn_mask, keep, causal, bottom_right, scale, dropout_p):
    dtype = compute_dtype(q.dtype)
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    p = _probabilities(_scores(q, k, attn_mask, causal, bottom_right, scale, dtype))
    do = dout.to(dtype)
    dp = do @ _repeat_heads(v, n_heads, dtype).transpose(-1, -2)
    p_dropped = p
    if keep is not None:
        p_dropped = p * keep / (1 - dropout_p)
        dp = dp * keep / (1 - dropout_p)
    dv = _sum_groups(p_dropped.transpose(-1, -2) @ do, n_kv_heads)
    delta = (do * out.to(dtype)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = scale * (ds @ _repeat_heads(k, n_heads, dtype))
    dk = _sum_groups(scale * (ds.transpose(-1, -2) @ q.to(dtype)), n_kv_heads)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """(index, query rows slice, key rows slice) of each packed sequence."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(starts_q) - 1):
        yield i, slice(starts_q[i], starts_q[i + 1]), slice(starts_k[i], starts_k[i + 1])


def _keep_mask(seed, dropout_p, n_seqs, n_heads, max_seqlen_q, max_seqlen_k, device):
    if dropout_p <= 0:
        return None
    return dropout_keep_mask(int(seed.item()), (n_seqs, n_heads, max_seqlen_q, max_seqlen_k), dropout_p, device)


def attention_fwd(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seed,
                  causal, bottom_right, scale):
    """(output (batch, Hq, Lq, Dv), float32 log-sum-exp (batch, Hq, Lq)); arguments as the Triton launcher's."""
    if cu_seqlens_q is None:
        keep = _keep_mask(seed, dropout_p, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
        return _dense_fwd(q, k, v, attn_mask, keep, causal, bottom_right, scale, dropout_p)
    keep = _keep_mask(seed, dropout_p, cu_seqlens_q.numel() - 1, q.shape[1], max_seqlen_q, max_seqlen_k, q.device)
    out = q.new_zeros(*q.shape[:3], v.shape[-1])
    lse = torch.full(q.shape[:3], math.inf, dtype=torch.float32, device=q.device)
    for i, rows, keys in _sequences(cu_seqlens_q, cu_seqlens_k):
        seq_keep = None if keep is None else keep[i : i + 1, :, : rows.stop - rows.start, : keys.stop - keys.start]
        out[:, :, rows], lse[:, :, rows] = _dense_fwd(q[:, :, rows], k[:, :, keys], v[:, :, keys], None, seq_keep,
                                                      causal, bottom_right, scale, dropout_p)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  dropout_p, seed, causal, bottom_right, scale):
    """(dq, dk, dv, d scores): the gradients of `attention_fwd`, the last one (batch, Hq, Lq, Lk) in the compute
    dtype (float64 for float64 queries, else float32), or None for packed sequences. `lse` is
    the kernels' contract; this dense form recomputes the probabilities from the scores instead, exactly."""
    if cu_seqlens_q is None:
        keep = _keep_mask(seed, dropout_p, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
        return _dense_bwd(dout, q, k, v, out, attn_mask, keep, causal, bottom_right, scale, dropout_p)
    keep = _keep_mask(seed, dropout_p, cu_seqlens_q.numel() - 1, q.shape[1], max_seqlen_q, max_seqlen_k, q.device)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i, rows, keys in _sequences(cu_seqlens_q, cu_seqlens_k):
        seq_keep = None if keep is None else keep[i : i + 1, :, : rows.stop - rows.start, : keys.stop - keys.start]
        dq[:, :, rows], dk[:, :, keys], dv[:, :, keys], _ = _dense_bwd(
            dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows], None, seq_keep, causal,
            bottom_right, scale, dropout_p)
    return dq, dk, dv, None


def default_scale(head_dim: int) -> float:
    """1 / sqrt(head_dim), PyTorch's default; 1 for head dim 0, whose scores are 0 whatever the scale (PyTorch then
    attends uniformly too)."""
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


# Differentiable forms with the public call signatures. Dropout, when `dropout_p` > 0, applies `dropout_mask`
# (boolean, True = keep, broadcast like the scores) if given, else a fresh Bernoulli mask.

def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, bottom_right=False,
              dropout_mask=None):
    """softmax(scale * q k^T + mask) v over (..., heads, rows, dim) tensors; key/value heads may divide the query
    heads (grouped-query attention). A row that sees no key gives zeros."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    dtype = compute_dtype(q.dtype)
    s = _scores(q, k, attn_mask, is_causal, bottom_right, scale, dtype)
    p = _probabilities(s)
    if dropout_p > 0:
        keep = torch.rand_like(p) >= dropout_p if dropout_mask is None else dropout_mask
        p = p * keep / (1 - dropout_p)
    return (p @ _repeat_heads(v, q.shape[-3], dtype)).to(q.dtype)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, dropout_mask=None):
    """F.scaled_dot_product_attention's semantics (top-left causal alignment); fully masked rows give zeros."""
    tensors = (query, key, value)
    if min(t.dim() for t in tensors) == 2:  # (length, dim) inputs, which F takes: as one head
        out = scaled_dot_product_attention(*(t if t.dim() >= 3 else t[None] for t in tensors), attn_mask, dropout_p,
                                           is_causal, scale, enable_gqa, dropout_mask)
        return out if max(t.dim() for t in tensors) >= 3 else out[0]
    if not enable_gqa and min(t.dim() for t in tensors) >= 3:
        # The heads dim is a batch dim: the three broadcast together.
        heads = torch.broadcast_shapes(*(t.shape[-3:-2] for t in (query, key, value)))
        query, key, value = (t.expand(*t.shape[:-3], *heads, *t.shape[-2:]) for t in (query, key, value))
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, dropout_mask=dropout_mask)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, dropout_mask=None):
    """flash-attn's call on (batch, seq, heads, dim) tensors, with bottom-right causal alignment."""
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, dropout_p, causal, softmax_scale,
                    bottom_right=True, dropout_mask=dropout_mask)
    return out.transpose(1, 2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, dropout_mask=None):
    """flash-attn's packed call: q (total_q, heads, dim), sequences split by cu_seqlens; `dropout_mask`, if given,
    is (sequences, heads, max_seqlen_q, max_seqlen_k)."""
    outputs = []
    for i, rows, keys in _sequences(cu_seqlens_q, cu_seqlens_k):
        mask = None
        if dropout_mask is not None:
            mask = dropout_mask[i, :, : rows.stop - rows.start, : keys.stop - keys.start]
        outputs.append(flash_attn_func(q[None, rows], k[None, keys], v[None, keys], dropout_p, softmax_scale, causal,
                                       mask)[0])
    return torch.cat(outputs) if outputs else q.new_zeros(0, q.shape[1], v.shape[-1])
