"""Launch settings shared by the row-wise kernels (one program per row, looping over long rows)."""

import torch
import triton

# A row of up to this many columns is held in registers whole (16 warps x 32 threads x 32 float32 each);
# longer rows are streamed in blocks of LOOP_BLOCK_N.
MAX_FUSED_COLS = 16384
LOOP_BLOCK_N = 4096


def row_block_config(n_cols: int) -> tuple[int, bool, int]:
    """(BLOCK_N, ROW_FITS, num_warps) for rows of `n_cols` columns."""
    row_fits = n_cols <= MAX_FUSED_COLS
    block_n = triton.next_power_of_2(max(n_cols, 1)) if row_fits else LOOP_BLOCK_N
    num_warps = min(max(block_n // 256, 1), 16)  # about 8 columns per thread before going to 16 warps
    return block_n, row_fits, num_warps


def max_programs(device: torch.device) -> int:
    """How many programs a kernel that splits rows between programs launches at most.

    On a GPU, a few per SM keep every SM busy while bounding the partial-sum buffers; the interpreter runs
    programs one after another, so a handful is enough there.
    """
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8
