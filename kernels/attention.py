"""Fused scaled-dot-product attention, forward and backward, in Triton: the FlashAttention-2 algorithm.

Shapes. Every tensor is seen as (batch, heads, rows, head dim) through its strides, with a unit stride on the
head dim; a (batch, seq, heads, dim) tensor is the same thing transposed, so both layouts are served in place.
Packed variable-length batches are one "batch" of all tokens, split into sequences by cu_seqlens; there every
batch stride is 0 and a sequence's first row is cu_seqlens[i]. Key/value heads may be fewer than query heads
(grouped-query attention): query head h reads key/value head h // group_size, and nothing is repeated in memory.

Forward. One program per block of BLOCK_M query rows of one head. It streams blocks of BLOCK_N keys and values
past its queries, keeping a running row max m, row sum l and output accumulator in float32 (online softmax):
nothing of size Lq x Lk is ever stored. Scores are kept in base 2 (log2(e) folded into the scale, so exp2 does
the work). It writes the output and the log-sum-exp of each row (natural log), which the backward needs.
Causal attention visits only the key blocks a row can see, and only the blocks that cross the diagonal or the
end of the keys pay for masking. A row that sees no key at all writes zeros, and +inf as its log-sum-exp, so
that the backward's probabilities exp(s - lse) are 0 there rather than NaN.

Backward. A first pass computes delta = rowsum(dO * O) per query row. Then the probabilities are recomputed
from Q, K and the saved log-sum-exp:
    P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q.
One kernel gives each program a block of keys of one key/value head and loops over every query block of every
query head in its group, accumulating dK and dV in registers; another gives each program a block of query rows
and loops over key blocks for dQ. Each gradient element is written once by one program: no atomics, so the
backward is bitwise deterministic.

Masks. An optional boolean (True = attend) or additive float mask is read through four strides, so a mask
broadcast over batch, heads or rows (a key-padding mask) is never materialized. Causal masking is top-left
(key j is visible to query i when j <= i, SDPA's rule) or bottom-right (j <= i + Lk - Lq, flash-attn's rule).

Dropout. The keep mask of each (sequence, head, query, key) element comes from Philox (tl.rand) on a seed read
from device memory and the element's position, so the backward regenerates the same mask instead of storing it.

Precision. Dots run on the inputs' dtype with float32 accumulation; float32 inputs use full-precision dots unless
the caller asks for TF32. The Triton interpreter computes bfloat16 dots wrongly, so under it bfloat16 operands go
to the dot as float32 (the same values; their products are exact in float32 either way).
"""

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

_LOG2E = tl.constexpr(1.4426950408889634)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_LN2 = tl.constexpr(0.6931471805599453)

# attn_mask kinds (the MASK_KIND constexpr)
NO_MASK, BOOL_MASK, ADDITIVE_MASK = 0, 1, 2


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation; UPCAST gives the dot float32 copies of the operands (interpreter bf16)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _sequence(cu_seqlens_ptr, seq, seqlen, VARLEN: tl.constexpr):
    """(first row as int64, length) of sequence `seq`: from cu_seqlens when packed, else (0, seqlen)."""
    if VARLEN:
        start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        return start, (tl.load(cu_seqlens_ptr + seq + 1) - start).to(tl.int32)
    return seq.to(tl.int64) * 0, seqlen


@triton.jit
def _causal_shift(q_len, k_len, BOTTOM_RIGHT: tl.constexpr):
    """Query row i sees keys j <= i + shift: 0 for top-left alignment, Lk - Lq for bottom-right."""
    if BOTTOM_RIGHT:
        return k_len - q_len
    return q_len * 0


