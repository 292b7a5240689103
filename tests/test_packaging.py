"""`import lmrt.kernels` from the source tree, an editable install and a built wheel; no top-level `kernels`."""

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

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

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    lmrt_file, kernels_file, top_level_kernels = _probe(tmp_path, env={"PYTHONPATH": str(site), "PATH": ""})
    assert Path(lmrt_file) == site / "lmrt" / "__init__.py"
    assert Path(kernels_file) == site / "lmrt" / "kernels" / "__init__.py"
    assert top_level_kernels == "None"
