"""The CUDA branch of the torch glue (csrc/*.cpp under LMRT_WITH_CUDA) passes the C++ compiler's checks without a GPU.

Only a CUDA build of lmrt._C compiles that branch, and CI's torch is the CPU build, whose headers lack two things
ATen's CUDA headers include: c10/cuda/impl/cuda_cmake_macros.h (generated when torch is built with CUDA) and the
headers of cuBLAS, cuBLASLt, cuSPARSE and cuSOLVER (libraries beside the CUDA toolkit, absent from a bare nvcc
install). The test writes stand-ins that declare only the names those headers use in declarations, then has nvcc
drive the host compiler over each glue source with -fsyntax-only: name lookup, types, overloads and templates are
all checked, nothing is generated. The stand-ins come after every real include directory (-idirafter), so a
machine that has the real headers uses them. A glue source is any csrc/*.cpp that mentions LMRT_WITH_CUDA.
"""

import concurrent.futures
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

CSRC = Path(__file__).resolve().parents[2] / "csrc"
GLUE_SOURCES = sorted(p for p in CSRC.glob("*.cpp") if "LMRT_WITH_CUDA" in p.read_text())
COMPILE_TIMEOUT_S = 600

# What ATen's CUDA headers need from the files the CPU wheel and a bare CUDA toolkit lack: handle and status types.
STAND_INS = {
    "c10/cuda/impl/cuda_cmake_macros.h": "#define C10_CUDA_BUILD_SHARED_LIBS\n",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
}


def test_the_glue_sources_are_found():
    assert {p.name for p in GLUE_SOURCES} >= {"lmrt_ops.cpp", "eager_calls.cpp"}


@pytest.fixture(scope="module")
def check_glue(nvcc, tmp_path_factory):
    """check_glue(source) -> (returncode, compiler output); the sources are checked side by side, once."""
    stand_ins = tmp_path_factory.mktemp("cuda_stand_ins")
    for name, text in STAND_INS.items():
        (stand_ins / name).parent.mkdir(parents=True, exist_ok=True)
        (stand_ins / name).write_text(f"#pragma once\n{text}")
    includes = [f"-I{path}" for path in [*cpp_extension.include_paths(), CSRC, sysconfig.get_paths()["include"]]]

    def check(source: Path) -> tuple[int, str]:
        # C++17, the oldest standard the supported torch versions build extensions with; -w: torch's own headers
        # warn under it.
        command = [nvcc, "-std=c++17", "-DLMRT_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H",
                   "-DTORCH_EXTENSION_NAME=_C", *includes, "-Xcompiler", f"-idirafter{stand_ins}",
                   "-Xcompiler", "-fsyntax-only", "-Xcompiler", "-w", "-c", str(source),
                   "-o", str(stand_ins / f"{source.stem}.o")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        return result.returncode, result.stdout + result.stderr

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(GLUE_SOURCES, pool.map(check, GLUE_SOURCES), strict=True))
    return results.__getitem__


@pytest.mark.parametrize("source", GLUE_SOURCES, ids=[p.name for p in GLUE_SOURCES])
def test_cuda_branch_compiles(check_glue, source: Path):
    returncode, output = check_glue(source)
    assert returncode == 0, f"the CUDA branch of {source.name} does not compile:\n{output[-10000:]}"