@triton.jit
def _key_spans(m0, q_len, k_len, shift, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query rows [m0, m0 + BLOCK_M): keys [0, full_end) need no mask, keys [full_end, end) need one."""
    if CAUSAL:
        end = tl.minimum(k_len, tl.maximum(m0 + BLOCK_M + shift, 0))
        full_end = tl.minimum(tl.maximum(m0 + shift + 1, 0), k_len) // BLOCK_N * BLOCK_N
    else:
        end = k_len
        full_end = k_len // BLOCK_N * BLOCK_N
    return full_end, end


@triton.jit
def _mask_log2(mask):
    """An additive mask in base-2 units. A finite value beyond FLT_MAX / log2 e would overflow: the dtype's minimum,
    which Hugging Face masks use, to -inf, which means "no key", so a row masked that way would give zeros where
    PyTorch averages the values, and the dtype's maximum to +inf, whose row max made the row NaN. Such values become
    -FLT_MAX or FLT_MAX instead. Infinities and NaN stay as they are."""
    scaled = mask * _LOG2E
    overflowed = (tl.abs(scaled) == float("inf")) & (tl.abs(mask) < float("inf"))
    return tl.where(overflowed, tl.where(mask < 0, -_FLT_MAX, _FLT_MAX), scaled)


@triton.jit
def _scores(qk, rows, cols, q_len, k_len, shift, qk_scale2, mask_base, stride_mm, stride_mn,
            CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BOUNDS: tl.constexpr):
    """Scores in base-2 units (qk * scale * log2 e, plus the additive mask), -inf where a key is masked out.

    `rows` and `cols` are the query and key indices, broadcast to the shape of `qk` (either orientation).
    BOUNDS: this block crosses the causal diagonal or the end of the keys, so those masks apply.
    """
    s = qk * qk_scale2
    if MASK_KIND != 0:
        in_bounds = (rows < q_len) & (cols < k_len)
        mask = tl.load(mask_base + rows * stride_mm + cols * stride_mn, mask=in_bounds, other=0)
        if MASK_KIND == 1:
            s = tl.where(mask != 0, s, float("-inf"))
        else:
            s += _mask_log2(mask.to(tl.float32))
    if BOUNDS:
        visible = cols < k_len
        if CAUSAL:
            visible = visible & (cols <= rows + shift)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _dropout_keep(seed, rng_base, rows, cols, rng_row_stride, dropout_p):
    """Which probabilities survive dropout: one Philox draw per (sequence, head, query, key) position."""
    return tl.rand(seed, rng_base + rows.to(tl.int64) * rng_row_stride + cols) >= dropout_p


@triton.jit
def _fwd_step(acc, l_i, m_i, q, start_n, offs_m, offs_n, offs_d, offs_dv, k_base, v_base, mask_base,
              stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, shift, qk_scale2,
              seed, rng_base, rng_row_stride, dropout_p,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
              DROPOUT: tl.constexpr, BOUNDS: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One block of keys and values into the running (acc, l, m) of a block of query rows."""
    cols = start_n + offs_n
    key_ok = cols < k_len if BOUNDS else cols >= 0
    k_t = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                  mask=(offs_d[:, None] < HEAD_DIM) & key_ok[None, :], other=0.0)
    s = _scores(_dot(q, k_t, PRECISION, UPCAST_DOT), offs_m[:, None], cols[None, :], q_len, k_len, shift,
                qk_scale2, mask_base, stride_mm, stride_mn, CAUSAL, MASK_KIND, BOUNDS)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # While a row has seen only masked keys its max is -inf: subtract 0 instead, so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_dropout_keep(seed, rng_base, offs_m[:, None], cols[None, :], rng_row_stride, dropout_p), p, 0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :],
                mask=key_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST_DOT)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seed_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
    n_heads, group_size, seqlen_q, seqlen_k, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start, q_len = _sequence(cu_seqlens_q_ptr, seq, seqlen_q, VARLEN)
    if m0 >= q_len:
        return
    k_start, k_len = _sequence(cu_seqlens_k_ptr, seq, seqlen_k, VARLEN)
    seq64, head64 = seq.to(tl.int64), head.to(tl.int64)
    kv_head64 = head64 // group_size
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len

    q_base = q_ptr + seq64 * stride_qb + head64 * stride_qh + q_start * stride_qm
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = k_ptr + seq64 * stride_kb + kv_head64 * stride_kh + k_start * stride_kn
    v_base = v_ptr + seq64 * stride_vb + kv_head64 * stride_vh + k_start * stride_vn
    if MASK_KIND != 0:
        mask_base = mask_ptr + seq64 * stride_mb + head64 * stride_mh
    else:
        mask_base = mask_ptr
    if DROPOUT:
        seed = tl.load(seed_ptr)
        rng_base = (seq64 * n_heads + head64) * seqlen_q * seqlen_k
    else:
        seed = 0
        rng_base = 0

    shift = _causal_shift(q_len, k_len, BOTTOM_RIGHT)
    full_end, end = _key_spans(m0, q_len, k_len, shift, CAUSAL, BLOCK_M, BLOCK_N)
    qk_scale2 = sm_scale * _LOG2E
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, start_n, offs_m, offs_n, offs_d, offs_dv, k_base, v_base,
                                  mask_base, stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, shift,
                                  qk_scale2, seed, rng_base, seqlen_k, dropout_p, HEAD_DIM, HEAD_DIM_V, CAUSAL,
                                  MASK_KIND, DROPOUT, False, PRECISION, UPCAST_DOT)
    for start_n in range(full_end, end, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, start_n, offs_m, offs_n, offs_d, offs_dv, k_base, v_base,
                                  mask_base, stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, shift,
                                  qk_scale2, seed, rng_base, seqlen_k, dropout_p, HEAD_DIM, HEAD_DIM_V, CAUSAL,
                                  MASK_KIND, DROPOUT, True, PRECISION, UPCAST_DOT)

    empty = l_i == 0.0  # the row saw no key: output 0, log-sum-exp +inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out / (1.0 - dropout_p)
    out_base = out_ptr + seq64 * stride_ob + head64 * stride_oh + q_start * stride_om
    tl.store(out_base + offs_m[:, None] * stride_om + offs_dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    tl.store(lse_ptr + seq64 * stride_lb + head64 * stride_lh + q_start + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    out_ptr, dout_ptr, delta_ptr, cu_seqlens_q_ptr,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, seqlen_q,
    HEAD_DIM_V: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta = rowsum(dO * O) in float32, laid out like the log-sum-exp."""
    m0 = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start, q_len = _sequence(cu_seqlens_q_ptr, seq, seqlen_q, VARLEN)
    if m0 >= q_len:
        return
    seq64, head64 = seq.to(tl.int64), head.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < q_len) & (offs_dv[None, :] < HEAD_DIM_V)
    rows = (q_start + offs_m)[:, None]
    out = tl.load(out_ptr + seq64 * stride_ob + head64 * stride_oh + rows * stride_om + offs_dv[None, :],
                  mask=ok, other=0.0)
    dout = tl.load(dout_ptr + seq64 * stride_dob + head64 * stride_doh + rows * stride_dom + offs_dv[None, :],
                   mask=ok, other=0.0)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
    tl.store(delta_ptr + seq64 * stride_lb + head64 * stride_lh + q_start + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def _probabilities(s, lse2):
    """The backward's P = 2^(s - lse2), at most 1. lse2 is the forward's natural-log lse times log2 e, and past
    |lse| ~ 2^31 (scores near 1e12, or a mask of the dtype's maximum) the two roundings differ by more than exp2's
    range: a score above its row's lse2 gave inf, and inf times a zero dP NaN. NaN stays NaN."""
    return tl.math.exp2(tl.minimum(s - lse2, 0.0, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _dkdv_step(dk, dv, k, v, start_m, offs_m, cols, offs_d, offs_dv, q_base, do_base, lse_base, delta_base,
               mask_base, stride_qm, stride_dom, stride_mm, stride_mn, q_len, k_len, shift, qk_scale2,
               seed, rng_base, rng_row_stride, dropout_p,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
               DROPOUT: tl.constexpr, BOUNDS: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One block of query rows into the dK and dV of a block of keys; works on transposed (key, query) tiles."""
    rows = start_m + offs_m
    row_ok = rows < q_len if BOUNDS else rows >= 0
    q_t = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None],
                  mask=(offs_d[:, None] < HEAD_DIM) & row_ok[None, :], other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dom + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    s_t = _scores(_dot(k, q_t, PRECISION, UPCAST_DOT), rows[None, :], cols[:, None], q_len, k_len, shift,
                  qk_scale2, mask_base, stride_mm, stride_mn, CAUSAL, MASK_KIND, BOUNDS)
    p_t = _probabilities(s_t, lse2[None, :])
    if BOUNDS:
        # Rows past the queries hold q = 0, and 0 times an infinite key is NaN, which would reach dK and dV.
        p_t = tl.where(row_ok[None, :], p_t, 0.0)
    dp_t = _dot(v, tl.trans(do), PRECISION, UPCAST_DOT)
    if DROPOUT:
        keep = _dropout_keep(seed, rng_base, rows[None, :], cols[:, None], rng_row_stride, dropout_p)
        inv_keep = 1.0 / (1.0 - dropout_p)
        dv += _dot(tl.where(keep, p_t * inv_keep, 0.0).to(do.dtype), do, PRECISION, UPCAST_DOT)
        dp_t = tl.where(keep, dp_t * inv_keep, 0.0)
    else:
        dv += _dot(p_t.to(do.dtype), do, PRECISION, UPCAST_DOT)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q_t.dtype), tl.trans(q_t), PRECISION, UPCAST_DOT)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr, seed_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    n_heads, group_size, seqlen_q, seqlen_k, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dK and dV of one block of BLOCK_N keys of one key/value head, summed over the query heads of its group."""
    n0 = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    k_start, k_len = _sequence(cu_seqlens_k_ptr, seq, seqlen_k, VARLEN)
    if n0 >= k_len:
        return
    q_start, q_len = _sequence(cu_seqlens_q_ptr, seq, seqlen_q, VARLEN)
    seq64, kv_head64 = seq.to(tl.int64), kv_head.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_ok = cols < k_len

    k_rows = k_ptr + seq64 * stride_kb + kv_head64 * stride_kh + (k_start + cols[:, None]) * stride_kn
    k = tl.load(k_rows + offs_d[None, :], mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v_rows = v_ptr + seq64 * stride_vb + kv_head64 * stride_vh + (k_start + cols[:, None]) * stride_vn
    v = tl.load(v_rows + offs_dv[None, :], mask=key_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    else:
        seed = 0

    shift = _causal_shift(q_len, k_len, BOTTOM_RIGHT)
    # Query blocks [m_lo, m_full) cross the causal diagonal, [m_full, q_even) see every key of this block, and
    # [max(m_full, q_even), q_end) hold the last, partial block of rows.
    if CAUSAL:
        m_lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
        m_full = (tl.maximum(n0 + BLOCK_N - 1 - shift, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        m_lo = 0
        m_full = 0
    q_even = q_len // BLOCK_M * BLOCK_M
    q_end = (q_len + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    qk_scale2 = sm_scale * _LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for head64 in range(kv_head64 * group_size, kv_head64 * group_size + group_size):
        q_base = q_ptr + seq64 * stride_qb + head64 * stride_qh + q_start * stride_qm
        do_base = dout_ptr + seq64 * stride_dob + head64 * stride_doh + q_start * stride_dom
        lse_base = lse_ptr + seq64 * stride_lb + head64 * stride_lh + q_start
        delta_base = delta_ptr + seq64 * stride_lb + head64 * stride_lh + q_start
        if MASK_KIND != 0:
            mask_base = mask_ptr + seq64 * stride_mb + head64 * stride_mh
        else:
            mask_base = mask_ptr
        if DROPOUT:
            rng_base = (seq64 * n_heads + head64) * seqlen_q * seqlen_k
        else:
            rng_base = 0
        for start_m in range(m_lo, tl.minimum(m_full, q_end), BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, start_m, offs_m, cols, offs_d, offs_dv, q_base, do_base, lse_base,
                                delta_base, mask_base, stride_qm, stride_dom, stride_mm, stride_mn, q_len, k_len,
                                shift, qk_scale2, seed, rng_base, seqlen_k, dropout_p, HEAD_DIM, HEAD_DIM_V,
                                CAUSAL, MASK_KIND, DROPOUT, True, PRECISION, UPCAST_DOT)
        for start_m in range(m_full, q_even, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, start_m, offs_m, cols, offs_d, offs_dv, q_base, do_base, lse_base,
                                delta_base, mask_base, stride_qm, stride_dom, stride_mm, stride_mn, q_len, k_len,
                                shift, qk_scale2, seed, rng_base, seqlen_k, dropout_p, HEAD_DIM, HEAD_DIM_V,
                                CAUSAL, MASK_KIND, DROPOUT, False, PRECISION, UPCAST_DOT)
        for start_m in range(tl.maximum(m_full, q_even), q_end, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, start_m, offs_m, cols, offs_d, offs_dv, q_base, do_base, lse_base,
                                delta_base, mask_base, stride_qm, stride_dom, stride_mm, stride_mn, q_len, k_len,
                                shift, qk_scale2, seed, rng_base, seqlen_k, dropout_p, HEAD_DIM, HEAD_DIM_V,
                                CAUSAL, MASK_KIND, DROPOUT, True, PRECISION, UPCAST_DOT)

    dk_rows = dk_ptr + seq64 * stride_dkb + kv_head64 * stride_dkh + (k_start + cols[:, None]) * stride_dkn
    tl.store(dk_rows + offs_d[None, :], (dk * sm_scale).to(dk_ptr.dtype.element_ty),
             mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    dv_rows = dv_ptr + seq64 * stride_dvb + kv_head64 * stride_dvh + (k_start + cols[:, None]) * stride_dvn
    tl.store(dv_rows + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=key_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_step(dq, q, do, lse2, delta, start_n, offs_m, offs_n, offs_d, offs_dv, k_base, v_base, mask_base,
             dmask_base, stride_kn, stride_vn, stride_mm, stride_mn, stride_dmm, q_len, k_len, shift, qk_scale2,
             seed, rng_base, rng_row_stride, dropout_p,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
             DROPOUT: tl.constexpr, STORE_DMASK: tl.constexpr, BOUNDS: tl.constexpr, PRECISION: tl.constexpr,
             UPCAST_DOT: tl.constexpr):
    """One block of keys into the dQ of a block of query rows."""
    cols = start_n + offs_n
    key_ok = cols < k_len if BOUNDS else cols >= 0
    k_t = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                  mask=(offs_d[:, None] < HEAD_DIM) & key_ok[None, :], other=0.0)
    v_t = tl.load(v_base + cols[None, :] * stride_vn + offs_dv[:, None],
                  mask=(offs_dv[:, None] < HEAD_DIM_V) & key_ok[None, :], other=0.0)
    s = _scores(_dot(q, k_t, PRECISION, UPCAST_DOT), offs_m[:, None], cols[None, :], q_len, k_len, shift,
                qk_scale2, mask_base, stride_mm, stride_mn, CAUSAL, MASK_KIND, BOUNDS)
    p = _probabilities(s, lse2[:, None])
    dp = _dot(do, v_t, PRECISION, UPCAST_DOT)
    if DROPOUT:
        keep = _dropout_keep(seed, rng_base, offs_m[:, None], cols[None, :], rng_row_stride, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if STORE_DMASK:
        tl.store(dmask_base + offs_m[:, None] * stride_dmm + cols[None, :], ds,
                 mask=(offs_m[:, None] < q_len) & (cols[None, :] < k_len))
    dq += _dot(ds.to(k_t.dtype), tl.trans(k_t), PRECISION, UPCAST_DOT)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, dmask_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr, seed_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh,
    stride_dqb, stride_dqh, stride_dqm, stride_dmb, stride_dmh, stride_dmm,
    n_heads, group_size, seqlen_q, seqlen_k, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr, STORE_DMASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ of one block of BLOCK_M query rows of one head; with STORE_DMASK also dS, the additive mask's gradient."""
    m0 = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start, q_len = _sequence(cu_seqlens_q_ptr, seq, seqlen_q, VARLEN)
    if m0 >= q_len:
        return
    k_start, k_len = _sequence(cu_seqlens_k_ptr, seq, seqlen_k, VARLEN)
    seq64, head64 = seq.to(tl.int64), head.to(tl.int64)
    kv_head64 = head64 // group_size
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len

    q_rows = q_ptr + seq64 * stride_qb + head64 * stride_qh + (q_start + offs_m[:, None]) * stride_qm
    q = tl.load(q_rows + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do_rows = dout_ptr + seq64 * stride_dob + head64 * stride_doh + (q_start + offs_m[:, None]) * stride_dom
    do = tl.load(do_rows + offs_dv[None, :], mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    stats = seq64 * stride_lb + head64 * stride_lh + q_start + offs_m
    lse2 = tl.load(lse_ptr + stats, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(delta_ptr + stats, mask=row_ok, other=0.0)
    k_base = k_ptr + seq64 * stride_kb + kv_head64 * stride_kh + k_start * stride_kn
    v_base = v_ptr + seq64 * stride_vb + kv_head64 * stride_vh + k_start * stride_vn
    if MASK_KIND != 0:
        mask_base = mask_ptr + seq64 * stride_mb + head64 * stride_mh
    else:
        mask_base = mask_ptr
    if STORE_DMASK:
        dmask_base = dmask_ptr + seq64 * stride_dmb + head64 * stride_dmh
    else:
        dmask_base = dmask_ptr
    if DROPOUT:
        seed = tl.load(seed_ptr)
        rng_base = (seq64 * n_heads + head64) * seqlen_q * seqlen_k
    else:
        seed = 0
        rng_base = 0

    shift = _causal_shift(q_len, k_len, BOTTOM_RIGHT)
    full_end, end = _key_spans(m0, q_len, k_len, shift, CAUSAL, BLOCK_M, BLOCK_N)
    qk_scale2 = sm_scale * _LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, start_n, offs_m, offs_n, offs_d, offs_dv, k_base, v_base, mask_base,
                      dmask_base, stride_kn, stride_vn, stride_mm, stride_mn, stride_dmm, q_len, k_len, shift,
                      qk_scale2, seed, rng_base, seqlen_k, dropout_p, HEAD_DIM, HEAD_DIM_V, CAUSAL, MASK_KIND,
                      DROPOUT, STORE_DMASK, False, PRECISION, UPCAST_DOT)
    for start_n in range(full_end, end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, start_n, offs_m, offs_n, offs_d, offs_dv, k_base, v_base, mask_base,
                      dmask_base, stride_kn, stride_vn, stride_mm, stride_mn, stride_dmm, q_len, k_len, shift,
                      qk_scale2, seed, rng_base, seqlen_k, dropout_p, HEAD_DIM, HEAD_DIM_V, CAUSAL, MASK_KIND,
                      DROPOUT, STORE_DMASK, True, PRECISION, UPCAST_DOT)
    dq_rows = dq_ptr + seq64 * stride_dqb + head64 * stride_dqh + (q_start + offs_m[:, None]) * stride_dqm
    tl.store(dq_rows + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# Launch configurations, (BLOCK_M, BLOCK_N, num_warps, num_stages), per kernel and padded head dim (the larger of
# BLOCK_D and BLOCK_DV: 64 or less, 128, 256). BLOCK_M counts query rows and BLOCK_N keys in every kernel. Each
# list starts with tiles that compile for sm_90 without register spills (bfloat16, causal) under both triton 3.6
# and 3.9, read from the cubins' stack frames (benchmarks/attention_notes.md); CI checks the first of each list with
# its triton (tests/kernels/compile_for_gpu.py). The backward lists end with 4-warp tiles that do spill (0.2 to
# 1.2 kB of stack) yet ran the backward 1.2x (d = 64) to 2.6x (d = 128) faster on an H100, where the autotuner
# picked them. On a GPU each kernel is autotuned over its list, keyed on the head dims, causality, mask kind,
# dropout, packing, (implicitly) the dtypes and the launch's size class (_tuned); with LMRT_AUTOTUNE=0 it takes the
# first that fits the GPU's shared memory. The tables are sized for 16-bit inputs: float32 doubles every tile's
# shared memory and can outgrow them all (at head dim 256, or on GPUs with less shared memory than sm_90), so
# SMALL_CONFIGS, one small single-stage tile per kernel, closes every list for float32. The interpreter runs those
# same small tiles, whose distinct BLOCK_M and BLOCK_N make small test shapes cross many blocks and every mask path.
CONFIGS = {
    "fwd": {64: [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
            128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
            256: [(32, 64, 8, 3), (32, 32, 8, 3), (32, 16, 4, 3)]},
    "dkdv": {64: [(64, 32, 8, 3), (16, 128, 8, 3), (64, 16, 8, 3), (64, 64, 4, 3)],
             128: [(64, 32, 8, 3), (32, 32, 8, 3), (64, 16, 8, 3), (32, 64, 4, 3)],
             # No tile is spill-free under both: 0 and 56 bytes of stack (3.6, 3.9), then 16 and 40.
             256: [(32, 32, 8, 3), (32, 16, 4, 3)]},
    "dq": {64: [(128, 64, 8, 3), (64, 128, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
           128: [(32, 128, 8, 3), (64, 32, 8, 3), (32, 64, 8, 3), (32, 64, 4, 3), (64, 32, 4, 3)],
           256: [(16, 32, 4, 3)]},
}
SMALL_CONFIGS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
DELTA_BLOCK_M = 64
_TUNING_KEY = ["HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "MASK_KIND", "DROPOUT", "VARLEN"]


def head_dim_class(block_d: int, block_dv: int) -> int:
    """The key of CONFIGS for padded head dims `block_d` and `block_dv`."""
    return max(64, block_d, block_dv)


def _candidates(name: str, block_d: int, block_dv: int, dtype: torch.dtype) -> list[tuple[int, int, int, int]]:
    """The configurations kernel `name` may take for padded head dims `block_d`, `block_dv` and inputs of `dtype`."""
    table = CONFIGS[name][head_dim_class(block_d, block_dv)]
    return table + [SMALL_CONFIGS[name]] if dtype.itemsize > 2 else table


def _autotuned(name: str):
    """Kernel `name` autotuned over the configurations of every head-dim class, pruned to the call's class."""
    tables = CONFIGS[name]

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        wanted = set(_candidates(name, args["BLOCK_D"], args["BLOCK_DV"], args["q_ptr"].dtype))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    configs = {config for table in tables.values() for config in table} | {SMALL_CONFIGS[name]}
    return triton.autotune(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in sorted(configs)],
        key=_TUNING_KEY, prune_configs_by={"early_config_prune": prune},
    )(_PLAIN[name])


_PLAIN = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


@functools.cache
def _tuned(name: str, work: int, loop: int):
    """Kernel `name` autotuned for the launches of one size class: `work`, the rows that its programs own in all,
    and `loop`, the length of the other side that each program walks, both rounded up to powers of two.

    Triton's autotuner keys on kernel arguments only, so a single autotuner kept the tile it chose on its first
    launch for every later size. A grid too small to fill the GPU favours small tiles that are slow on one that
    does, and a first launch is often small: the benchmarks check each case on one batch of two heads before timing
    it, and a model may be run once on a short input first. An autotuner per size class tunes each class on its
    own launches; the compiled kernels are shared (they are the JIT function's).
    """
    return _autotuned(name)


# Without the autotuner: the configuration each launch variant took, the first of its list that fit the GPU.
_FITTING: dict[tuple, tuple[int, int, int, int]] = {}


def _use_autotuner(device: torch.device) -> bool:
    """Autotune on a GPU unless LMRT_AUTOTUNE=0 (the test suite sets it: it launches hundreds of variants once)."""
    return device.type == "cuda" and os.environ.get("LMRT_AUTOTUNE", "1") != "0"


def _launch(name: str, device: torch.device, grid_rows: int, grid_rest: tuple[int, int], loop_len: int, *args,
            **constexprs):
    """Launch kernel `name` over (blocks of `grid_rows` rows, *grid_rest), each program walking `loop_len` rows of
    the other side: autotuned on a GPU; else, on a GPU, the first configuration of its list that fits the GPU's
    shared memory, or the interpreter's small one."""
    row_block = "BLOCK_N" if name == "dkdv" else "BLOCK_M"  # the dK/dV kernel's programs own blocks of keys
    if _use_autotuner(device):
        work = triton.next_power_of_2(grid_rows * math.prod(grid_rest))
        tuned = _tuned(name, work, triton.next_power_of_2(max(loop_len, 1)))
        tuned[lambda meta: (triton.cdiv(grid_rows, meta[row_block]), *grid_rest)](*args, **constexprs)
        return
    key = (name, device, args[0].dtype, *constexprs.items())
    if device.type != "cuda":
        candidates = [SMALL_CONFIGS[name]]
    elif key in _FITTING:
        candidates = [_FITTING[key]]
    else:
        candidates = _candidates(name, constexprs["BLOCK_D"], constexprs["BLOCK_DV"], args[0].dtype)
    for config in candidates:
        block_m, block_n, num_warps, num_stages = config
        blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n)
        grid = (triton.cdiv(grid_rows, blocks[row_block]), *grid_rest)
        try:
            _PLAIN[name][grid](*args, **constexprs, **blocks, num_warps=num_warps, num_stages=num_stages)
        except OutOfResources as error:  # raised before the launch, so nothing was written: try a smaller tile
            too_large = error
            continue
        _FITTING[key] = config
        return
    raise too_large


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _block_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dim >= 16


def _precision(dtype: torch.dtype, device: torch.device) -> tuple[str, bool]:
    """(input_precision of float32 dots, upcast bfloat16 dots): TF32 only when torch's matmuls may use it."""
    if device.type != "cuda":
        return "ieee", dtype == torch.bfloat16
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return ("tf32" if tf32 else "ieee"), False


def _strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (batch, heads, rows, dim) tensor; a packed batch has no batch stride."""
    return (0 if varlen else t.stride(0)), t.stride(1), t.stride(2)


def _mask_args(attn_mask: torch.Tensor | None):
    """(kernel tensor, four strides, MASK_KIND) of an (batch, heads, Lq, Lk) view of a boolean or float mask."""
    if attn_mask is None:
        return None, (0, 0, 0, 0), NO_MASK
    if attn_mask.dtype == torch.bool:
        return attn_mask.view(torch.uint8), attn_mask.stride(), BOOL_MASK
    return attn_mask, attn_mask.stride(), ADDITIVE_MASK


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    dropout_p: float, seed: torch.Tensor | None, causal: bool, bottom_right: bool, scale: float,
    heads_first_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) of softmax(scale * q k^T + mask) v, with dropout when `dropout_p` > 0.

    q is (batch, Hq, Lq, D), k (batch, Hk, Lk, D), v (batch, Hk, Lk, Dv), any strides; Hq a multiple of Hk.
    `attn_mask`, if given, is a (batch, Hq, Lq, Lk) view (broadcast dims with stride 0), boolean or float.
    Packed sequences: batch is 1, the rows are all tokens, `cu_seqlens_*` (int32, n + 1 entries) split them and
    `max_seqlen_*` bound each sequence's length; unpacked, the lengths are the tensors' (`max_seqlen_*` are unread, so
    that a call recorded by torch.jit.trace, where they are constants, serves other lengths). `seed` is an int64
    device tensor, read by the kernel.
    The output is (batch, Hq, Lq, Dv), stored heads-first when `heads_first_out`, else rows-first (a
    (batch, Lq, Hq, Dv) tensor transposed); the log-sum-exp is float32 (batch, Hq, Lq), +inf for empty rows.
    """
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    batch, n_heads, rows, head_dim = q.shape
    head_dim_v = v.shape[-1]
    varlen = cu_seqlens_q is not None
    if not varlen:
        max_seqlen_q, max_seqlen_k = rows, k.shape[2]
    out_shape = (batch, n_heads, rows, head_dim_v) if heads_first_out else (batch, rows, n_heads, head_dim_v)
    out = (torch.zeros if varlen else torch.empty)(out_shape, dtype=q.dtype, device=q.device)
    out = out if heads_first_out else out.transpose(1, 2)
    lse = torch.full((batch, n_heads, rows), math.inf, dtype=torch.float32, device=q.device)
    n_seqs = cu_seqlens_q.numel() - 1 if varlen else batch
    if lse.numel() == 0 or n_seqs == 0:
        return out, lse
    mask, mask_strides, mask_kind = _mask_args(attn_mask)
    precision, upcast = _precision(q.dtype, q.device)
    _launch(
        "fwd", q.device, max_seqlen_q, (n_heads, n_seqs), max_seqlen_k,
        q, k, v, mask, out, lse, cu_seqlens_q, cu_seqlens_k, seed,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *mask_strides,
        *_strides3(out, varlen), 0 if varlen else lse.stride(0), lse.stride(1),
        n_heads, n_heads // k.shape[1], max_seqlen_q, max_seqlen_k, scale, dropout_p,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, CAUSAL=causal, BOTTOM_RIGHT=bottom_right, MASK_KIND=mask_kind,
        VARLEN=varlen, DROPOUT=dropout_p > 0, PRECISION=precision, UPCAST_DOT=upcast,
        BLOCK_D=_block_dim(head_dim), BLOCK_DV=_block_dim(head_dim_v),
    )
    return out, lse


def attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    attn_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, seed: torch.Tensor | None, causal: bool,
    bottom_right: bool, scale: float, mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, d attn_mask) of `attention_fwd`, the arguments as there.

    dq, dk, dv take the strides of q, k, v when those are dense with a unit last stride, else they are contiguous.
    With `mask_grad`, the float32 (batch, Hq, Lq, Lk) gradient of an additive mask (before any reduction over its
    broadcast dims); otherwise None.
    """
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    dout, out = _unit_last_stride(dout), _unit_last_stride(out)
    batch, n_heads, rows, head_dim = q.shape
    n_kv_heads, keys, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    varlen = cu_seqlens_q is not None
    if not varlen:
        max_seqlen_q, max_seqlen_k = rows, keys
    alloc = torch.zeros_like if varlen else torch.empty_like
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    dmask = torch.zeros((batch, n_heads, rows, keys), dtype=torch.float32, device=q.device) if mask_grad else None
    n_seqs = cu_seqlens_q.numel() - 1 if varlen else batch
    if n_seqs == 0 or n_heads == 0:  # without query heads, a key/value head that broadcasts over them gets zeros
        return dq, dk.zero_(), dv.zero_(), dmask
    delta = torch.empty_like(lse)
    lse_strides = (0 if varlen else lse.stride(0), lse.stride(1))
    if rows:
        _attn_bwd_delta_kernel[(triton.cdiv(max_seqlen_q, DELTA_BLOCK_M), n_heads, n_seqs)](
            out, dout, delta, cu_seqlens_q, *_strides3(out, varlen), *_strides3(dout, varlen), *lse_strides,
            max_seqlen_q, HEAD_DIM_V=head_dim_v, VARLEN=varlen, BLOCK_M=DELTA_BLOCK_M,
            BLOCK_DV=_block_dim(head_dim_v),
        )
    mask, mask_strides, mask_kind = _mask_args(attn_mask)
    precision, upcast = _precision(q.dtype, q.device)
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, CAUSAL=causal, BOTTOM_RIGHT=bottom_right,
                  MASK_KIND=mask_kind, VARLEN=varlen, DROPOUT=dropout_p > 0, PRECISION=precision,
                  UPCAST_DOT=upcast, BLOCK_D=_block_dim(head_dim), BLOCK_DV=_block_dim(head_dim_v))
    sizes = (n_heads, n_heads // n_kv_heads, max_seqlen_q, max_seqlen_k, scale, dropout_p)
    inputs = (*_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *mask_strides,
              *_strides3(dout, varlen), *lse_strides)
    if keys:
        _launch("dkdv", q.device, max_seqlen_k, (n_kv_heads, n_seqs), max_seqlen_q,
                q, k, v, mask, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, seed,
                *inputs, *_strides3(dk, varlen), *_strides3(dv, varlen), *sizes, **common)
    if rows:
        dmask_strides = (0, 0, 0) if dmask is None else dmask.stride()[:3]
        _launch("dq", q.device, max_seqlen_q, (n_heads, n_seqs), max_seqlen_k,
                q, k, v, mask, dout, lse, delta, dq, dmask, cu_seqlens_q, cu_seqlens_k, seed,
                *inputs, *_strides3(dq, varlen), *dmask_strides, *sizes, STORE_DMASK=mask_grad, **common)
    return dq, dk, dv, dmask
