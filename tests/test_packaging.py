"""`import lmrt.kernels` from the source tree, an editable install and a built wheel; no top-level `kernels`; an sdist
that builds lmrt._C; setup.py's handling of a missing nvcc or a broken compiler."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).parents[1]
PROBE = "import lmrt, lmrt.kernels.layer_norm, importlib.util; print(lmrt.__file__); print(lmrt.kernels.__file__); " \
        "print(importlib.util.find_spec('kernels'))"


def _probe(cwd, env=None):
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\n")[:3]


def test_from_repository_root():
    lmrt_file, kernels_file, _ = _probe(ROOT)
    assert Path(lmrt_file) == ROOT / "lmrt" / "__init__.py"
    assert Path(kernels_file) == ROOT / "kernels" / "__init__.py"


def test_from_editable_install(tmp_path):
    try:
        importlib.metadata.distribution("lmrt")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("lmrt is not installed in this environment")
    lmrt_file, kernels_file, top_level_kernels = _probe(tmp_path)
    if Path(lmrt_file) != ROOT / "lmrt" / "__init__.py":
        pytest.skip("lmrt is installed, but not in editable mode from this checkout")
    assert Path(kernels_file) == ROOT / "kernels" / "__init__.py"
    assert top_level_kernels == "None"
    if list((ROOT / "lmrt").glob("_C.*.so")):
        assert (ROOT / "lmrt" / "_C.cpu_capability").is_file(), "an in-place build records its CPU capability"


def test_from_built_wheel(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("lmrt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmrt/kernels/__init__.py" in names and "lmrt/kernels/layer_norm.py" in names
    assert [name for name in names if name.startswith("lmrt/_C.") and name.endswith(".so")], "no lmrt._C in the wheel"
    assert not [name for name in names if name.startswith("kernels/")], "a top-level `kernels` would be installed"
    # What lmrt.backends reads before it loads lmrt._C.
    assert zipfile.ZipFile(wheel).read("lmrt/_C.cpu_capability").decode().strip() in ("DEFAULT", "AVX2", "AVX512")

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    lmrt_file, kernels_file, top_level_kernels = _probe(tmp_path, env={"PYTHONPATH": str(site), "PATH": ""})
    assert Path(lmrt_file) == site / "lmrt" / "__init__.py"
    assert Path(kernels_file) == site / "lmrt" / "kernels" / "__init__.py"
    assert top_level_kernels == "None"


def test_sdist_holds_every_file_of_csrc(tmp_path):
    """Headers and CUDA sources included: setuptools adds only the extension's sources, so that without MANIFEST.in
    the sdist could not compile lmrt._C."""
    try:
        tracked = subprocess.run(["git", "ls-files", "csrc"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    build = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (sdist,) = tmp_path.glob("lmrt-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    missing = set(tracked.stdout.split()) - names
    assert not missing, f"not in the sdist: {sorted(missing)}"
    assert {"setup.py", "pyproject.toml", "README.md", "kernels/attention.py"} <= names


def _setup_module():
    spec = importlib.util.spec_from_file_location("lmrt_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not as __main__: the functions, without running setup()
    return module


def test_cuda_home_without_nvcc_builds_without_cuda(tmp_path, monkeypatch, capsys):
    """A CUDA runtime image has CUDA_HOME (or /usr/local/cuda) but no nvcc: a CPU-only build, not a failed install."""
    setup = _setup_module()
    cuda_torch, cpp_extension = SimpleNamespace(version=SimpleNamespace(cuda="12.8")), SimpleNamespace(CUDA_HOME=None)
    monkeypatch.delenv("LMRT_BUILD_CUDA", raising=False)
    assert not setup._with_cuda(cuda_torch, cpp_extension)
    assert "without its CUDA kernels (nvcc was not found (set CUDA_HOME))" in capsys.readouterr().out

    cpp_extension.CUDA_HOME = str(tmp_path)
    assert not setup._with_cuda(cuda_torch, cpp_extension)
    assert f"(nvcc was not found: CUDA_HOME {tmp_path} has no bin/nvcc" in capsys.readouterr().out
    monkeypatch.setenv("LMRT_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match=f"LMRT_BUILD_CUDA=1 but nvcc was not found: CUDA_HOME {tmp_path} has"):
        setup._with_cuda(cuda_torch, cpp_extension)

    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    assert setup._with_cuda(cuda_torch, cpp_extension)


def test_a_compiler_that_fails_its_check_leaves_a_warning(tmp_path):
    """torch checks the compiler (`c++ --version`) before it compiles anything; that failure warns like a compile
    error and the build goes on without lmrt._C."""
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path)], cwd=ROOT,
                           env={**os.environ, "CXX": "false"}, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert "lmrt: WARNING: building lmrt._C failed, so the cpp and cuda backends are unavailable" in build.stdout
    assert not list(tmp_path.rglob("_C*")), "nothing built, nothing recorded"
