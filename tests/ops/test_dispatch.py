"""The chosen backend runs its own implementation, forward and backward, and no other backend's does.

Every other op test compares a backend's results with the float64 reference and PyTorch's own error, which the
torch backend (the reference) passes too: were `lmrt.backend("triton")` silently served by the reference, or by the
extension, they would all still pass. Here each backend's entry points are spied on: the Triton launchers of
lmrt.kernels and the reference's `*_fwd`/`*_bwd` functions that serve the torch backend (wrapped in Python, where
lmrt.ops looks them up at each call), and the operators of lmrt._C (torch.ops.lmrt_C.*), which the extension's
eager calls (csrc/eager_calls.cpp) run from C++ through the dispatcher, out of Python's reach: the profiler records
every dispatcher call, wherever it comes from. The ops that have an eager C++ call are checked on it and on the
Python path (the custom op, as under autocast or torch.compile).
"""

import contextlib
import importlib
import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import lmrt
from lmrt import reference
from tests.conftest import BACKENDS, DEVICE, EXTENSION_BACKENDS

# The backend of lmrt._C's operators on DEVICE's tensors.
EXTENSION = "cuda" if DEVICE == "cuda" else "cpp"
# op: (its module in lmrt/ops/, its module in lmrt.kernels, the prefix of its Triton launchers <prefix>_fwd and
# <prefix>_bwd there, and the prefix of its entry points in lmrt.reference and in lmrt._C)
ENTRY_POINTS = {
    "layer_norm": ("layer_norm", "layer_norm", "norm", "layer_norm"),
    "rms_norm": ("rms_norm", "layer_norm", "norm", "rms_norm"),
    "softmax": ("softmax", "softmax", "softmax", "softmax"),
    "log_softmax": ("softmax", "softmax", "softmax", "softmax"),
    "scaled_dot_product_attention": ("attention", "attention", "attention", "attention"),
    "flash_attn_func": ("attention", "attention", "attention", "attention"),
    "flash_attn_varlen_func": ("attention", "attention", "attention", "attention"),
}
# The ops that lmrt._C's eager calls serve first (the flash_attn_* calls go to the custom op directly).
EAGER_OPS = ("layer_norm", "rms_norm", "softmax", "log_softmax", "scaled_dot_product_attention")
STAGES = ("fwd", "bwd")


def _call(op):
    """A small call of `op`: the function of its differentiable tensors, and those tensors."""

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE)

    if op in ("layer_norm", "rms_norm"):
        x, weight = randn(3, 40), randn(40)
        if op == "layer_norm":
            return (lambda x, w, b: lmrt.ops.layer_norm(x, (40,), w, b)), [x, weight, randn(40)]
        return (lambda x, w: lmrt.ops.rms_norm(x, (40,), w)), [x, weight]
    if op in ("softmax", "log_softmax"):
        return (lambda x: getattr(lmrt.ops, op)(x, -1)), [randn(3, 40)]
    if op == "scaled_dot_product_attention":
        return (lambda q, k, v: lmrt.ops.scaled_dot_product_attention(q, k, v, is_causal=True)), \
            [randn(1, 2, 5, 16), randn(1, 2, 7, 16), randn(1, 2, 7, 16)]
    if op == "flash_attn_func":
        return (lambda q, k, v: lmrt.ops.flash_attn_func(q, k, v, causal=True)), \
            [randn(1, 5, 2, 16), randn(1, 7, 2, 16), randn(1, 7, 2, 16)]
    cu = torch.tensor([0, 3, 8], device=DEVICE, dtype=torch.int32)
    return (lambda q, k, v: lmrt.ops.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True)), \
        [randn(8, 2, 16), randn(8, 2, 16), randn(8, 2, 16)]


def _python_entry_points():
    """(module, name, backend) of every entry point spied on in Python: the reference's and, where triton is
    installed, the launchers of lmrt.kernels (importing them imports triton)."""
    points = {(reference, f"{own}_{stage}", "torch") for *_, own in ENTRY_POINTS.values() for stage in STAGES}
    if importlib.util.find_spec("triton") is not None:
        for _, module, launcher, _ in ENTRY_POINTS.values():
            kernels = importlib.import_module(f"lmrt.kernels.{module}")
            points |= {(kernels, f"{launcher}_{stage}", "triton") for stage in STAGES}
    return points


@pytest.fixture
def calls(monkeypatch):
    """The entry points called, as (backend, name): the Python spies append as they are called, `extension_calls`
    adds lmrt._C's operators when its block ends."""
    calls = []

    def spy(module, name, backend):
        original = getattr(module, name)

        def recording(*args, **kwargs):
            calls.append((backend, name))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, recording)

    for module, name, backend in _python_entry_points():
        spy(module, name, backend)
    return calls


@contextlib.contextmanager
def extension_calls(calls):
    """Appends to `calls` the operators of lmrt._C that ran in the block, as (EXTENSION, name)."""
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        yield
    names = {f"lmrt_C::{own}_{stage}" for *_, own in ENTRY_POINTS.values() for stage in STAGES}
    calls += [(EXTENSION, event.name.removeprefix("lmrt_C::")) for event in recorded.events() if event.name in names]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,path", [(op, path) for op in ENTRY_POINTS
                                     for path in (("eager", "custom_op") if op in EAGER_OPS else ("custom_op",))])
def test_the_chosen_backend_runs_its_own_kernels(op, path, backend, calls, monkeypatch):
    """The forward calls only the chosen backend's forward entry point, the backward only its backward one."""
    if backend in EXTENSION_BACKENDS and op == "flash_attn_varlen_func":
        pytest.skip("the extension takes no packed sequences (test_extension_backends_refuse_what_they_lack)")
    # "eager": the op as called, which lmrt._C's eager call serves on the extension's backend (the others, and the
    # flash_attn_* calls, take the custom op); "custom_op": the eager call declines, as under autocast.
    if path == "custom_op":
        module = sys.modules[f"lmrt.ops.{ENTRY_POINTS[op][0]}"]
        declined = {name: lambda *args: None for name in ("layer_norm", "rms_norm", "softmax", "attention")}
        monkeypatch.setattr(module, "eager_calls", SimpleNamespace(**declined))
    fn, tensors = _call(op)
    leaves = [t.requires_grad_() for t in tensors]
    _, _, launcher, own = ENTRY_POINTS[op]
    fwd, bwd = (f"{launcher if backend == 'triton' else own}_{stage}" for stage in STAGES)
    with lmrt.backend(backend):
        with extension_calls(calls):
            out = fn(*leaves)
        forward = sorted(set(calls))
        calls.clear()
        with extension_calls(calls):
            grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
        backward = sorted(set(calls))
    assert forward == [(backend, fwd)], f"the forward on the {backend} backend called {forward}"
    assert backward == [(backend, bwd)], f"the backward on the {backend} backend called {backward}"
    assert all(grad.isfinite().all() for grad in grads)
