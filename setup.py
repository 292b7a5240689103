"""Build lmrt: the Python package, the Triton kernels installed as lmrt.kernels, and the extension lmrt._C.

The Triton kernels live in the top-level folder kernels/ and are installed as the subpackage lmrt.kernels,
never as a top-level module `kernels` (that name belongs to the Hugging Face package transformers imports).

lmrt._C is built from csrc/ when csrc/ holds C++ sources; that build needs torch importable here, so build
with `pip install --no-build-isolation .`. Without sources, or without torch, the pure-Python package is
built and works on the backends that need no extension.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _extension_build():
    """Return (ext_modules, cmdclass) for lmrt._C, or empty ones when there is nothing to build."""
    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/**/*.cpp"))
    if not cpp_sources:
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("lmrt: torch is not importable in the build environment; building without lmrt._C "
              "(install with --no-build-isolation to build it)")
        return [], {}
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/**/*.cu"))
    with_cuda = os.environ.get("LMRT_BUILD_CUDA", "1" if cpp_extension.CUDA_HOME else "0") == "1"
    if with_cuda and cuda_sources:
        extension = cpp_extension.CUDAExtension("lmrt._C", cpp_sources + cuda_sources)
    else:
        extension = cpp_extension.CppExtension("lmrt._C", cpp_sources)
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension_build()

setup(
    packages=find_packages(include=["lmrt", "lmrt.*"]) + ["lmrt.kernels"],
    package_dir={"lmrt.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
