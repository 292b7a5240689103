"""Softmax and log-softmax, forward and backward, in Triton.

The input is viewed as (outer, N, inner) and reduced over N: dim=-1 of a contiguous tensor is inner = 1 with unit
column stride, and any other dim, or a transposed or sliced 2-D input, is served in place through the strides.
One program per row (outer * inner rows); statistics in float32.

Forward. A row of at most MAX_FUSED_COLS columns is read once: max, sum of exp, written once
(2*rows*N*elem_size bytes, memory bound). Longer rows take one online pass (running max and rescaled running
sum per lane, as in "Online normalizer calculation for softmax", Milakov & Gimelshein 2018) and one output pass:
no block ever holds the whole row, so 262 144 columns work in blocks of LOOP_BLOCK_N.
A row of -inf gives NaN, as torch.softmax does.

Backward, from the output y: softmax dx = y * (dy - sum(dy * y)); log-softmax dx = dy - exp(y) * sum(dy).
Rows that fit read dy and y once (3*rows*N*elem_size bytes); longer rows read them twice.
"""

import torch
import triton
import triton.language as tl

from ._launch import row_block_config


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,  # input viewed as (outer, N, inner)
    y_ptr,  # output, contiguous (outer, N, inner)
    n_cols,
    inner,
    stride_x_outer,
    stride_x_col,
    stride_x_inner,
    LOG: tl.constexpr,  # log-softmax instead of softmax
    BLOCK_N: tl.constexpr,
    ROW_FITS: tl.constexpr,  # the whole row fits in one block of BLOCK_N columns
):
    row = tl.program_id(0).to(tl.int64)
    outer_idx = row // inner
    inner_idx = row % inner
    x_row = x_ptr + outer_idx * stride_x_outer + inner_idx * stride_x_inner
    y_row = y_ptr + outer_idx * n_cols * inner + inner_idx
    cols = tl.arange(0, BLOCK_N)
    if ROW_FITS:
        mask = cols < n_cols
        x = tl.load(x_row + cols * stride_x_col, mask=mask, other=float("-inf")).to(tl.float32)
        shifted = x - tl.max(x, axis=0)
        exp = tl.exp(shifted)
        total = tl.sum(exp, axis=0)
        y = shifted - tl.log(total) if LOG else exp / total
        tl.store(y_row + cols * inner, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        lane_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        lane_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            x = tl.load(x_row + (start + cols) * stride_x_col, mask=start + cols < n_cols, other=float("-inf"))
            new_max = tl.maximum(lane_max, x.to(tl.float32))
            # While a lane has seen only -inf, keep its sum at 0 instead of exp(-inf - -inf) = NaN.
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            lane_sum = lane_sum * tl.exp(lane_max - safe_max) + tl.exp(x.to(tl.float32) - safe_max)
            lane_max = new_max
        row_max = tl.max(lane_max, axis=0)
        safe_row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        total = tl.sum(lane_sum * tl.exp(lane_max - safe_row_max), axis=0)
        for start in range(0, n_cols, BLOCK_N):
            mask = start + cols < n_cols
            x = tl.load(x_row + (start + cols) * stride_x_col, mask=mask, other=float("-inf")).to(tl.float32)
            y = x - row_max - tl.log(total) if LOG else tl.exp(x - row_max) / total
            tl.store(y_row + (start + cols) * inner, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    dy_ptr,  # gradient of the output, viewed as (outer, N, inner)
    y_ptr,  # forward output, viewed as (outer, N, inner)
    dx_ptr,  # gradient of the input, contiguous (outer, N, inner)
    n_cols,
    inner,
    stride_dy_outer,
    stride_dy_col,
    stride_dy_inner,
    stride_y_outer,
    stride_y_col,
    stride_y_inner,
    LOG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_FITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer_idx = row // inner
    inner_idx = row % inner
    dy_row = dy_ptr + outer_idx * stride_dy_outer + inner_idx * stride_dy_inner
    y_row = y_ptr + outer_idx * stride_y_outer + inner_idx * stride_y_inner
    dx_row = dx_ptr + outer_idx * n_cols * inner + inner_idx
    cols = tl.arange(0, BLOCK_N)
    # Masked-off lanes load dy = 0 and y = 0, so they add nothing to the row sum.
    if ROW_FITS:
        mask = cols < n_cols
        dy = tl.load(dy_row + cols * stride_dy_col, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_row + cols * stride_y_col, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            dx = dy - tl.exp(y) * tl.sum(dy, axis=0)
        else:
            dx = y * (dy - tl.sum(dy * y, axis=0))
        tl.store(dx_row + cols * inner, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            mask = start + cols < n_cols
            dy = tl.load(dy_row + (start + cols) * stride_dy_col, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                acc += dy
            else:
                acc += dy * tl.load(y_row + (start + cols) * stride_y_col, mask=mask, other=0.0).to(tl.float32)
        row_sum = tl.sum(acc, axis=0)
        for start in range(0, n_cols, BLOCK_N):
            mask = start + cols < n_cols
            dy = tl.load(dy_row + (start + cols) * stride_dy_col, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_row + (start + cols) * stride_y_col, mask=mask, other=0.0).to(tl.float32)
            dx = dy - tl.exp(y) * row_sum if LOG else y * (dy - row_sum)
            tl.store(dx_row + (start + cols) * inner, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def softmax_fwd(x: torch.Tensor, out_dtype: torch.dtype, log: bool) -> torch.Tensor:
    """Softmax (log-softmax when `log`) over dim 1 of `x`, an (outer, N, inner) view with any strides.

    Returns a contiguous (outer, N, inner) tensor of `out_dtype`.
    """
    outer, n_cols, inner = x.shape
    y = torch.empty((outer, n_cols, inner), dtype=out_dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_n, row_fits, num_warps = row_block_config(n_cols)
    _softmax_fwd_kernel[(outer * inner,)](
        x, y, n_cols, inner, *x.stride(), LOG=log, BLOCK_N=block_n, ROW_FITS=row_fits, num_warps=num_warps,
    )
    return y


def softmax_bwd(dy: torch.Tensor, y: torch.Tensor, input_dtype: torch.dtype, log: bool) -> torch.Tensor:
    """Gradient of `softmax_fwd` with respect to its input; `dy` and `y` are (outer, N, inner) views.

    Returns a contiguous (outer, N, inner) tensor of `input_dtype`.
    """
    outer, n_cols, inner = y.shape
    dx = torch.empty((outer, n_cols, inner), dtype=input_dtype, device=y.device)
    if dx.numel() == 0:
        return dx
    block_n, row_fits, num_warps = row_block_config(n_cols)
    _softmax_bwd_kernel[(outer * inner,)](
        dy, y, dx, n_cols, inner, *dy.stride(), *y.stride(),
        LOG=log, BLOCK_N=block_n, ROW_FITS=row_fits, num_warps=num_warps,
    )
    return dx
