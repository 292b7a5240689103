"""Backend choice for one call of an op, and the layout the kernels need."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from types import ModuleType, SimpleNamespace

import torch

from lmrt import backends

# The dtypes lmrt's kernels take; anything else (float64) goes to the reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pick_backend(
    op: str, device: torch.device, dtypes: Iterable[torch.dtype],
    limits: Callable[[str], str | None] | None = None,
) -> str:
    """The backend that serves this call of `op`, whose tensors live on `device` and have `dtypes`.

    `limits(name)`, if given, says why backend `name` cannot serve this call for another reason (a size), or None.
    """
    dtypes = tuple(dtypes)

    def unsupported(name: str) -> str | None:
        unsupported_dtypes = [dtype for dtype in dtypes if dtype not in KERNEL_DTYPES]
        if name != "torch" and unsupported_dtypes:
            return f"its kernels take float32, float16 and bfloat16, not {unsupported_dtypes[0]}"
        return limits(name) if limits is not None else None

    return backends.select(op, device, backends.BACKENDS, unsupported)


def _none(*args: object) -> None:
    return None


def _load_eager_calls() -> SimpleNamespace | ModuleType:
    """lmrt._C, whose functions layer_norm, rms_norm, softmax and attention run a whole eager call of lmrt.ops'
    function (attention: scaled_dot_product_attention) on the extension in one C call, and return None for any call
    they leave to the Python path (csrc/eager_calls.cpp); without the extension, stand-ins that leave every call to
    it."""
    if backends.extension_status()[0]:
        import lmrt._C

        return lmrt._C
    return SimpleNamespace(layer_norm=_none, rms_norm=_none, softmax=_none, attention=_none)


# Called first by lmrt.ops.layer_norm, rms_norm, softmax, log_softmax and scaled_dot_product_attention outside
# torch.compile. The Python path after it (checks, backend choice, the custom op lmrt::<op>_fwd) cost some 40 us per
# call on the 2-core Xeon of the CPU benchmarks: after a kernel that streams a few MB, none of the Python objects it
# touches are in the caches.
eager_calls = _load_eager_calls()


@functools.cache
def extension_ops():
    """The operators of the extension lmrt._C (torch.ops.lmrt_C), which serve the cpp and cuda backends."""
    import lmrt._C  # noqa: F401  (loading the library registers the operators)

    return torch.ops.lmrt_C


def unit_column_stride(rows: torch.Tensor) -> torch.Tensor:
    """An (M, N) tensor whose columns are adjacent in memory: `rows` itself when they already are."""
    return rows if rows.stride(1) == 1 or rows.shape[1] <= 1 else rows.contiguous()


def flat_parameter(param: torch.Tensor | None) -> torch.Tensor | None:
    """A weight or bias as a contiguous 1-D tensor."""
    return None if param is None else param.contiguous().view(-1)
