"""Every CUDA kernel of lmrt._C once per code path, on small shapes, for compute-sanitizer (scripts/gpu_check.sh):

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/cuda_memcheck.py

LayerNorm, RMSNorm, softmax and log_softmax, forward and backward, with and without weights, on rows from 1 to
65539 columns (one lane, a warp, a block, the streamed kernel; vector and scalar accesses); attention forward and
backward with grouped heads, odd lengths and head dims, boolean and additive masks, causal; in float32, float16 and
bfloat16. Correctness is the tests' job: this only has to reach every path, so that memcheck sees its accesses.
"""

import torch

from lmrt import backend, ops

DEVICE = "cuda"
WIDTHS = [(1, 1), (7, 33), (5, 768), (3, 4097), (2, 8192), (2, 65539)]
# (batch, query heads, key/value heads, query length, key length, head dim)
ATTENTION_SHAPES = [(1, 1, 1, 1, 1, 16), (2, 4, 2, 67, 131, 59), (1, 2, 1, 129, 65, 128), (1, 2, 2, 200, 200, 64),
                    (1, 1, 1, 3, 300, 80)]


def backward(y: torch.Tensor) -> None:
    y.backward(torch.randn_like(y))


def row_ops(dtype: torch.dtype) -> None:
    for rows, cols in WIDTHS:
        x = torch.randn(rows, cols, device=DEVICE, dtype=dtype, requires_grad=True)
        weight, bias = (torch.randn(cols, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
        backward(ops.layer_norm(x, (cols,), weight, bias))
        backward(ops.layer_norm(x, (cols,)))
        backward(ops.rms_norm(x, (cols,), weight))
        backward(ops.rms_norm(x, (cols,)))
        backward(ops.softmax(x, -1))
        backward(ops.log_softmax(x, -1))


def attention(dtype: torch.dtype) -> None:
    for batch, heads, kv_heads, rows, keys, dim in ATTENTION_SHAPES:
        q = torch.randn(batch, heads, rows, dim, device=DEVICE, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(batch, kv_heads, keys, dim, device=DEVICE, dtype=dtype, requires_grad=True)
                for _ in range(2))
        grouped = kv_heads != heads
        for causal in (False, True):
            backward(ops.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=grouped))
        for mask in (torch.rand(rows, keys, device=DEVICE) > 0.3,
                     torch.randn(batch, 1, rows, keys, device=DEVICE, dtype=dtype)):
            backward(ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped))


def main() -> None:
    torch.manual_seed(0)
    with backend("cuda"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            row_ops(dtype)
            attention(dtype)
    torch.cuda.synchronize()
    print("cuda_memcheck: every CUDA kernel path ran")


if __name__ == "__main__":
    main()
