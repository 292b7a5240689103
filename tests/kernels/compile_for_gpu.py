"""Compile every Triton kernel variant for NVIDIA GPUs on a machine without one.

The interpreter runs kernels as Python, so it accepts code that the compiler rejects (a type that changes across a
loop, a None pointer used outside its branch). Triton compiles to PTX and cubin for a named target without a GPU,
so CI compiles each variant the ops can launch, for sm_80 (A100) and sm_90a (H100). Attention's launch
configurations are also held to their promise of no register spills on sm_90 (the stack frame that cuobjdump
reports for the cubin) for the largest tile of each list, except where kernels/attention.py says a head dim has no
spill-free tile.

Run with TRITON_INTERPRET=0 (test_gpu_compile.py does): `python -m tests.kernels.compile_for_gpu`.
"""

import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from lmrt.kernels import attention, layer_norm, softmax
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM80, SM90 = GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)
TARGETS = [SM80, SM90]
TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ROW_CONFIGS = [(1024, True, 4), (4096, False, 16)]  # (BLOCK_N, ROW_FITS, num_warps) of a short and a looped row
FLOAT_ARGS = {"eps", "sm_scale", "dropout_p"}
# Stack bytes allowed per (kernel, head-dim class): the tiles kernels/attention.py marks as spilling.
ALLOWED_STACK = {("dkdv", 256): 64}


def _signature(kernel, pointers: dict, constexprs: dict) -> dict:
    """Triton's signature for `kernel`: pointers as given, constexprs, float32 scalars, and 32-bit integers
    otherwise (Triton passes an integer argument below 2**31, as sizes and strides are, as i32)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
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
        yield layer_norm._norm_fwd_kernel, fwd_pointers, fwd_constexprs, warps, 1
        bwd_constexprs = dict(IS_RMS_NORM=is_rms, HAS_WEIGHT=affine, COMPUTE_DW=affine,
                              COMPUTE_DB=affine and not is_rms, BLOCK_N=block_n, ROW_FITS=row_fits)
        bwd_pointers = dict(x_ptr=data, dy_ptr=data, dx_ptr=data, w_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32",
                            dw_partial_ptr="*fp32", db_partial_ptr="*fp32")
        for name, flag in (("w_ptr", "HAS_WEIGHT"), ("dw_partial_ptr", "COMPUTE_DW"), ("db_partial_ptr", "COMPUTE_DB"),
                           ("mean_ptr", "IS_RMS_NORM")):
            if bwd_constexprs[flag] == (name == "mean_ptr"):
                bwd_constexprs[name] = None
        yield layer_norm._norm_bwd_kernel, bwd_pointers, bwd_constexprs, warps, 1


def _softmax_variants():
    for dtype, log, (block_n, row_fits, warps) in itertools.product(TRITON_DTYPES.values(), (False, True), ROW_CONFIGS):
        constexprs = dict(LOG=log, BLOCK_N=block_n, ROW_FITS=row_fits)
        data = f"*{dtype}"
        yield softmax._softmax_fwd_kernel, dict(x_ptr=data, y_ptr=data), constexprs, warps, 1
        yield softmax._softmax_bwd_kernel, dict(dy_ptr=data, y_ptr=data, dx_ptr=data), constexprs, warps, 1


# Attention flag sets: (dtype, head dim, causal, bottom-right, mask kind, packed, dropout).
ATTENTION_FLAVORS = [
    ("float16", 64, False, False, attention.NO_MASK, False, False),
    ("bfloat16", 128, True, True, attention.BOOL_MASK, False, True),
    ("float32", 40, True, False, attention.ADDITIVE_MASK, False, False),
    ("bfloat16", 256, True, True, attention.NO_MASK, True, True),
]
_ATTENTION_KERNELS = {"fwd": attention._attn_fwd_kernel, "dkdv": attention._attn_bwd_dkdv_kernel,
                      "dq": attention._attn_bwd_dq_kernel}


def _attention_constexprs(name, dtype, head_dim, causal, bottom_right, mask_kind, varlen, dropout):
    block_d = attention._block_dim(head_dim)
    constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, CAUSAL=causal, BOTTOM_RIGHT=bottom_right,
                      MASK_KIND=mask_kind, VARLEN=varlen, DROPOUT=dropout,
                      PRECISION="ieee" if dtype == "float32" else "tf32", UPCAST_DOT=False, BLOCK_D=block_d,
                      BLOCK_DV=block_d)
    if mask_kind == attention.NO_MASK:
        constexprs["mask_ptr"] = None
    if not varlen:
        constexprs.update(cu_seqlens_q_ptr=None, cu_seqlens_k_ptr=None)
    if not dropout:
        constexprs["seed_ptr"] = None
    if name == "dq":
        constexprs["STORE_DMASK"] = mask_kind == attention.ADDITIVE_MASK
        if mask_kind != attention.ADDITIVE_MASK:
            constexprs["dmask_ptr"] = None
    return constexprs


def _attention_pointers(dtype, mask_kind):
    data = f"*{TRITON_DTYPES[dtype]}"
    mask = "*u8" if mask_kind == attention.BOOL_MASK else "*fp32"
    return dict(q_ptr=data, k_ptr=data, v_ptr=data, out_ptr=data, dout_ptr=data, dq_ptr=data, dk_ptr=data,
                dv_ptr=data, lse_ptr="*fp32", delta_ptr="*fp32", dmask_ptr="*fp32", mask_ptr=mask,
                cu_seqlens_q_ptr="*i32", cu_seqlens_k_ptr="*i32", seed_ptr="*i64")


def _attention_variants():
    """Each flavor with the first (largest) configuration of its head-dim class, plus the backward's delta pass."""
    for flavor in ATTENTION_FLAVORS:
        dtype, head_dim = flavor[:2]
        for name, kernel in _ATTENTION_KERNELS.items():
            constexprs = _attention_constexprs(name, *flavor)
            block_m, block_n, warps, stages = attention.CONFIGS[name][attention.head_dim_class(
                constexprs["BLOCK_D"], constexprs["BLOCK_DV"])][0]
            constexprs.update(BLOCK_M=block_m, BLOCK_N=block_n)
            yield kernel, _attention_pointers(dtype, flavor[4]), constexprs, warps, stages
        delta = dict(HEAD_DIM_V=head_dim, VARLEN=flavor[5], BLOCK_M=attention.DELTA_BLOCK_M,
                     BLOCK_DV=attention._block_dim(head_dim))
        if not flavor[5]:
            delta["cu_seqlens_q_ptr"] = None
        yield attention._attn_bwd_delta_kernel, _attention_pointers(dtype, flavor[4]), delta, 4, 1


