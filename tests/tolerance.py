"""The correctness rule of ARCHITECTURE.md, shared by every op test.

A backend's result is compared with the exact answer (the reference run in float64). Its largest error may be at
most twice (`factor`; attention's gradients take 3x, as in flash-attention's tests) the largest error of PyTorch's
own op run in the same dtype, plus a floor of four units in the last place of the dtype at the scale of the result:

    max|result - exact| <= factor * max|torch_result - exact| + (4 * eps + floor) * max(max|exact|, tiny)

with eps the dtype's machine epsilon (ULP_AT_ONE) and tiny its smallest normal number. The factor 2 allows a
different but equally sound order of summation; the floor covers results PyTorch happens to get (nearly) bit-exact,
where a kernel's few roundings in the dtype (a subtraction, a product, the final cast) add a few ulps of their own.
The scale is the result's own largest magnitude, not clamped to 1: softmax rows and attention outputs lie below 1,
and 4 ulps at 1 would let an output several percent off pass in bfloat16. An exact answer that is all zeros (or
below the normal range) takes the dtype's smallest normal as its scale, so the floor is 4 ulps of the subnormal
range: a zero must come back as zero, up to the flush or rounding of a subnormal. NaNs must sit where the exact answer
has them; infinities are left out of the scale. Flash attention's output and gradients get one more allowance,
`attention_floor`, for an error of the algorithm that PyTorch's softmax does not make.

One exception to the result's scale, which a test must ask for (`scale`, or `grad_scales` of check_against_torch): a
result that vanishes by structure while the terms it is computed from do not, where the floor is taken at the
magnitude of those terms. Attention's query and key gradients where every row's softmax is one-hot (one key, or
scores far apart) are such: exactly zero, yet every implementation forms them as scale (dP - D) k with dP = dO.v and
D = dO.O, two sums equal but for their roundings (tests/ops/test_attention.py, one_hot_grad_scales).

`check_compiled_matches_eager` is the torch.compile(fullgraph=True) check every op's tests share.
"""

import math

import torch

from lmrt import reference

ULP_AT_ONE = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


def max_error(result: torch.Tensor, exact: torch.Tensor) -> float:
    diff = (result.double() - exact.double()).abs()
    return diff.nan_to_num(0.0).max().item() if diff.numel() else 0.0


