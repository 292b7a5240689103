"""lmrt.ops.flash_attn_func and flash_attn_varlen_func: the flash-attn package's calls on lmrt's attention ops.

Tensors are (batch, seq, heads, dim), or (total tokens, heads, dim) for packed sequences, and causal masking is
bottom-right aligned (key j visible to query i when j <= i + Lk - Lq), as in flash-attn 2.1 and later. The
layouts are passed to the kernels as transposed views: nothing is copied, and the output comes back in the same
(batch, seq, heads, dim) layout.
"""

import torch
from torch import Tensor

from lmrt import reference
from lmrt.ops._checks import refuse_forward_ad
from lmrt.ops.attention import check_attention_inputs, check_dropout_p, draw_seed


def flash_attn_func(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
) -> Tensor:
    """Attention over (batch, seq, heads, dim) tensors; key/value heads may divide the query heads (GQA/MQA)."""
    op = "flash_attn_func"
    check_attention_inputs(op, q, k, v, keys_dim=1, ndim=4)
    check_dropout_p(op, dropout_p)
    _check_heads(op, q, k, v)
    refuse_forward_ad(op, q, k, v)
    for name, t in (("key", k), ("value", v)):
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"lmrt.ops.{op}: `{name}` has batch size {t.shape[0]} but `query` has {q.shape[0]}")
    out, _ = torch.ops.lmrt.attention_fwd(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, None, q.shape[1], k.shape[1],
        float(dropout_p), draw_seed(q.device, dropout_p), bool(causal), True, _scale(q, softmax_scale), False)
    return out.transpose(1, 2)


def flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
) -> Tensor:
    """Attention over packed sequences: q (total_q, heads, dim), k and v (total_k, kv heads, dim); sequence i is
    rows cu_seqlens_q[i]:cu_seqlens_q[i + 1] of q against rows cu_seqlens_k[i]:cu_seqlens_k[i + 1] of k and v.

    `cu_seqlens_*` are int32 tensors of n + 1 offsets (starting at 0, non-decreasing) on the tensors' device;
    `max_seqlen_*` are Python ints bounding each sequence's length, so that torch.compile needs no `.item()`.
    Rows of q beyond cu_seqlens_q[-1] are left zero. The offsets are not read on the host, so values that break
    these rules are not detected.
    """
    op = "flash_attn_varlen_func"
    check_attention_inputs(op, q, k, v, keys_dim=0, ndim=3)
    check_dropout_p(op, dropout_p)
    _check_heads(op, q, k, v)
    refuse_forward_ad(op, q, k, v)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1:
            got = f"{cu.dtype} tensor of shape {list(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
            raise TypeError(f"lmrt.ops.{op}: `{name}` must be a 1-D int32 tensor of sequence offsets, got {got}")
        if cu.device != q.device:
            raise ValueError(f"lmrt.ops.{op}: `{name}` is on {cu.device} but `q` is on {q.device}")
        if cu.numel() < 1:
            raise ValueError(f"lmrt.ops.{op}: `{name}` must hold at least one offset (0)")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"lmrt.ops.{op}: `cu_seqlens_q` has {cu_seqlens_q.numel()} offsets and `cu_seqlens_k` "
                         f"{cu_seqlens_k.numel()}; both must hold (number of sequences + 1)")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TypeError(f"lmrt.ops.{op}: `{name}` must be a non-negative Python int, got {value!r}")
    out, _ = torch.ops.lmrt.attention_fwd(
        q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2),
        v.unsqueeze(0).transpose(1, 2), None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        float(dropout_p), draw_seed(q.device, dropout_p), bool(causal), True, _scale(q, softmax_scale), False)
    return out.transpose(1, 2)[0]


def _check_heads(op: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    n_heads, n_kv_heads = q.shape[-2], k.shape[-2]
    if v.shape[-2] != n_kv_heads or n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(f"lmrt.ops.{op}: `key` and `value` must have the same number of heads, a divisor of the "
                         f"query's {n_heads}; got {n_kv_heads} and {v.shape[-2]}")


def _scale(q: Tensor, softmax_scale: float | None) -> float:
    return reference.default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
