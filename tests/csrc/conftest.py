"""The nvcc fixture of the tests that compile csrc/ without a GPU."""

import os
import shutil
from pathlib import Path

import pytest


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME")
    if cuda_home and os.access(Path(cuda_home) / "bin" / "nvcc", os.X_OK):
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.fixture(scope="session")
def nvcc() -> str:
    path = find_nvcc()
    if path is None:
        pytest.skip("nvcc not found on PATH or at $CUDA_HOME/bin/nvcc; the CUDA sources are compiled where it is")
    return path