def _attention_tiles():
    """The largest configuration of each list of attention.CONFIGS, for sm_90 in bfloat16 (causal, no mask)."""
    for name, tables in attention.CONFIGS.items():
        for head_dim, configs in tables.items():
            for block_m, block_n, warps, stages in configs[:1]:
                constexprs = _attention_constexprs(name, "bfloat16", head_dim, True, False, attention.NO_MASK,
                                                   False, False)
                constexprs.update(BLOCK_M=block_m, BLOCK_N=block_n)
                yield name, head_dim, (_ATTENTION_KERNELS[name], _attention_pointers("bfloat16", 0), constexprs,
                                       warps, stages)


def _compile(kernel, pointers, constexprs, warps, stages, target):
    source = ASTSource(fn=kernel, signature=_signature(kernel, pointers, constexprs), constexprs=constexprs)
    compiled = triton.compile(source, target=target, options={"num_warps": warps, "num_stages": stages})
    assert compiled.asm["cubin"], "no cubin"
    return compiled


def stack_bytes(cubin: bytes) -> int:
    """The per-thread stack frame (spilled registers) that cuobjdump reports for a cubin."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([cuobjdump, "-res-usage", file.name], capture_output=True, text=True, check=True)
    return int(re.search(r"STACK:(\d+)", report.stdout).group(1))


def main() -> int:
    failures = 0
    variants = list(_norm_variants()) + list(_softmax_variants()) + list(_attention_variants())
    for (kernel, pointers, constexprs, warps, stages), target in itertools.product(variants, TARGETS):
        try:
            _compile(kernel, pointers, constexprs, warps, stages, target)
        except Exception as error:  # report every failing variant, not only the first
            failures += 1
            print(f"FAILED {kernel.__name__} sm_{target.arch} {constexprs} {pointers}: {error}", file=sys.stderr)
    tiles = list(_attention_tiles())
    for name, head_dim, variant in tiles:
        try:
            stack = stack_bytes(_compile(*variant, SM90).asm["cubin"])
            allowed = ALLOWED_STACK.get((name, head_dim), 0)
            assert stack <= allowed, f"spills {stack} bytes of stack (allowed {allowed})"
        except Exception as error:
            failures += 1
            print(f"FAILED attention {name} tile {variant[2]['BLOCK_M']}x{variant[2]['BLOCK_N']} warps {variant[3]} "
                  f"head dim {head_dim} on sm_90: {error}", file=sys.stderr)
    total = len(variants) * len(TARGETS) + len(tiles)
    print(f"compiled {total - failures} of {total} kernel variants")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
