"""LayerNorm and RMSNorm, forward and backward, in Triton.

RMSNorm is LayerNorm without centering and without bias, so one pair of kernels serves both (IS_RMS_NORM).
Inputs are viewed as (M rows, N columns) with unit column stride; statistics are float32 whatever the dtype.

Forward, one program per row. A row of at most MAX_FUSED_COLS columns is read once, kept in registers,
normalized and written: 2*M*N*elem_size bytes in all, so the bound is memory bandwidth. Longer rows stream
in blocks: a mean pass, a variance pass (sum of squared deviations, no E[x^2] - E[x]^2 cancellation, with the
corrected two-pass refinement of the mean) and an output pass, 3 reads and 1 write. Mean and rstd are saved
per row for the backward.

Backward, each program takes a contiguous range of rows and writes their dx:
    x_hat = (x - mean) * rstd,  g = dy * w,  dx = rstd * (g - x_hat * mean(g * x_hat) - mean(g))
(RMSNorm drops mean(g) and the centering). It also sums dy * x_hat and dy over its rows, in registers for rows
that fit, in its own row of a float32 buffer otherwise; torch.sum over programs then finishes dweight and dbias.
Two stages, no atomics: the same inputs give bitwise the same gradients. Bytes: 3*M*N*elem_size (x, dy, dx).
"""

import torch
import triton
import triton.language as tl

from ._launch import max_programs, row_block_config

# A program's running float32 sums of dy * x_hat and dy take one term per row: past a few hundred rows their rounding
# exceeds that of PyTorch's dweight (65536 x 16 float32 RMSNorm in 8 programs: 6.5e-4, over the test rule's 4.0e-4
# for PyTorch's 9.1e-5; in programs of 256 rows, within it).
# More rows than programs * MAX_ROWS_PER_PROGRAM take more programs; their partial sums add N * 4 bytes per 256
# rows, under 1% of the bytes the rows move.
MAX_ROWS_PER_PROGRAM = 256


@triton.jit
def _mean(total, n_cols):
    """total / n_cols correctly rounded: a plain `/` of float32 compiles to an approximate division on NVIDIA GPUs,
    off by an ulp or two even for n_cols = 1, and a mean that is off shows up in dx amplified by rstd."""
    return tl.math.div_rn(total, n_cols + 0.0)