def result_scale(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """The scale the floor is taken at: the largest finite magnitude of `exact`, at least the smallest normal
    number of `dtype` (an all-zero or empty exact answer gets that)."""
    finite = exact.double().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    largest = finite.abs().max().item() if finite.numel() else 0.0
    return max(largest, torch.finfo(dtype).tiny)


def assert_within_torch_error(name: str, result: torch.Tensor, torch_result: torch.Tensor, exact: torch.Tensor,
                              factor: float = 2.0, floor: float = 0.0, scale: float | None = None):
    """The rule above; `floor` is a relative error allowed on top, at the result's scale. `scale`, if given, is the
    magnitude of the terms of a result that vanishes by structure, at which the floors are taken instead (never below
    the result's own)."""
    assert result.shape == exact.shape, f"{name}: shape {list(result.shape)}, expected {list(exact.shape)}"
    assert result.dtype == torch_result.dtype, f"{name}: dtype {result.dtype}, expected {torch_result.dtype}"
    nan_mismatch = (result.isnan() != exact.isnan()).sum().item()
    assert nan_mismatch == 0, f"{name}: {nan_mismatch} NaNs where the exact answer has none, or the reverse"
    scale = max(result_scale(exact, result.dtype), scale or 0.0)
    bound = factor * max_error(torch_result, exact) + (4 * ULP_AT_ONE[result.dtype] + floor) * scale
    error = max_error(result, exact)
    extra = f" and {floor:.3g} relative" if floor else ""
    assert error <= bound, (f"{name}: max error {error:.3g} exceeds {bound:.3g} ({factor:g}x PyTorch's own error "
                            f"{max_error(torch_result, exact):.3g} plus 4 ulps{extra} at the scale {scale:.3g})")


# The size of a row's scores past which the kernels' gradients are inexact by design (README: the row's log-sum-exp,
# kept in float32, loses the log of its sum): attention_floor leaves such rows out, and a test gives them no output
# gradient (tests/ops/test_attention.py, inexact_gradient_rows).
LARGEST_EXACT_SCORE = 2.0**25


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                     attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """scale q.k^T plus an additive mask, in float64, and -inf where top-left causality hides a key; q and k are
    (..., heads, length, dim), k's heads a divisor of q's, and the scale by default PyTorch's."""
    scale = reference.default_scale(q.shape[-1]) if scale is None else scale
    group = q.shape[-3] // k.shape[-3]
    scores = (q.double() @ k.double().repeat_interleave(group, -3).transpose(-1, -2)) * scale
    if attn_mask is not None and attn_mask.is_floating_point():
        scores = scores + attn_mask.double()
    if is_causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(hidden, -math.inf)
    return scores


def attention_floor(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                    attn_mask: torch.Tensor | None = None):
    """The extra relative error flash attention's output and gradients may carry. The kernels exponentiate each
    score in another form than PyTorch's exp(s - max): the forward in base 2, exp2(s log2(e) - m), and the backward
    as exp(s - lse) from the float32 log-sum-exp the forward saved. So the exponent carries roundings that
    PyTorch's does not (the change of base, lse's own: the forward's sum and its change of base, and the product s =
    scale q.k where no fused multiply-add takes it, as under the Triton interpreter), each up to |s| or |lse| 2^-24,
    and every probability is off by that relative amount: at |s| near 10, over ten float32 ulps, where PyTorch's own
    error may happen to be a few (a float32 output at 5x PyTorch's error, measured). Allowed: four float32 ulps of a
    bound on |lse|, max |s| + log(keys), over the rows whose largest score is under LARGEST_EXACT_SCORE in size,
    leaving out the scores of -LARGEST_EXACT_SCORE and below (a mask's large negative values), whose probabilities
    are 0 in every backend."""
    if q.numel() == 0 or k.numel() == 0:
        return 0.0
    scores = attention_scores(q, k, scale, attn_mask)
    row_max = scores.amax(-1, keepdim=True)
    kept = (scores > -LARGEST_EXACT_SCORE) & (row_max.abs() < LARGEST_EXACT_SCORE)  # NaN in neither
    largest = scores[kept].abs().max().item() if kept.any() else 0.0
    return 4 * ULP_AT_ONE[torch.float32] * (largest + math.log(k.shape[-2]))


def _differentiable(t) -> bool:
    return t is not None and t.is_floating_point()


def forward_backward(fn, tensors, grad_output):
    """fn(*tensors) and the gradients of <fn(...), grad_output> with respect to every floating-point tensor."""
    leaves = [t.detach().clone().requires_grad_(True) if _differentiable(t) else t for t in tensors]
    output = fn(*leaves)
    output.backward(grad_output.to(output.dtype))
    return [output.detach()] + [leaf.grad for leaf in leaves if _differentiable(leaf)]


def check_against_torch(fn, torch_fn, exact_fn, tensors, grad_output, names, grad_factor=2.0, floor=0.0,
                        grad_scales=None):
    """Run lmrt's `fn`, PyTorch's `torch_fn` (same dtype) and `exact_fn` (float64) on `tensors` (named by `names`,
    None for an absent optional one); compare the output and the gradient of every floating-point tensor, each with
    `floor`, the gradients with `grad_factor` (and `grad_scales[name]`, if given, as their `scale`)."""
    results = forward_backward(fn, tensors, grad_output)
    torch_results = forward_backward(torch_fn, tensors, grad_output)
    exact = forward_backward(exact_fn, [t.double() if _differentiable(t) else t for t in tensors], grad_output.double())
    labels = ["output"] + [f"grad_{name}" for name, t in zip(names, tensors, strict=True) if _differentiable(t)]
    scales = {f"grad_{name}": scale for name, scale in (grad_scales or {}).items()}
    for label, result, torch_result, exact_result in zip(labels, results, torch_results, exact, strict=True):
        factor = 2.0 if label == "output" else grad_factor
        assert_within_torch_error(label, result, torch_result, exact_result, factor, floor, scales.get(label))


def check_compiled_matches_eager(step, tensors):
    """`step(*tensors)` (a scalar loss) compiles with no graph break, on the triton backend, and its gradients
    with respect to `tensors` equal eager mode's."""
    import lmrt

    compiled = torch.compile(step, fullgraph=True)
    with lmrt.backend("triton"):
        leaves = [t.clone().requires_grad_() for t in tensors]
        compiled(*leaves).backward()
        eager_leaves = [t.clone().requires_grad_() for t in tensors]
        step(*eager_leaves).backward()
    for compiled_leaf, eager_leaf in zip(leaves, eager_leaves, strict=True):
        torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)
