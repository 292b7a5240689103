"""The Triton interpreter made to round float32 to bfloat16 as a GPU does, for the tests.

The interpreter (triton 3.9) converts float32 to bfloat16 by dropping the low 16 bits, where a GPU's conversion
rounds to nearest even: under it, half of a kernel's bfloat16 outputs come out one ulp low, and a backward that
reads a bfloat16 output inherits that (softmax's on a peaked row, attention's rowsum(dO * O)), which put the
triton backend outside the error rule on some CPUs. The tests check the kernels as a GPU runs them, so they
replace that conversion with one that rounds to nearest even; an explicit round-toward-zero keeps the original.
"""

import numpy as np


def round_bfloat16_to_nearest_even() -> bool:
    """Patch the interpreter's float32 -> bfloat16 conversion to round to nearest even; False where this triton
    has no such conversion to patch (its interpreter then runs as it is)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter

        convert, rounding_modes = interpreter._convert_float, interpreter._ir.ROUNDING_MODE
    except (ImportError, AttributeError):
        return False

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype != tl.float32 or output_dtype != tl.bfloat16 or rounding_mode == rounding_modes.RTZ:
            return convert(input, input_dtype, output_dtype, rounding_mode)
        values = np.ascontiguousarray(input, dtype=np.float32)
        bits = values.view(np.uint32)
        # Adding 0x7FFF plus the kept part's lowest bit carries into the kept 16 bits exactly when the dropped ones
        # are above half, or at half with an odd kept part; a carry out of the significand moves up the exponent
        # (the largest finite values round to infinity). NaN keeps its sign and top payload, made quiet.
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
        return np.where(np.isnan(values), (bits >> 16) | np.uint32(0x40), rounded).astype(np.uint16)

    interpreter._convert_float = convert_float
    return True