@triton.jit
def _affine(y, w_ptr, b_ptr, cols, mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _norm_fwd_kernel(
    x_ptr,  # (M, N) input, unit column stride
    y_ptr,  # (M, N) output
    w_ptr,  # (N,) weight, or None
    b_ptr,  # (N,) bias, or None
    mean_ptr,  # (M,) float32 row means, written for LayerNorm only
    rstd_ptr,  # (M,) float32 reciprocal standard deviations
    stride_x_row,
    stride_y_row,
    n_cols,
    eps,
    IS_RMS_NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_FITS: tl.constexpr,  # the whole row fits in one block of BLOCK_N columns
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_row
    y_row = y_ptr + row * stride_y_row
    cols = tl.arange(0, BLOCK_N)
    if ROW_FITS:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS_NORM:
            x_c = x
        else:
            mean = _mean(tl.sum(x, axis=0), n_cols)
            # One refinement step cancels the rounding error of the first sum (large offsets, long rows).
            mean += _mean(tl.sum(tl.where(mask, x - mean, 0.0), axis=0), n_cols)
            x_c = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(_mean(tl.sum(x_c * x_c, axis=0), n_cols) + eps)
        y = _affine(x_c * rstd, w_ptr, b_ptr, cols, mask, HAS_WEIGHT, HAS_BIAS)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        if IS_RMS_NORM:
            mean = 0.0
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                acc += tl.load(x_row + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
            mean = _mean(tl.sum(acc, axis=0), n_cols)
        centered_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        squares_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            x_c = tl.where(mask, x - mean, 0.0)
            centered_acc += x_c
            squares_acc += x_c * x_c
        var = _mean(tl.sum(squares_acc, axis=0), n_cols)
        if not IS_RMS_NORM:
            # The corrected two-pass variance: sum(x - mean) is the rounding error of the first pass's mean.
            correction = _mean(tl.sum(centered_acc, axis=0), n_cols)
            mean += correction
            var -= correction * correction
        rstd = 1.0 / tl.sqrt(var + eps)
        for start in range(0, n_cols, BLOCK_N):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = _affine((x - mean) * rstd, w_ptr, b_ptr, start + cols, mask, HAS_WEIGHT, HAS_BIAS)
            tl.store(y_row + start + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    if not IS_RMS_NORM:
        tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _norm_bwd_kernel(
    x_ptr,  # (M, N) forward input, unit column stride
    dy_ptr,  # (M, N) gradient of the output, unit column stride
    dx_ptr,  # (M, N) gradient of the input, written
    w_ptr,  # (N,) weight, or None
    mean_ptr,  # (M,) float32 row means (LayerNorm only)
    rstd_ptr,  # (M,) float32 reciprocal standard deviations
    dw_partial_ptr,  # (programs, N) float32 zeros: this program's sum of dy * x_hat, or None
    db_partial_ptr,  # (programs, N) float32 zeros: this program's sum of dy, or None
    stride_x_row,
    stride_dy_row,
    stride_dx_row,
    n_rows,
    n_cols,
    rows_per_program,
    IS_RMS_NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_FITS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_N)
    # Masked-off lanes load dy = 0, so they add nothing to the row sums or to the partial sums.
    if ROW_FITS:
        mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            if IS_RMS_NORM:
                x_hat = x * rstd
            else:
                x_hat = (x - tl.load(mean_ptr + row)) * rstd
            g = dy * w if HAS_WEIGHT else dy
            dx = g - x_hat * _mean(tl.sum(g * x_hat, axis=0), n_cols)
            if not IS_RMS_NORM:
                dx -= _mean(tl.sum(g, axis=0), n_cols)
            tl.store(dx_ptr + row * stride_dx_row + cols, (dx * rstd).to(dx_ptr.dtype.element_ty), mask=mask)
            dw_acc += dy * x_hat
            db_acc += dy
        if COMPUTE_DW:
            tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)
        if COMPUTE_DB:
            tl.store(db_partial_ptr + pid * n_cols + cols, db_acc, mask=mask)
    else:
        for row in range(row_start, row_end):
            x_row = x_ptr + row * stride_x_row
            dy_row = dy_ptr + row * stride_dy_row
            rstd = tl.load(rstd_ptr + row)
            mean = 0.0 if IS_RMS_NORM else tl.load(mean_ptr + row)
            g_x_hat_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            g_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                mask = start + cols < n_cols
                x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                g = dy * tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32) if HAS_WEIGHT else dy
                g_x_hat_acc += g * (x - mean) * rstd
                g_acc += g
            mean_g_x_hat = _mean(tl.sum(g_x_hat_acc, axis=0), n_cols)
            mean_g = 0.0 if IS_RMS_NORM else _mean(tl.sum(g_acc, axis=0), n_cols)
            for start in range(0, n_cols, BLOCK_N):
                mask = start + cols < n_cols
                x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                g = dy * tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32) if HAS_WEIGHT else dy
                x_hat = (x - mean) * rstd
                dx = (g - x_hat * mean_g_x_hat - mean_g) * rstd
                tl.store(dx_ptr + row * stride_dx_row + start + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    dw_partial = dw_partial_ptr + pid * n_cols + start + cols
                    tl.store(dw_partial, tl.load(dw_partial, mask=mask, other=0.0) + dy * x_hat, mask=mask)
                if COMPUTE_DB:
                    db_partial = db_partial_ptr + pid * n_cols + start + cols
                    tl.store(db_partial, tl.load(db_partial, mask=mask, other=0.0) + dy, mask=mask)


def norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, is_rms_norm: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """LayerNorm (or RMSNorm) of the rows of `x`, an (M, N) tensor with unit column stride.

    Returns (y, mean, rstd): y is (M, N) in x's dtype; mean (None for RMSNorm) and rstd are (M,) float32.
    """
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    mean = None if is_rms_norm else torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, mean, rstd
    block_n, row_fits, num_warps = row_block_config(n_cols)
    _norm_fwd_kernel[(n_rows,)](
        x, y, weight, bias, mean, rstd, x.stride(0), y.stride(0), n_cols, eps,
        IS_RMS_NORM=is_rms_norm, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, ROW_FITS=row_fits, num_warps=num_warps,
    )
    return y, mean, rstd


def norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor,
    compute_dw: bool, compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of `norm_fwd` (RMSNorm when `mean` is None); `dy` and `x` are (M, N) with unit column stride.

    Returns (dx, dweight, dbias): dx in x's dtype; dweight and dbias float32 (N,), or None when not asked for.
    """
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    programs = min(n_rows, max_programs(x.device))
    rows_per_program = min(triton.cdiv(n_rows, max(programs, 1)), MAX_ROWS_PER_PROGRAM)
    programs = triton.cdiv(n_rows, max(rows_per_program, 1))  # no program left without rows
    dw_partial = torch.zeros((programs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else None
    db_partial = torch.zeros((programs, n_cols), dtype=torch.float32, device=x.device) if compute_db else None
    if n_rows > 0:
        block_n, row_fits, num_warps = row_block_config(n_cols)
        _norm_bwd_kernel[(programs,)](
            x, dy, dx, weight, mean, rstd, dw_partial, db_partial,
            x.stride(0), dy.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
            IS_RMS_NORM=mean is None, HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
            BLOCK_N=block_n, ROW_FITS=row_fits, num_warps=num_warps,
        )
    dw = dw_partial.sum(0) if compute_dw else None
    db = db_partial.sum(0) if compute_db else None
    return dx, dw, db
