"""Build lmrt: the Python package, the Triton kernels installed as lmrt.kernels, and the extension lmrt._C.

The Triton kernels live in the top-level folder kernels/ and are installed as the subpackage lmrt.kernels,
never as a top-level module `kernels` (that name belongs to the Hugging Face package transformers imports).

lmrt._C is built from csrc/ with ninja: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is
found. The build needs torch importable here, so install with `pip install --no-build-isolation .`. Settings:
- LMRT_BUILD_CUDA=0|1 forces the CUDA kernels off or on (on fails clearly without a CUDA torch or nvcc);
- TORCH_CUDA_ARCH_LIST picks the GPU targets (default: the GPUs present, else "8.0;9.0a");
- MAX_JOBS bounds the parallel compile jobs;
- LMRT_CPU_CAPABILITY=DEFAULT|AVX2|AVX512 picks the x86 vector instructions of the CPU kernels (default: what torch
  finds on this machine, as the extension is built where it runs; DEFAULT gives a portable build).
A failed or skipped build leaves a package that imports and runs on its other backends; `lmrt info` says why (pip
shows this script's warnings only with -v).
The CPU capability lmrt._C is built for is written beside it, in lmrt/_C.cpu_capability, which lmrt reads before
loading it: on a CPU without those instructions loading it would kill the process (SIGILL).
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

# Compiler flags per CPU capability: what at::vec's Vectorized types need to use those registers, and the macros
# that select their implementation (as torch's own CPU kernels are built once per capability).
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


# Read by lmrt.backends (CPU_CAPABILITY_RECORD) before it loads lmrt._C.
CPU_CAPABILITY_RECORD = "_C.cpu_capability"


def _cpu_capability(torch) -> str:
    capability = os.environ.get("LMRT_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    if capability not in CPU_CAPABILITY_FLAGS:
        if "LMRT_CPU_CAPABILITY" in os.environ:
            raise ValueError(f"LMRT_CPU_CAPABILITY={capability!r}; expected one of {', '.join(CPU_CAPABILITY_FLAGS)}")
        capability = "DEFAULT"  # a capability of another architecture (ARM's SVE, say): the compiler's defaults
    print(f"lmrt: building the CPU kernels for CPU capability {capability}")
    return capability


def _has_nvcc(cuda_home: str | None) -> bool:
    """Whether CUDA_HOME (as torch found it) holds the nvcc that torch's build runs: a CUDA runtime image sets
    CUDA_HOME, or has /usr/local/cuda, without the compiler."""
    return cuda_home is not None and os.access(Path(cuda_home) / "bin" / "nvcc", os.X_OK)


def _with_cuda(torch, cpp_extension) -> bool:
    forced = os.environ.get("LMRT_BUILD_CUDA")
    if forced not in (None, "", "0", "1"):
        raise ValueError(f"LMRT_BUILD_CUDA={forced!r}; expected 0 or 1")
    cuda_home = cpp_extension.CUDA_HOME
    no_nvcc = ("nvcc was not found (set CUDA_HOME)" if cuda_home is None else
               f"nvcc was not found: CUDA_HOME {cuda_home} has no bin/nvcc; set it to a CUDA toolkit")
    missing = [why for why, absent in (("torch was built without CUDA", torch.version.cuda is None),
                                       (no_nvcc, not _has_nvcc(cuda_home)))
               if absent]
    if forced == "1" and missing:
        raise RuntimeError(f"LMRT_BUILD_CUDA=1 but {' and '.join(missing)}")
    if forced == "0" or missing:
        why = "LMRT_BUILD_CUDA=0" if forced == "0" else missing[0]
        print(f"lmrt: building lmrt._C without its CUDA kernels ({why})")
        return False
    return True


def _default_cuda_arch_list(torch) -> str:
    if torch.cuda.is_available():
        capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}{'a' if major >= 9 else ''}" for major, minor in sorted(capabilities))
    return "8.0;9.0a"


def _extension_build():
    """Return (ext_modules, cmdclass) for lmrt._C, or empty ones when it cannot be built here."""
    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/**/*.cpp"))
    if not cpp_sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("lmrt: torch is not importable in the build environment; building without lmrt._C "
              "(install with --no-build-isolation to build it)")
        return [], {}

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Builds lmrt._C, or warns and leaves it out when the compiler's checks or the compile fail: lmrt works
        without it.

        Its objects go to build/temp.<platform>-<python> in the source tree in every kind of install: an editable
        install's own temporary folder would be thrown away, so that the next install, editable or a wheel,
        recompiled every source (two minutes on 2 cores) instead of letting ninja redo only what changed."""

        def finalize_options(self):
            super().finalize_options()
            build = self.get_finalized_command("build")
            self.build_temp = str(ROOT / build.build_base / f"temp.{build.plat_name}-{sys.implementation.cache_tag}")

        def build_extensions(self):
            # torch's build_extensions checks the compiler (`c++ --version`) and nvcc before it compiles anything,
            # so a failure there is caught here too, not only a compile error of build_extension.
            try:
                super().build_extensions()
            except Exception as error:  # a compiler error of any kind; the package stays usable
                print(f"lmrt: WARNING: building {', '.join(ext.name for ext in self.extensions)} failed, so the cpp "
                      f"and cuda backends are unavailable: {error}")
                # Nothing to install: the install steps that copy built extensions skip what is not listed.
                self.extensions = []

        def build_extension(self, ext):
            super().build_extension(ext)
            # Beside the library in the build folder, whence the wheel takes both.
            Path(self.get_ext_fullpath(ext.name)).with_name(CPU_CAPABILITY_RECORD).write_text(capability + "\n")

        def copy_extensions_to_source(self):
            # An in-place build (an editable install) copies the library from the build folder into lmrt/; the record
            # goes with it.
            super().copy_extensions_to_source()
            for ext in self.extensions:  # self.inplace is set again, so get_ext_fullpath is the library's copy
                built = Path(self.build_lib, self.get_ext_filename(ext.name)).with_name(CPU_CAPABILITY_RECORD)
                self.copy_file(str(built), str(Path(self.get_ext_fullpath(ext.name)).with_name(CPU_CAPABILITY_RECORD)))

    # -ffp-contract=off: no multiply-add fused by the compiler behind the code's back (the kernels ask for FMAs
    # where they want them), so that a vector loop and its scalar tail round alike; as Inductor's CPU code.
    capability = _cpu_capability(torch)
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", *CPU_CAPABILITY_FLAGS[capability]]
    link_flags = ["-fopenmp"]
    if _with_cuda(torch, cpp_extension):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_cuda_arch_list(torch))
        cuda_sources = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/cuda/*.cu"))
        extension = cpp_extension.CUDAExtension(
            "lmrt._C", cpp_sources + cuda_sources,
            define_macros=[("LMRT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        extension = cpp_extension.CppExtension("lmrt._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                                               extra_link_args=link_flags)
    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


# Guarded so that the tests can import this file's functions; pip's build backend runs it as __main__.
if __name__ == "__main__":
    ext_modules, cmdclass = _extension_build()
    setup(
        packages=find_packages(include=["lmrt", "lmrt.*"]) + ["lmrt.kernels"],
        package_dir={"lmrt.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
