"""Which implementation serves an lmrt op: the backends, the user's choice, and the fallback rule.

Backends (ARCHITECTURE.md): `triton` (kernels/ on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1),
`cuda` and `cpp` (the extension lmrt._C), and `torch` (the plain-PyTorch reference, anywhere).

A user picks one with `lmrt.backend(name)` or the environment variable LMRT_BACKEND; the context manager wins.
The choice is process-wide, like `torch.nn.attention.sdpa_kernel`, so that it also holds in autograd's
backward threads; with blocks open in several threads, the one opened last holds. Without a choice, each op takes
the first backend of its device's preference order that is available and can serve the call; when a preferred
backend cannot serve it (float64, say) the op falls back with a one-time warning. An explicit choice that cannot
serve a call raises instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

BACKENDS = ("triton", "cuda", "cpp", "torch")

# Preference order of the default choice, per device type. Later issues reorder these from benchmark figures.
_DEFAULT_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

# The backend named by the latest-opened `lmrt.backend(name)` block still open, or None outside any (read by the
# eager calls of lmrt._C, which take it as an argument; everything else asks chosen_backend()).
context_choice: str | None = None
# The open blocks, in the order they were opened: (a token of the block, its backend). Blocks in several threads, or
# in generators, may close out of order; each removes its own entry, so none restores a choice that has ended.
_open_blocks: list[tuple[object, str]] = []
_open_blocks_lock = threading.Lock()
_warned: set[tuple[str, str, str]] = set()


class BackendCannotServeError(RuntimeError):
    """An explicitly chosen backend cannot serve a call (a dtype, size or feature it lacks); it does not fall back."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown lmrt backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the lmrt ops called inside the block on backend `name` ("triton", "cuda", "cpp" or "torch").

    The choice is explicit: an op that the backend cannot serve raises rather than falling back.
    """
    global context_choice
    _check_name(name, "lmrt.backend(name)")
    token = object()
    with _open_blocks_lock:
        _open_blocks.append((token, name))
        context_choice = name
    try:
        yield
    finally:
        with _open_blocks_lock:
            _open_blocks[:] = [block for block in _open_blocks if block[0] is not token]
            context_choice = _open_blocks[-1][1] if _open_blocks else None


def chosen_backend() -> str | None:
    """The backend the user asked for (context manager first, then LMRT_BACKEND), or None for the default."""
    if context_choice is not None:
        return context_choice
    from_env = os.environ.get("LMRT_BACKEND")
    return _check_name(from_env, "LMRT_BACKEND") if from_env else None


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on CPU tensors; it must be set before triton is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Written by setup.py beside lmrt._C: the x86 vector instructions its CPU kernels were compiled for, by the names of
# torch.backends.cpu.get_cpu_capability(); each of CPU_CAPABILITIES includes the ones before it.
CPU_CAPABILITY_RECORD = Path(__file__).with_name("_C.cpu_capability")
CPU_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


def cpu_capability_refusal(built: str, running: str) -> str | None:
    """Why an lmrt._C built for CPU capability `built` must not be loaded where torch finds `running`, or None.

    Loading it there would kill the process (SIGILL) rather than raise. A value outside CPU_CAPABILITIES (another
    architecture's, or a later torch's) matches only itself."""
    if built == "DEFAULT" or built == running:
        return None
    if built in CPU_CAPABILITIES and running in CPU_CAPABILITIES and \
            CPU_CAPABILITIES.index(running) >= CPU_CAPABILITIES.index(built):
        return None
    rebuild = running if running in CPU_CAPABILITIES else "DEFAULT"
    return (f"lmrt._C was built for {built} but this CPU supports {running}; rebuild with "
            f"LMRT_CPU_CAPABILITY={rebuild}" + (" (or DEFAULT for a portable build)" if rebuild != "DEFAULT" else ""))


def _source_checkout_without_extension() -> Path | None:
    """lmrt's folder when it is a source checkout's lmrt/ with no lmrt._C built in it (run from the repository root
    after a non-editable install, the checkout's lmrt comes first on sys.path), else None."""
    package = Path(__file__).parent
    if (package.parent / "setup.py").is_file() and \
            not any((package / f"_C{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        return package
    return None


@functools.cache
def extension_status() -> tuple[bool, bool, str]:
    """(cpp built, cuda built, why not) for the extension lmrt._C."""
    # A build without a record (before setup.py wrote one) loads as before.
    if CPU_CAPABILITY_RECORD.is_file():
        refusal = cpu_capability_refusal(CPU_CAPABILITY_RECORD.read_text().strip(),
                                         torch.backends.cpu.get_cpu_capability())
        if refusal:
            return False, False, refusal
    try:
        import lmrt._C  # noqa: F401  (loading the library registers torch.ops.lmrt_C)
    except ImportError as error:
        if (checkout := _source_checkout_without_extension()) is not None:
            return False, False, (f"lmrt was imported from {checkout}, a source checkout without a built lmrt._C: "
                                  "build it there with `pip install -v --no-build-isolation -e .`, or run from "
                                  "outside the checkout to use an installed lmrt")
        return False, False, (f"lmrt._C is not built ({error}); reinstall with `pip install -v --no-build-isolation "
                              "-e .` and read its build log (pip shows it only with -v)")
    if torch.ops.lmrt_C.built_with_cuda():
        return True, True, ""
    if torch.version.cuda is None:
        return True, False, f"lmrt._C was built without CUDA kernels: torch {torch.__version__} has no CUDA"
    return True, False, ("lmrt._C was built without CUDA kernels (nvcc was not found, or LMRT_BUILD_CUDA=0); "
                         "reinstall with `pip install --no-build-isolation -e .` where nvcc is on the PATH")


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why backend `name` cannot run on tensors of `device_type` in this process, or None when it can."""
    if name == "torch":
        return None
    if name == "triton":
        if not _triton_installed():
            return "triton is not installed"
        if device_type == "cuda":
            return None if torch.cuda.is_available() else f"CUDA is not available to torch {torch.__version__}"
        if device_type == "cpu":
            return None if triton_interpreter_enabled() else "triton runs CPU tensors only with TRITON_INTERPRET=1"
        return f"triton does not run {device_type} tensors"
    # What the build lacks comes first: it is what `lmrt info` should tell.
    cpp_built, cuda_built, why_not = extension_status()
    if name == "cpp":
        if not cpp_built:
            return why_not
        return None if device_type == "cpu" else f"the cpp backend runs CPU tensors, not {device_type} tensors"
    if not cuda_built:
        return why_not
    return None if device_type == "cuda" else f"the cuda backend runs CUDA tensors, not {device_type} tensors"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends usable in this process, for `device` if given, else for any device present."""
    if device is not None:
        device_types = [torch.device(device).type]
    else:
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [name for name in BACKENDS if any(unavailable_reason(name, d) is None for d in device_types)]


def select(
    op: str,
    device: torch.device,
    implemented: Iterable[str],
    unsupported: Callable[[str], str | None],
) -> str:
    """Pick the backend that runs one call of `op` on `device`.

    `implemented` names the backends that have this op; `unsupported(name)` says why backend `name` cannot
    serve this particular call (a dtype or size it lacks), or returns None when it can.
    """
    implemented = tuple(implemented)
    chosen = chosen_backend()
    if chosen is not None:
        reason = (
            (None if chosen in implemented else f"it has no implementation of {op}")
            or unavailable_reason(chosen, device.type)
            or unsupported(chosen)
        )
        if reason:
            raise BackendCannotServeError(f"lmrt.ops.{op}: the {chosen!r} backend was chosen but cannot serve this "
                                          f"call: {reason}")
        return chosen
    for name in _DEFAULT_ORDER.get(device.type, ("torch",)):
        if name not in implemented or unavailable_reason(name, device.type):
            continue
        reason = unsupported(name)
        if reason is None:
            return name
        if (op, name, reason) not in _warned:
            _warned.add((op, name, reason))
            warnings.warn(f"lmrt.ops.{op}: the {name!r} backend cannot serve this call ({reason}); "
                          "falling back to the next backend", stacklevel=4)
    return "torch"
