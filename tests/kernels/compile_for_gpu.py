"""Compile every Triton kernel variant for NVIDIA GPUs on a machine without one.

The interpreter runs kernels as Python, so it accepts code that the compiler rejects (a type that changes across a
loop, a None pointer used outside its branch). Triton compiles to PTX and cubin for a named target without a GPU,
so CI compiles each variant the ops can launch, for sm_80 (A100) and sm_90a (H100).

Run with TRITON_INTERPRET=0 (test_gpu_compile.py does): `python -m tests.kernels.compile_for_gpu`.
"""

import itertools
import sys

import triton
from lmrt.kernels import layer_norm, softmax
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ROW_CONFIGS = [(1024, True, 4), (4096, False, 16)]  # (BLOCK_N, ROW_FITS, num_warps) of a short and a looped row


def _signature(kernel, pointers: dict, constexprs: dict) -> dict:
    """Triton's signature for `kernel`: pointers as given, constexprs, float `eps`, and 64-bit integers otherwise."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name == "eps" else "i64"
    return signature


def _norm_variants():
    for dtype, is_rms, (block_n, row_fits, warps), affine in itertools.product(
        TRITON_DTYPES.values(), (False, True), ROW_CONFIGS, (False, True)
    ):
        data = f"*{dtype}"
        fwd_constexprs = dict(IS_RMS_NORM=is_rms, HAS_WEIGHT=affine, HAS_BIAS=affine and not is_rms,
                              BLOCK_N=block_n, ROW_FITS=row_fits)
        fwd_pointers = dict(x_ptr=data, y_ptr=data, w_ptr="*fp32", b_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32")
        for name, flag in (("w_ptr", "HAS_WEIGHT"), ("b_ptr", "HAS_BIAS"), ("mean_ptr", "IS_RMS_NORM")):
            if fwd_constexprs[flag] == (name == "mean_ptr"):
                fwd_constexprs[name] = None
        yield layer_norm._norm_fwd_kernel, fwd_pointers, fwd_constexprs, warps
        bwd_constexprs = dict(IS_RMS_NORM=is_rms, HAS_WEIGHT=affine, COMPUTE_DW=affine,
                              COMPUTE_DB=affine and not is_rms, BLOCK_N=block_n, ROW_FITS=row_fits)
        bwd_pointers = dict(x_ptr=data, dy_ptr=data, dx_ptr=data, w_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32",
                            dw_partial_ptr="*fp32", db_partial_ptr="*fp32")
        for name, flag in (("w_ptr", "HAS_WEIGHT"), ("dw_partial_ptr", "COMPUTE_DW"), ("db_partial_ptr", "COMPUTE_DB"),
                           ("mean_ptr", "IS_RMS_NORM")):
            if bwd_constexprs[flag] == (name == "mean_ptr"):
                bwd_constexprs[name] = None
        yield layer_norm._norm_bwd_kernel, bwd_pointers, bwd_constexprs, warps


def _softmax_variants():
    for dtype, log, (block_n, row_fits, warps) in itertools.product(TRITON_DTYPES.values(), (False, True), ROW_CONFIGS):
        constexprs = dict(LOG=log, BLOCK_N=block_n, ROW_FITS=row_fits)
        data = f"*{dtype}"
        yield softmax._softmax_fwd_kernel, dict(x_ptr=data, y_ptr=data), constexprs, warps
        yield softmax._softmax_bwd_kernel, dict(dy_ptr=data, y_ptr=data, dx_ptr=data), constexprs, warps


def main() -> int:
    failures = 0
    variants = list(_norm_variants()) + list(_softmax_variants())
    for (kernel, pointers, constexprs, warps), target in itertools.product(variants, TARGETS):
        source = ASTSource(fn=kernel, signature=_signature(kernel, pointers, constexprs), constexprs=constexprs)
        try:
            compiled = triton.compile(source, target=target, options={"num_warps": warps})
            assert compiled.asm["cubin"], "no cubin"
        except Exception as error:  # report every failing variant, not only the first
            failures += 1
            print(f"FAILED {kernel.__name__} sm_{target.arch} {constexprs} {pointers}: {error}", file=sys.stderr)
    print(f"compiled {len(variants) * len(TARGETS) - failures} of {len(variants) * len(TARGETS)} kernel variants")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
