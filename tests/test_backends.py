import os
import shutil
import site
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

import lmrt
from lmrt import backends
from tests.conftest import DEVICE

FAKE_CUDA = torch.device("cuda")  # backends.select only reads the device type, so no GPU is needed


@pytest.fixture
def cuda_available(monkeypatch):
    """Triton counts as available for CUDA tensors only where torch has a GPU: pretend it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_available_backends():
    names = lmrt.available_backends()
    assert names[-1] == "torch"
    assert set(names) <= set(backends.BACKENDS)
    assert ("triton" in lmrt.available_backends("cpu")) == backends.triton_interpreter_enabled()
    assert lmrt.available_backends("cpu") == [n for n in names if backends.unavailable_reason(n, "cpu") is None]


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown lmrt backend 'tritn'; expected one of triton, cuda, cpp, torch"):
        with lmrt.backend("tritn"):
            pass


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("LMRT_BACKEND", "torch")
    assert backends.chosen_backend() == "torch"
    with lmrt.backend("triton"):
        assert backends.chosen_backend() == "triton"  # the context manager wins
    monkeypatch.setenv("LMRT_BACKEND", "fast")
    with pytest.raises(ValueError, match="LMRT_BACKEND: unknown lmrt backend 'fast'"):
        lmrt.ops.softmax(torch.randn(2, 3), -1)


def test_context_manager_restores_previous_choice():
    with lmrt.backend("torch"):
        with lmrt.backend("triton"):
            assert backends.chosen_backend() == "triton"
        assert backends.chosen_backend() == "torch"
    assert backends.chosen_backend() is None


def test_blocks_closed_out_of_order_leave_no_choice_behind():
    # Blocks in two threads (or generators) may close in the other order than they opened; each used to restore the
    # choice it found on entry, so the second to close put back the first's ended choice for good.
    outer, inner = lmrt.backend("torch"), lmrt.backend("cpp")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert backends.chosen_backend() == "cpp"  # the block still open
    inner.__exit__(None, None, None)
    assert backends.chosen_backend() is None


def test_blocks_in_threads_leave_no_choice_behind():
    opened, closed = threading.Barrier(2), threading.Barrier(2)

    def block(name, first_to_close):
        with lmrt.backend(name):
            opened.wait()
            if not first_to_close:
                closed.wait()
        if first_to_close:
            closed.wait()

    threads = [threading.Thread(target=block, args=args) for args in (("torch", True), ("cpp", False))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert backends.chosen_backend() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable GPU")
def test_triton_is_not_available_for_cuda_tensors_without_cuda():
    assert "triton" not in lmrt.available_backends("cuda")
    assert backends.unavailable_reason("triton", "cuda") == f"CUDA is not available to torch {torch.__version__}"


def test_default_order(cuda_available):
    def serves_all(name):
        return None

    assert backends.select("op", FAKE_CUDA, ("triton", "torch"), serves_all) == "triton"
    assert backends.select("op", torch.device("cpu"), ("triton", "torch"), serves_all) == "torch"


def test_default_falls_back_with_one_warning(cuda_available, monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())  # the warning is once per process: not if an earlier test warned

    def no_triton(name):
        return "it lacks this" if name == "triton" else None

    with pytest.warns(UserWarning, match="the 'triton' backend cannot serve this call \\(it lacks this\\); falling"):
        assert backends.select("fallback_op", FAKE_CUDA, ("triton", "torch"), no_triton) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback of the same kind warns no more
        assert backends.select("fallback_op", FAKE_CUDA, ("triton", "torch"), no_triton) == "torch"


def test_explicit_choice_raises_instead_of_falling_back():
    with lmrt.backend("cuda"), pytest.raises(RuntimeError, match="'cuda' backend was chosen but cannot serve"):
        lmrt.ops.layer_norm(torch.randn(2, 3), (3,))
    with lmrt.backend("triton"), pytest.raises(RuntimeError, match="'triton' backend was chosen.*no implementation"):
        backends.select("op", torch.device("cpu"), ("cpp", "torch"), lambda name: None)


def test_backend_holds_in_backward():
    """The choice is process-wide, so it also reaches autograd's backward (which may run in another thread)."""
    x = torch.randn(4, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    y = lmrt.ops.softmax(x, -1)
    with lmrt.backend("triton"), pytest.raises(RuntimeError, match="'triton' backend was chosen"):
        y.backward(torch.ones_like(y))



def test_extension_is_built_where_a_compiler_is():
    """scripts/setup.sh builds lmrt._C (its CPU kernels at least) on any machine with a C++ compiler, so a missing
    extension there is a failed build, not a skip."""
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on this machine, so lmrt._C cannot have been built")
    built, _, why_not = backends.extension_status()
    assert built, why_not
    assert "cpp" in lmrt.available_backends("cpu")


@pytest.mark.parametrize("built,running,loads", [
    ("DEFAULT", "DEFAULT", True), ("DEFAULT", "AVX512", True), ("DEFAULT", "SVE256", True),
    ("AVX2", "AVX2", True), ("AVX2", "AVX512", True), ("AVX512", "AVX512", True),
    ("AVX2", "DEFAULT", False), ("AVX512", "AVX2", False), ("AVX512", "DEFAULT", False),
    # A capability outside DEFAULT < AVX2 < AVX512 matches only itself.
    ("SVE256", "SVE256", True), ("SVE256", "AVX512", False), ("AVX2", "ZVECTOR", False),
])
def test_cpu_capability_order(built, running, loads):
    assert (backends.cpu_capability_refusal(built, running) is None) == loads


def test_extension_built_for_more_than_this_cpu_is_not_loaded(tmp_path, monkeypatch):
    """Loading it would kill the process with SIGILL; the cpp and cuda backends are unavailable instead, saying why."""
    record = tmp_path / "_C.cpu_capability"
    record.write_text("AVX512\n")
    monkeypatch.setattr(backends, "CPU_CAPABILITY_RECORD", record)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert backends.extension_status.__wrapped__() == (
        False, False, "lmrt._C was built for AVX512 but this CPU supports AVX2; rebuild with LMRT_CPU_CAPABILITY=AVX2 "
                      "(or DEFAULT for a portable build)")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert backends.extension_status.__wrapped__()[2].endswith("rebuild with LMRT_CPU_CAPABILITY=DEFAULT")


def test_extension_without_a_capability_record_loads_as_before(tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "CPU_CAPABILITY_RECORD", tmp_path / "_C.cpu_capability")  # an older build's
    assert backends.extension_status.__wrapped__() == backends.extension_status()


def test_a_source_checkout_without_the_extension_says_so(tmp_path):
    """Run from the repository root after a non-editable install, `lmrt` is the checkout's lmrt/, without lmrt._C;
    the reason names that folder instead of calling the installed build failed."""
    checkout, root = tmp_path / "checkout", Path(__file__).parents[1]
    for folder in ("lmrt", "kernels"):
        shutil.copytree(root / folder, checkout / folder, ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    (checkout / "setup.py").touch()
    probe = "from lmrt import backends; print(backends.unavailable_reason('cpp', 'cpu'))"
    # -S with site-packages on PYTHONPATH: no .pth files, so that an editable install's finder cannot supply the
    # lmrt._C of its own checkout, as it would do for any lmrt package.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), *site.getsitepackages()])}
    done = subprocess.run([sys.executable, "-S", "-c", probe], cwd=checkout, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"lmrt was imported from {checkout / 'lmrt'}, a source checkout without a built "
                                  "lmrt._C: build it there with `pip install -v --no-build-isolation -e .`, or run "
                                  "from outside the checkout"), done.stdout
